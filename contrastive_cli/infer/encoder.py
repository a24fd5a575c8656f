"""A trained encoder loaded for inference: the model alone (no optimizer), a jitted forward pass
that writes unit embeddings, and the embedding of single image files.

Embeddings are the encoder's features h (before the projection head; SimCLR section 4.2: "the
hidden layer before the projection head is a better representation than the layer after"), less
the run's centre (the mean of h over its training images, saved with each checkpoint: one per cell
of the embedding grid since 0.3.1; runs saved before hold the grid-1 mean, used for every cell), then
L2-normalised, so a dot product is a cosine. Features after a ReLU all share one positive
direction, so uncentred cosines of unrelated images sit at 0.5-0.8 depending on the run; centred,
unrelated images like the training images score near 0 and edited copies of one image near 1
(BENCHMARKS.md, "Similarity scale"; kNN accuracy moved by -1.7 to +2.2 points there). Runs saved
since 0.4.0 also hold a PCA whitening of those unit rows (infer/whiten.py: mean [G*G*F] and
matrix [G*G*F, K]), fitted on the same training images; embeddings are then the whitened rows, K
wide, L2-normalised again. Runs saved before 0.2.1 have no centre and embed as before. Images are
decoded as in training (EXIF, RGB), their shorter side resized to the model's image size and
centre-cropped; no augmentation.
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
from ..errors import CheckpointError
from ..mesh import batch_sharding, data_mesh, global_batch, local_rows, replicated
from ..nn import augment
from ..nn.conv import resolve
from ..nn.models import build_model, feature_dim
from . import whiten as whitening_


@dataclass
class Encoder:
    """A trained encoder, ready to embed: `embed(uint8 [N, S, S, 3]) -> float32 [N, dim]` unit rows."""

    cfg: TrainConfig
    run_dir: Path
    step: int
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: nnx.State
    batch_size: int = 128
    # float32 [G*G*F] (one per grid cell) or [F] (every cell's, as runs before 0.3.1 saved it):
    # subtracted from h before normalising (None: a run saved without one)
    centre: np.ndarray | None = None
    # (mean float32 [G*G*F], matrix float32 [G*G*F, K]): the run's whitening of the centred unit
    # features (infer/whiten.py), or None (a run saved before 0.4.0, or read on another grid)
    whitening: tuple[np.ndarray, np.ndarray] | None = None
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
        """Width of what `embed` writes: the whitening's K, else the features' G*G*F."""
        return self.whitening[1].shape[1] if self.whitening is not None else feature_dim(self.cfg.model)

    @property
    def name(self) -> str:
        return self.cfg.model.encoder

    @property
    def source(self) -> str:
        return str(self.run_dir)

    def embed(self, images: np.ndarray, *, whiten: bool = True) -> np.ndarray:
        """float32 [N, dim] unit rows; `whiten=False`: the centred unit features [N, G*G*F] before
        the whitening (`self.whiten` turns them into what `embed` writes)."""
        centre = self.centre if self.centre is not None else no_centre(self.cfg)
        return embed_in_batches(self._forward, self.params, self.stats, images, self._mesh, self.batch_size,
                                centre=centre, whitening=self.whitening if whiten else None)

    def whiten(self, features: np.ndarray) -> np.ndarray:
        """`embed(images)` from `embed(images, whiten=False)`, without another forward pass."""
        return features if self.whitening is None else whitening_.apply(features, *self.whitening)


def unit_features(graphdef: nnx.GraphDef, cfg: TrainConfig, *, unit: bool = True):
    """(params, stats, uint8 images [B, S, S, 3], centre [G*G*F] or [F], whitening (mean [G*G*F],
    matrix [G*G*F, K]) or None) -> their embeddings: h less the centre (per cell, or [F] for every
    cell), unit rows [B, G*G*F]; whitened by `whitening` to unit rows [B, K] when given: what
    `embed` writes and every kNN (evaluate, the pretrain probe) compares. `unit=False`: h itself."""
    grid = cfg.model.embed_grid

    def forward(params, stats, images, centre, whitening=None):
        model = nnx.merge(graphdef, params, stats)
        h = model.embed(augment.normalize(images, cfg.augment), grid)
        if not unit:
            return h
        # [B, G*G*F]: cells in row-major order, F each
        h = h - (centre if centre.shape[-1] == h.shape[-1] else jnp.tile(centre, grid * grid))
        u = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
        if whitening is None:
            return u
        mean, matrix = whitening
        z = jnp.dot(u - mean, matrix, precision=jax.lax.Precision.HIGHEST)  # [B, K]
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    return forward


def sharded_forward(graphdef: nnx.GraphDef, cfg: TrainConfig, mesh, *, unit: bool = True):
    """`unit_features` jitted over `mesh`: the batch split over its devices, the embeddings
    replicated (every process gets all rows)."""
    repl = replicated(mesh)
    return jax.jit(unit_features(graphdef, cfg, unit=unit), in_shardings=(repl, repl, batch_sharding(mesh), repl, repl),
                   out_shardings=repl)


READOUT_IMAGES = 2048  # training images a run's centre and whitening are fitted on, at every save and probe:
# a whitening fitted on 2,048 scored as one on all of a set's images (BENCHMARKS.md, "Session 15"); their
# forward pass took 1.2 s for the small CNN and 38 s for ResNet-18 at 32 px on 2 AVX2 cores


def readout_stats(graphdef: nnx.GraphDef, cfg: TrainConfig, mesh, params, stats,
                  images: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(centre float32 [G*G*F], whitening (mean, matrix) or None): the mean of h on the run's
    embedding grid, per cell, over up to READOUT_IMAGES of `images` (uint8 [N, R, R, 3], any R:
    resized to the model's size as embed's decoding would give, near enough), chosen with cfg.seed,
    and the PCA whitening (infer/whiten.py) of those rows centred and unit (None when they span
    fewer than whiten.MIN_AXES axes: fewer than 128 images, or as few distinct ones). Every process passes the same rows (a collective) and gets the same
    result. Per cell, because the cells' means differ (a corner is not the middle): centred on the
    global mean alone, unrelated images of a grid-2 run still scored 0.23-0.48 (BENCHMARKS.md,
    "Session 14"), per cell about 0."""
    pick = np.random.default_rng(cfg.seed).permutation(len(images))[:READOUT_IMAGES]
    sample = np.asarray(images[np.sort(pick)])
    size = cfg.model.image_size
    if sample.shape[1:3] != (size, size):
        sample = np.asarray(_resize(jnp.asarray(sample), size))
    forward = sharded_forward(graphdef, cfg, mesh, unit=False)
    h = embed_in_batches(forward, params, stats, sample, mesh, 256, centre=no_centre(cfg))
    centre = h.mean(axis=0).astype(np.float32)
    u = h - centre
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    whitening = whitening_.fit(u) if len(u) > whitening_.MIN_AXES else None
    if whitening is not None and whitening[1].shape[1] < whitening_.MIN_AXES:
        whitening = None  # too few distinct images
    return centre, whitening


