"""Folder -> embeddings.npy + index (row i <-> path i); similarity of two images (encoder.py)."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import EMBEDDING_DTYPES
from ..data.decode import decode_files, decode_pool
from ..data.scan import no_usable_image, scan_images
from ..errors import InputError
from ..files import write_atomic, write_json_atomic
from .encoder import Encoder, embed_files, load_encoder

CHUNK = 1024  # images decoded at a time: memory stays bounded on folders of any size


def index_path(output: Path) -> Path:
    """X.npy -> X.json: the index beside the embeddings."""
    return Path(output).with_suffix(".json")


def embed_folder(
    folder: Path,
    run_dir: Path,
    output: Path,
    *,
    force: bool = False,
    dtype: str = "float32",
    batch_size: int = 128,
    conv: str | None = None,
    on_progress=None,
) -> dict:
    """Embed every usable image under `folder` with the run's encoder; write `output` and its index.

    Returns the index dict (also written to output with a .json suffix). Row i of the array is
    index["paths"][i]. `conv`: the convolution to run (see load_encoder). Files that cannot be decoded are left out and listed in index["skipped"].
    """
    folder, output = Path(folder), Path(output)
    if output.suffix != ".npy":
        raise InputError(f"output {output} must end in .npy (the index is written beside it as .json)")
    if dtype not in EMBEDDING_DTYPES:
        raise InputError(f"dtype {dtype!r} must be one of {', '.join(EMBEDDING_DTYPES)}")
    for p in (output, index_path(output)):
        if p.exists() and not force:
            raise InputError(f"{p} already exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise InputError(f"output folder {output.parent} does not exist")
    skipped: list[tuple[str, str]] = []  # (relative path, reason): unreadable folders, then files
    files = scan_images(folder, skipped=skipped)
    encoder = load_encoder(run_dir, batch_size=batch_size, conv=conv)
    rows, paths = [], []
    for kept, bad, _, features in iter_embeddings(encoder, folder, files, on_progress=on_progress):
        skipped += bad
        if kept:
            rows.append(features.astype(dtype))
            paths += kept
    if not paths:
        raise no_usable_image(folder, len(files), skipped)
    array = np.concatenate(rows)  # [N, F]
    index = {
        "paths": paths,
        "root": str(folder.resolve()),
        "model": str(Path(run_dir).resolve()),
        "step": encoder.step,
        "encoder": encoder.cfg.model.encoder,
        "image_size": encoder.image_size,
        "dim": int(array.shape[1]),
        "dtype": dtype,
        "normalized": True,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(output, lambda f: np.save(f, array))
    write_json_atomic(index_path(output), index)
    return index


def iter_embeddings(encoder: Encoder, folder: Path, files: list[Path], *, on_progress=None):
    """Decode and embed `files` CHUNK at a time: yields (kept paths, skipped, uint8 images, features).

    Memory holds one chunk of images, whatever the folder size.
    """
    with decode_pool() as pool:
        for start in range(0, len(files), CHUNK):
            images, kept, bad = decode_files(folder, files[start:start + CHUNK], encoder.image_size, pool=pool,
                                             on_progress=on_progress, progress_offset=start,
                                             progress_total=len(files))
            yield kept, bad, images, (encoder.embed(images) if kept else None)


def similarity(a: Path, b: Path, run_dir: Path) -> float:
    """Cosine similarity of two images' embeddings under the run's encoder, in [-1, 1]."""
    for p in (a, b):
        if not Path(p).is_file():
            raise InputError(f"image not found: {p}")
    encoder = load_encoder(run_dir, batch_size=2)
    za, zb = embed_files(encoder, [a, b])
    return float(np.clip(za @ zb, -1.0, 1.0))
