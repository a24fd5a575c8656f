"""How good is an encoder? kNN and linear-probe accuracy on a labeled folder (class = subfolder).

Protocols (the usual ones for self-supervised representations):
- kNN (Wu et al. 2018, as in DINO and solo-learn): the k = 20 nearest training embeddings by cosine
  vote for their class with weight exp(s / 0.07); streamed in chunks by `search.top_k`, so memory
  never holds a test x train matrix.
- Linear probe: multinomial logistic regression on frozen, standardised features, trained with
  optax (Adam, minibatches, weight decay), one jit-compiled loop. It reads the features before the
  run's whitening (infer/whiten.py): a probe learns its own scaling, and whitened unit rows cost it
  3.9 points (BENCHMARKS.md, "Session 14"); kNN reads what `embed` writes.
Both are also reported on raw pixels (downsampled to at most 32 x 32) as the floor to beat.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data.scan import no_usable_image, scan_images
from ..errors import InputError
from .embed import iter_embeddings
from .encoder import Encoder, load_encoder
from .knn import KNN_K, class_labels, knn_accuracy, stratified_split

RAW_SIZE = 32


@dataclass
class Features:
    """Row i: embedding (unit), the features before whitening (unit), raw pixels (unit), class index, path."""

    emb: np.ndarray  # float32 [N, D]: what `embed` writes
    feat: np.ndarray  # float32 [N, G*G*F]: before the run's whitening (emb itself for a run without one)
    raw: np.ndarray  # float32 [N, P]
    labels: np.ndarray  # int64 [N]
    paths: list[str]
    skipped: list[tuple[str, str]]


def _raw_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32 [n, P]: block-averaged to <= RAW_SIZE, centred per image, unit."""
    s = images.shape[1]
    f = max(1, -(-s // RAW_SIZE))
    s2 = s // f
    x = images[:, :s2 * f, :s2 * f].astype(np.float32).reshape(len(images), s2, f, s2, f, 3).mean((2, 4))
    x = x.reshape(len(images), -1)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def labeled_features(encoder: Encoder, folder: Path, classes: list[str] | None = None,
                     on_progress=None) -> tuple[Features, list[str]]:
    """Embed a labeled folder (class = first-level subfolder). Returns features and class names."""
    folder = Path(folder)
    files = scan_images(folder)
    _, found = class_labels([f.relative_to(folder).as_posix() for f in files], folder, min_classes=1)
    names = classes or found
    lookup = {c: i for i, c in enumerate(names)}
    emb, feat, raw, labels, paths, skipped = [], [], [], [], [], []
    for kept, bad, images, feats in iter_embeddings(encoder, folder, files, on_progress=on_progress, whiten=False):
        skipped += bad
        if not kept:
            continue
        cls = [p.split("/", 1)[0] for p in kept]
        unknown = sorted(set(cls) - lookup.keys())
        if unknown:
            raise InputError(f"class {unknown[0]!r} in {folder} is not among the training classes")
        emb.append(encoder.whiten(feats))
        feat.append(feats)
        raw.append(_raw_pixels(images))
        labels += [lookup[c] for c in cls]
        paths += kept
    if not paths:
        raise no_usable_image(folder, len(files), skipped)
    return Features(np.concatenate(emb), np.concatenate(feat), np.concatenate(raw), np.asarray(labels), paths,
                    skipped), names


def linear_probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                          test_labels: np.ndarray, *, epochs: int = 100, batch_size: int = 1024,
                          lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Logistic regression on standardised frozen features; accuracy on `test`."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    xtr = jnp.asarray((train - mean) / std, jnp.float32)
    xte = jnp.asarray((test - mean) / std, jnp.float32)
    ytr = jnp.asarray(train_labels)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    b = min(batch_size, len(train))
    steps_per_epoch = len(train) // b
    tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), weight_decay=weight_decay)
    params = {"w": jnp.zeros((train.shape[1], n_classes)), "b": jnp.zeros(n_classes)}

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    @jax.jit
    def fit(params, key):
        def epoch(carry, key):
            params, opt = carry
            order = jax.random.permutation(key, len(train))[:steps_per_epoch * b].reshape(steps_per_epoch, b)

            def step(carry, idx):
                params, opt = carry
                grads = jax.grad(loss_fn)(params, xtr[idx], ytr[idx])
                updates, opt = tx.update(grads, opt, params)
                return (optax.apply_updates(params, updates), opt), None

            return jax.lax.scan(step, (params, opt), order)[0], None

        return jax.lax.scan(epoch, (params, tx.init(params)), jax.random.split(key, epochs))[0][0]

    params = fit(params, jax.random.key(seed))
    pred = np.asarray(jnp.argmax(xte @ params["w"] + params["b"], axis=1))
    return float((pred == test_labels).mean())


def evaluate(
    folder: Path | None,
    run_dir: Path | None,
    *,
    train_dir: Path | None = None,
    test_dir: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    k: int = KNN_K,
    encoder: Encoder | None = None,
    raw: bool = True,
    embed_grid: int = 0,
    on_progress=None,
    on_warning=None,
) -> dict:
    """kNN and linear-probe accuracy of the run's encoder (and of raw pixels) on labeled images.

    Either `folder` (split per class with `test_fraction`, seeded) or `train_dir` and `test_dir`.
    `embed_grid` > 0 overrides the run's embedding grid (see load_encoder). `on_warning(line)` gets
    the encoder's notes (an unreadable newest checkpoint passed over).
    """
    if (folder is None) == (train_dir is None or test_dir is None):
        raise InputError("give a labeled folder, or both --train and --test folders")
    if not 0 < test_fraction < 1:
        raise InputError(f"test fraction {test_fraction} is not in (0, 1)")
    encoder = encoder or load_encoder(run_dir, embed_grid=embed_grid)
    for note in encoder.notes if on_warning is not None else ():
        on_warning(note)
    if folder is not None:
        feats, classes = labeled_features(encoder, folder, on_progress=on_progress)
        tr, te = stratified_split(feats.labels, test_fraction, seed=seed)
        a, b = (Features(feats.emb[i], feats.feat[i], feats.raw[i], feats.labels[i], [feats.paths[j] for j in i], bad)
                for i, bad in ((tr, feats.skipped), (te, [])))
    else:
        a, classes = labeled_features(encoder, train_dir, on_progress=on_progress)
        b, _ = labeled_features(encoder, test_dir, classes=classes, on_progress=on_progress)
    if len(classes) < 2:
        raise InputError(f"found {len(classes)} class subfolder; evaluation needs at least 2 classes")
    result = {
        "model": str(encoder.run_dir), "step": encoder.step, "embed_grid": encoder.cfg.model.embed_grid,
        "dim": encoder.dim, "classes": len(classes),
        "n_train": len(a.labels), "n_test": len(b.labels), "k": k,
        "knn": knn_accuracy(a.emb, a.labels, b.emb, b.labels, k=k),
        "linear": linear_probe_accuracy(a.feat, a.labels, b.feat, b.labels, seed=seed),
        "skipped": len(a.skipped) + len(b.skipped),
    }
    if raw:
        result["raw_knn"] = knn_accuracy(a.raw, a.labels, b.raw, b.labels, k=k)
        result["raw_linear"] = linear_probe_accuracy(a.raw, a.labels, b.raw, b.labels, seed=seed)
    return result
