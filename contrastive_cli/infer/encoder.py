"""A trained encoder loaded for inference: the model alone (no optimizer), a jitted forward pass
that writes unit embeddings, and the embedding of single image files.

Embeddings are the encoder's features h (before the projection head; SimCLR section 4.2: "the
hidden layer before the projection head is a better representation than the layer after"),
L2-normalised, so a dot product is a cosine. Images are decoded as in training (EXIF, RGB), their
shorter side resized to the model's image size and centre-cropped; no augmentation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoint
from ..config import TrainConfig
from ..data.decode import decode_or_reason, quiet_pillow
from ..errors import InputError
from ..mesh import batch_sharding, data_mesh, global_batch, local_rows, replicated
from ..nn import augment
from ..nn.conv import resolve
from ..nn.models import build_model, feature_dim


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
    # What loading had to say (a newest checkpoint that could not be read, passed over): for the CLI
    # to show; the library prints nothing.
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self._mesh = data_mesh()
        self._forward = sharded_forward(self.graphdef, self.cfg, self._mesh)

    @property
    def image_size(self) -> int:
        return self.cfg.model.image_size

    @property
    def dim(self) -> int:
        return feature_dim(self.cfg.model)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return embed_in_batches(self._forward, self.params, self.stats, images, self._mesh, self.batch_size)


def unit_features(graphdef: nnx.GraphDef, cfg: TrainConfig):
    """(params, stats, uint8 images [B, S, S, 3]) -> their embeddings [B, feature_dim], unit rows:
    what `embed` writes and every kNN (evaluate, the pretrain probe) compares."""

    def forward(params, stats, images):
        model = nnx.merge(graphdef, params, stats)
        h = model.embed(augment.normalize(images, cfg.augment), cfg.model.embed_grid)
        return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)

    return forward


def sharded_forward(graphdef: nnx.GraphDef, cfg: TrainConfig, mesh):
    """`unit_features` jitted over `mesh`: the batch split over its devices, the embeddings
    replicated (every process gets all rows)."""
    repl = replicated(mesh)
    return jax.jit(unit_features(graphdef, cfg), in_shardings=(repl, repl, batch_sharding(mesh)), out_shardings=repl)


def embed_in_batches(forward, params, stats, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """float32 [N, F]: `forward` (sharded_forward's) over uint8 `images` [N, S, S, 3], `batch_size`
    rows at a time (rounded up to a multiple of the devices; the last batch padded to that shape,
    so one compile serves any N). Every process passes all N rows and feeds its devices' share."""
    n_dev = mesh.devices.size
    b = -(-batch_size // n_dev) * n_dev
    sharding = batch_sharding(mesh)
    rows = local_rows(sharding, b)
    out = []
    for i in range(0, len(images), b):
        chunk = np.asarray(images[i:i + b])
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(forward(params, stats, global_batch(chunk[rows], sharding, b)))[:n])
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def load_encoder(run_dir: Path, *, batch_size: int = 128, embed_grid: int = 0, conv: str | None = None) -> Encoder:
    """Rebuild the model from RUN/config.json and restore its latest checkpoint's model (parameters
    and BatchNorm statistics; no optimizer state is read or built).

    `embed_grid` > 0 overrides the run's embedding grid (ModelConfig.embed_grid) for this encoder;
    `conv` (config.CONVS, or "auto": nn.conv.resolve) the convolution it runs; the weights depend
    on neither.
    """
    run_dir = Path(run_dir)
    cfg = checkpoint.read_config(run_dir)
    model = dict(embed_grid=embed_grid or cfg.model.embed_grid, conv=resolve(conv or cfg.model.conv))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    graphdef, abstract = _abstract_model(cfg)
    notes: list[str] = []
    step, restored = checkpoint.restore_model(run_dir, abstract, warn=notes.append)
    return Encoder(cfg, run_dir, step, graphdef, restored["params"], restored["stats"], batch_size, notes)


def random_encoder(cfg: TrainConfig, *, batch_size: int = 128) -> Encoder:
    """An untrained encoder (cfg.seed's initialisation): the baseline a trained one must beat."""
    graphdef, params, stats = nnx.split(build_model(cfg), nnx.Param, ...)
    return Encoder(cfg, Path("(random init)"), 0, graphdef, params, stats, batch_size)


def _abstract_model(cfg: TrainConfig) -> tuple[nnx.GraphDef, dict]:
    """The model's graph and {params, stats} as shapes on the first device: no array is allocated."""
    holder = {}

    def build():
        holder["graphdef"], params, stats = nnx.split(build_model(cfg), nnx.Param, ...)
        return {"params": params, "stats": stats}

    shapes = jax.eval_shape(build)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    return holder["graphdef"], abstract


def embed_files(encoder: Encoder, paths: list[Path]) -> np.ndarray:
    """Embed individual image files; raises InputError naming the first that cannot be read."""
    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"image not found: {p}")
        with quiet_pillow():
            out = decode_or_reason(p, encoder.image_size)
        if isinstance(out, str):
            raise InputError(f"cannot read {p}: {out}")
        images.append(out)
    return encoder.embed(np.stack(images))
