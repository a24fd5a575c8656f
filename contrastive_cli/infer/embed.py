"""Folder -> embeddings.npy + index (row i <-> path i); similarity of two images or of many pairs.

Replacing a pair (`embed --force`) never leaves a pair that silently disagrees. Both files are
written to temporary names beside the targets and flushed to disk; the index records the size and
sha256 of the .npy it describes; then the index is renamed over X.json and the array over X.npy,
with SIGINT/SIGTERM held off between the two renames. Any failure before the renames (disk full,
quota, a read-only folder, a signal) leaves the old pair untouched and no temporary file behind. A
crash between the renames leaves the new index beside the old array, which `load_embeddings`
refuses (the checksum differs) instead of pairing rows with the wrong paths.
"""
from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import EMBEDDING_DTYPES
from ..data.decode import decode_files, decode_or_reason, decode_pool, quiet_pillow
from ..data.scan import no_usable_image, scan_images
from ..errors import InputError
from ..files import replace_all, sha256_file, write_temp
from .embfile import load_embeddings
from .portable import embed_files, load_model

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
    stop: Callable[[], bool] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> dict:
    """Embed every usable image under `folder` with the run's encoder (`run_dir`: a run directory, or
an .onnx/.stablehlo/.safetensors file: infer/portable.py); write `output` and its index.

    Returns the index dict (also written to output with a .json suffix). Row i of the array is
    index["paths"][i]. `conv`: the convolution a run's encoder runs (see load_encoder). Files that cannot be decoded are left out and listed in index["skipped"].
    `stop()` is asked just before the files are replaced: True (a signal arrived) raises
    KeyboardInterrupt and leaves the old files as they were. A failed write raises files.WriteError.
    `on_warning` gets the encoder's notes (an unreadable newest checkpoint passed over).

    An existing `output` is replaced only with `force` (everything is embedded again), except one
    that this call can bring up to date: embedded from this folder by this run at the same step,
    encoder, image size, grid and dtype, with per-file records (index["files"]: [size, mtime_ns,
    ctime_ns] per row). Then the rows of unchanged files are kept, only new or changed files are
    embedded, removed ones are dropped, and the rows come in the order a fresh embed gives
    (index["update"] counts them); nothing is written when nothing changed. Any other existing
    output is an InputError that names the difference. An approximate index beside it (X.ann) is
    rebuilt for the new pair.
    """
    folder, output = Path(folder), Path(output)
    if output.suffix != ".npy":
        raise InputError(f"output {output} must end in .npy (the index is written beside it as .json)")
    if dtype not in EMBEDDING_DTYPES:
        raise InputError(f"dtype {dtype!r} must be one of {', '.join(EMBEDDING_DTYPES)}")
    previous = None  # (array, index) of the pair being brought up to date
    for p in (output, index_path(output)):
        if p.is_dir():
            raise InputError(f"{p} is a folder; give a file name for the embeddings")
    if not force and any(p.exists() or p.is_symlink() for p in (output, index_path(output))):
        previous = _previous(output, folder, run_dir, dtype)
    if not output.parent.is_dir():
        raise InputError(f"output folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):  # fail before the embedding work, not after
        raise InputError(f"cannot write to the output folder {output.parent} (read-only or no permission)")
    skipped: list[tuple[str, str]] = []  # (relative path, reason): unreadable folders, then files
    files = scan_images(folder, skipped=skipped)
    encoder = load_model(run_dir, batch_size=batch_size, conv=conv)
    _tell(encoder, on_warning)
    cfg = getattr(encoder, "cfg", None)  # a run's encoder; files (portable.py) have no config
    settings = {"model": str(Path(run_dir).resolve()), "step": encoder.step, "encoder": encoder.name,
                "image_size": encoder.image_size, "embed_grid": cfg.model.embed_grid if cfg else None,
                "dim": encoder.dim, "dtype": dtype}
    stats = {f.relative_to(folder).as_posix(): _stat(f) for f in files}
    reuse: dict[str, int] = {}  # relative path -> row of the previous array
    if previous is not None:
        old_x, old = previous
        for key, value in settings.items():
            if old.get(key) != value:
                raise InputError(f"{output} already exists, embedded with {key} {old.get(key)}; this embed has "
                                 f"{key} {value}: pass --force to embed everything again and replace it")
        reuse = {p: r for r, (p, st) in enumerate(zip(old["paths"], old["files"]))
                 if st is not None and stats.get(p) == tuple(st)}
    todo = [f for f in files if f.relative_to(folder).as_posix() not in reuse]
    fresh: dict[str, np.ndarray] = {}
    for kept, bad, _, features in iter_embeddings(encoder, folder, todo, on_progress=on_progress):
        skipped += bad
        fresh.update(zip(kept, features.astype(dtype)) if kept else ())
    paths = [p for p in stats if p in reuse or p in fresh]  # scan order: rows as a fresh embed puts them
    if not paths:
        raise no_usable_image(folder, len(files), skipped)
    if previous is not None and not fresh and paths == previous[1]["paths"]:
        return dict(previous[1], update={"reused": len(paths), "embedded": 0, "removed": 0})  # up to date
    array = np.stack([fresh[p] if p in fresh else previous[0][reuse[p]] for p in paths])  # [N, F]
    index = {
        "paths": paths,
        "root": str(folder.resolve()),
        **settings,
        "normalized": True,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "files": [list(stats[p]) if stats[p] else None for p in paths],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if previous is not None:
        index["update"] = {"reused": len(paths) - len(fresh), "embedded": len(fresh),
                           "removed": len(set(previous[1]["paths"]) - set(paths))}
    write_pair(output, array, index, stop=stop)
    refresh_ann(output, array, index, on_warning=on_warning)
    return index


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What tells a file changed: (size, mtime_ns, ctime_ns). The ctime, as the decoded-image cache
    keeps it: a rewrite of the same size with its mtime restored (`cp -p`, `rsync -t`) keeps size
    and mtime, but nobody can set a ctime. None for a file that cannot be read (a broken link: the
    decoder names it among the skipped), so that it is never taken as unchanged."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _previous(output: Path, folder: Path, run_dir: Path, dtype: str) -> tuple[np.ndarray, dict]:
    """The existing pair at `output` when `embed` may bring it up to date: embedded from this very
    folder by this run, with per-file records. Anything else is the user's to replace (--force)."""
    try:
        x, index = load_embeddings(output)
    except InputError as e:
        raise InputError(f"{output} already exists and cannot be updated ({e}); pass --force to replace it") from None
    why = None
    if index.get("root") != str(folder.resolve()):
        why = f"it holds the images of {index.get('root')}"
    elif index.get("model") != str(Path(run_dir).resolve()):
        why = f"it was embedded by {index.get('model')}"
    elif index.get("dtype") != dtype:
        why = f"it holds {index.get('dtype')}, not {dtype}"
    elif not isinstance(index.get("files"), list) or len(index["files"]) != len(index["paths"]):
        why = "its index records no file sizes and times (written before updates were possible)"
    if why:
        raise InputError(f"{output} already exists and {why}; pass --force to replace it")
    return x, index


def refresh_ann(output: Path, array: np.ndarray, index: dict, *, on_warning=None) -> None:
    """Rebuild the approximate index beside `output` for the pair just written, if one was there
    (an index nobody asked for is not made here: `neighbors` and `duplicates` build it when needed)."""
    from . import ann

    target = ann.ann_path(output)
    if not ann.is_ours(target):
        return
    old = ann.read_header(target) or {}
    custom = old.get("nlist") if old.get("nlist") != ann.default_nlist(old.get("rows") or 1) else 0
    valid = np.isfinite(array).all(axis=1)
    try:
        built = ann.build_index(array, valid=valid, nlist=min(custom or 0, len(array)), nprobe=old.get("nprobe", 0),
                                tie=(index["npy_bytes"], index["npy_sha256"]))
        ann.save_index(target, built)
    except (InputError, OSError) as e:
        if on_warning is not None:
            on_warning(f"could not rebuild {target} ({e}); searches will rebuild it")


def write_pair(output: Path, array: np.ndarray, index: dict, *, stop: Callable[[], bool] | None = None) -> None:
    """Replace X.npy and X.json together (see the module docstring); index gains "npy_bytes" and "npy_sha256"."""
    output = Path(output)
    # Through f.write, not ndarray.tofile (np.save's path for real files), whose short write on a full
    # disk is an OSError without errno ("2048 requested and 992 written").
    npy = write_temp(output, lambda f: np.save(_Writes(f), array))
    try:
        index["npy_bytes"] = npy.stat().st_size
        index["npy_sha256"] = sha256_file(npy)
        text = json.dumps(index, indent=2, allow_nan=False) + "\n"
        ipath = index_path(output)
        meta = write_temp(ipath, lambda f: f.write(text.encode()))
    except BaseException:
        npy.unlink(missing_ok=True)
        raise
    replace_all([(meta, ipath), (npy, output)], stop=stop)


class _Writes:
    """A file object that only has write(): np.save then writes in chunks through it."""

    def __init__(self, f):
        self.write = f.write


def iter_embeddings(encoder, folder: Path, files: list[Path], *, on_progress=None, whiten: bool = True):
    """Decode and embed `files` CHUNK at a time: yields (kept paths, skipped, uint8 images, features).
    `whiten=False` (a Flax Encoder's option): the features before the run's whitening.

    Memory holds one chunk of images, whatever the folder size.
    """
    opts = {} if whiten else {"whiten": False}
    with decode_pool() as pool:
        for start in range(0, len(files), CHUNK):
            images, kept, bad = decode_files(folder, files[start:start + CHUNK], encoder.image_size, pool=pool,
                                             on_progress=on_progress, progress_offset=start,
                                             progress_total=len(files))
            yield kept, bad, images, (encoder.embed(images, **opts) if kept else None)


def _tell(encoder, on_warning: Callable[[str], None] | None) -> None:
    for note in encoder.notes if on_warning is not None else ():
        on_warning(note)


def similarity(a: Path, b: Path, run_dir: Path, *, on_warning: Callable[[str], None] | None = None) -> float:
    """Cosine similarity of two images' embeddings under the run's encoder, in [-1, 1].
    `on_warning` gets the encoder's notes (see embed_folder)."""
    for p in (a, b):
        if not Path(p).is_file():
            raise InputError(f"image not found: {p}")
    encoder = load_model(run_dir, batch_size=2, quick=True)
    _tell(encoder, on_warning)
    za, zb = embed_files(encoder, [a, b])
    return float(np.clip(za @ zb, -1.0, 1.0))


def read_pairs(lines: Iterable[str], name: str) -> list[tuple[str, str]]:
    """Image pairs from "A B" lines (`similarity --pairs`): a tab between the two paths, else shell
    words (quote a path that holds spaces). Blank lines and lines starting with # are skipped.
    Raises InputError naming the first line of `name` that does not hold exactly two paths."""
    pairs = []
    for n, line in enumerate(lines, 1):
        text = line.rstrip("\r\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        if "\t" in text:
            fields = [f for f in text.split("\t") if f]
        else:
            try:
                fields = shlex.split(text)
            except ValueError as e:  # an unclosed quote
                raise InputError(f"{name} line {n}: {e}") from None
        if len(fields) != 2:
            raise InputError(f"{name} line {n}: expected two image paths, found {len(fields)}: {text[:80]!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise InputError(f"{name} holds no pairs (lines of two image paths)")
    return pairs


def similarity_pairs(pairs: list[tuple[str, str]], run_dir: Path, *, on_warning: Callable[[str], None] | None = None,
                     batch_size: int = 128) -> list[float | None]:
    """Cosine similarity of each (a, b) pair, in one process: every distinct image decoded once
    (in threads) and embedded in batches. A pair with an image that cannot be read scores None;
    `on_warning` gets one line per such image (and the encoder's notes)."""
    encoder = load_model(run_dir, batch_size=batch_size, quick=True)
    _tell(encoder, on_warning)
    files = list(dict.fromkeys(p for pair in pairs for p in pair))  # distinct, in first-seen order
    row: dict[str, int] = {}
    features = []
    with decode_pool() as pool, quiet_pillow():
        for start in range(0, len(files), CHUNK):
            chunk = files[start:start + CHUNK]
            decoded = pool.map(lambda f: decode_or_reason(Path(f), encoder.image_size)
                               if Path(f).is_file() else "not found", chunk)
            images = []
            for f, out in zip(chunk, decoded):
                if isinstance(out, str):
                    if on_warning is not None:
                        on_warning(f"cannot read {f}: {out}")
                    continue
                row[f] = len(row)
                images.append(out)
            if images:
                features.append(encoder.embed(np.stack(images)))
    z = np.concatenate(features) if features else np.empty((0, 0), np.float32)
    return [float(np.clip(z[row[a]] @ z[row[b]], -1.0, 1.0)) if a in row and b in row else None for a, b in pairs]
