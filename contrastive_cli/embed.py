"""Folder -> embeddings.npy + index; similarity of two images.

Embeddings are the encoder's features h (before the projection head; SimCLR section 4.2: "the
hidden layer before the projection head is a better representation than the layer after"),
L2-normalised, so a dot product is a cosine. Images are decoded as in training (EXIF, RGB), their
shorter side resized to the model's image size and centre-cropped; no augmentation.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import augment, checkpoint
from .config import TrainConfig
from .data import (IMAGE_EXTENSIONS, _decode_or_reason, decode_files, decode_pool, no_usable_image, quiet_pillow,
                   scan_folder)
from .errors import CheckpointError, InputError
from .models import feature_dim
from .mesh import batch_sharding, data_mesh, replicated
from .runtime import enable_compilation_cache

CHUNK = 1024  # images decoded at a time: memory stays bounded on folders of any size


@dataclass
class Encoder:
    """A trained encoder, ready to embed: `embed(uint8 [N, S, S, 3]) -> float32 [N, F]` unit rows."""

    cfg: TrainConfig
    run_dir: Path
    step: int
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: nnx.State
    batch_size: int = 128

    def __post_init__(self):
        self._mesh = data_mesh()
        n = self._mesh.devices.size
        self.batch_size = -(-self.batch_size // n) * n  # a multiple of the device count
        repl = replicated(self._mesh)
        self._forward = jax.jit(unit_features(self.graphdef, self.cfg), in_shardings=(repl, repl, batch_sharding(self._mesh)))

    @property
    def image_size(self) -> int:
        return self.cfg.model.image_size

    @property
    def dim(self) -> int:
        return feature_dim(self.cfg.model)

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = np.empty((len(images), self.dim), np.float32)
        b = self.batch_size
        for i in range(0, len(images), b):
            chunk = images[i:i + b]
            n = len(chunk)
            if n < b:  # pad to the compiled shape: one compile whatever the folder size
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            out[i:i + n] = np.asarray(self._forward(self.params, self.stats, chunk))[:n]
        return out


def unit_features(graphdef: nnx.GraphDef, cfg: TrainConfig):
    """(params, stats, uint8 images [B, S, S, 3]) -> their embeddings [B, feature_dim], unit rows:
    what `embed` writes and every kNN (evaluate, the pretrain probe) compares."""

    def forward(params, stats, images):
        model = nnx.merge(graphdef, params, stats)
        h = model.embed(augment.normalize(images, cfg.augment), cfg.model.embed_grid)
        return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)

    return forward


def load_encoder(run_dir: Path, *, batch_size: int = 128, embed_grid: int = 0) -> Encoder:
    """Rebuild the model from RUN/config.json and restore its latest checkpoint.

    `embed_grid` > 0 overrides the run's embedding grid (ModelConfig.embed_grid) for this encoder;
    the weights do not depend on it.
    """
    from .train import make_optimizer

    enable_compilation_cache()
    run_dir = Path(run_dir)
    cfg = checkpoint.read_config(run_dir)
    if embed_grid:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_grid=embed_grid))
    tx = make_optimizer(cfg)
    graphdef, abstract = _abstract_state(cfg, tx)
    mngr = checkpoint.manager(run_dir, cfg.keep_checkpoints)
    try:
        if mngr.latest_step() is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (was its pretrain interrupted before the first save?)")
        step, state = checkpoint.restore(mngr, abstract)
    finally:
        mngr.close()
    return Encoder(cfg, run_dir, step, graphdef, state["params"], state["stats"], batch_size)


def random_encoder(cfg: TrainConfig, *, batch_size: int = 128) -> Encoder:
    """An untrained encoder (cfg.seed's initialisation): the baseline a trained one must beat."""
    from .train import init_state, make_optimizer

    enable_compilation_cache()
    graphdef, state = init_state(cfg, make_optimizer(cfg))
    return Encoder(cfg, Path("(random init)"), 0, graphdef, state["params"], state["stats"], batch_size)


def _abstract_state(cfg: TrainConfig, tx):
    from .train import init_state

    holder = {}

    def build():
        graphdef, state = init_state(cfg, tx)
        holder["graphdef"] = graphdef
        return state

    shapes = jax.eval_shape(build)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    return holder["graphdef"], abstract


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    on_progress=None,
) -> dict:
    """Embed every usable image under `folder` with the run's encoder; write `output` and its index.

    Returns the index dict (also written to output with a .json suffix). Row i of the array is
    index["paths"][i]. Files that cannot be decoded are left out and listed in index["skipped"].
    """
    folder, output = Path(folder), Path(output)
    if output.suffix != ".npy":
        raise InputError(f"output {output} must end in .npy (the index is written beside it as .json)")
    if dtype not in ("float32", "float16"):
        raise InputError(f"dtype {dtype!r} must be float32 or float16")
    for p in (output, index_path(output)):
        if p.exists() and not force:
            raise InputError(f"{p} already exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise InputError(f"output folder {output.parent} does not exist")
    skipped: list[tuple[str, str]] = []  # (relative path, reason): unreadable folders, then files
    files = scan_folder(folder, skipped=skipped)
    if not files:
        raise InputError(f"no image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    encoder = load_encoder(run_dir, batch_size=batch_size)
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
    _save_npy_atomic(output, array)
    checkpoint.write_json_atomic(index_path(output), index)
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


def embed_files(encoder: Encoder, paths: list[Path]) -> np.ndarray:
    """Embed individual image files; raises InputError naming the first that cannot be read."""
    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"image not found: {p}")
        with quiet_pillow():
            out = _decode_or_reason(p, encoder.image_size)
        if isinstance(out, str):
            raise InputError(f"cannot read {p}: {out}")
        images.append(out)
    return encoder.embed(np.stack(images))


def similarity(a: Path, b: Path, run_dir: Path) -> float:
    """Cosine similarity of two images' embeddings under the run's encoder, in [-1, 1]."""
    for p in (a, b):
        if not Path(p).is_file():
            raise InputError(f"image not found: {p}")
    encoder = load_encoder(run_dir, batch_size=2)
    za, zb = embed_files(encoder, [a, b])
    return float(np.clip(za @ zb, -1.0, 1.0))