@jax.jit(static_argnames="size")
def _resize(images, size: int):
    x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, 3), "linear", antialias=True)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def no_centre(cfg: TrainConfig) -> np.ndarray:
    """Zeros [F] (for every cell): embeddings of h itself, as runs without a centre give."""
    return np.zeros(feature_dim(dataclasses.replace(cfg.model, embed_grid=1)), np.float32)


def embed_in_batches(forward, params, stats, images: np.ndarray, mesh, batch_size: int, *,
                     centre: np.ndarray, whitening: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """float32 [N, F]: `forward` (sharded_forward's) over uint8 `images` [N, S, S, 3], `batch_size`
    rows at a time (rounded up to a multiple of the devices; the last batch padded to that shape,
    so one compile serves any N). Every process passes all N rows and feeds its devices' share.
    `centre` [F]: subtracted from h (`no_centre(cfg)`: zeros); `whitening`: see `unit_features`."""
    centre = jax.device_put(jnp.asarray(centre, jnp.float32), replicated(mesh))
    if whitening is not None:
        whitening = jax.device_put(tuple(jnp.asarray(w, jnp.float32) for w in whitening), replicated(mesh))
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
        out.append(np.asarray(forward(params, stats, global_batch(chunk[rows], sharding, b), centre, whitening))[:n])
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def load_encoder(run_dir: Path, *, batch_size: int = 128, embed_grid: int = 0, conv: str | None = None) -> Encoder:
    """Rebuild the model from RUN/config.json and restore its latest checkpoint's model (parameters
    and BatchNorm statistics; no optimizer state is read or built).

    `embed_grid` > 0 overrides the run's embedding grid (ModelConfig.embed_grid) for this encoder
    (another grid than the run's is read without its whitening, fitted on the run's grid; `notes`
    says so); `conv` (config.CONVS, or "auto": nn.conv.resolve) the convolution it runs; the weights
    depend on neither.
    """
    run_dir = Path(run_dir)
    cfg = checkpoint.read_config(run_dir)
    saved_grid = cfg.model.embed_grid
    model = dict(embed_grid=embed_grid or cfg.model.embed_grid, conv=resolve(conv or cfg.model.conv))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    graphdef, abstract = _abstract_model(cfg)
    notes: list[str] = []
    step, restored = checkpoint.restore_model(run_dir, abstract, warn=notes.append)
    centre = _centre_for(restored["centre"], cfg, saved_grid, run_dir, step)
    whitening = restored["whitening"]
    if whitening is not None and cfg.model.embed_grid != saved_grid:
        notes.append(f"{run_dir}: embedding grid {cfg.model.embed_grid} is not the run's {saved_grid}, so its whitening "
                     f"(fitted on grid {saved_grid}) is not applied: embeddings are the centred features")
        whitening = None
    elif whitening is not None and whitening[1].shape[0] != feature_dim(cfg.model):
        raise CheckpointError(f"checkpoint {run_dir} step {step}: its whitening is for {whitening[1].shape[0]} "
                              f"features, not the model's {feature_dim(cfg.model)}")
    return Encoder(cfg, run_dir, step, graphdef, restored["params"], restored["stats"], batch_size, centre,
                   whitening, notes)


def _centre_for(centre: np.ndarray | None, cfg: TrainConfig, saved_grid: int, run_dir: Path, step: int):
    """The saved centre as `cfg`'s grid uses it: per cell when saved on that grid; the mean of the
    saved cells ([F], for every cell) when read on another grid (`embed_grid` overridden); [F] as
    runs before 0.3.1 saved it."""
    if centre is None:
        return None
    width = no_centre(cfg).shape[0]
    if centre.shape == (saved_grid * saved_grid * width,) and saved_grid > 1:
        return centre if cfg.model.embed_grid == saved_grid else centre.reshape(-1, width).mean(axis=0)
    if centre.shape != (width,):
        raise CheckpointError(f"checkpoint {run_dir} step {step}: its centre has shape {centre.shape}, not that "
                              f"of the model's {width} features (or {saved_grid}x{saved_grid} cells of them)")
    return centre


def random_encoder(cfg: TrainConfig, *, batch_size: int = 128) -> Encoder:
    """An untrained encoder (cfg.seed's initialisation): the baseline a trained one must beat."""
    graphdef, params, stats = nnx.split(build_model(cfg), nnx.Param, ...)
    return Encoder(cfg, Path("(random init)"), 0, graphdef, params, stats, batch_size)  # no centre


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
