"""PCA whitening of embeddings: fitted on a run's training images when it saves, applied by `embed`.

A contrastive encoder's features spread their variance over a few directions: a handful of axes
(lighting, overall colour, scale) dominate every cosine, and the directions that tell similar
classes apart barely count. Whitening rotates the centred unit features u onto their principal axes
and divides each axis by its spread, so each of the first `WHITEN_DIM` directions weighs the same;
rows are L2-normalised again, so a dot product stays a cosine:

    z = unit((u - mean) @ matrix),   matrix = V[:, :K] / sqrt(max(var_k, FLOOR * var_1))

(the whitening of Jégou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV
2012, as image retrieval uses it). Measured on five labeled sets, on the same trained runs,
whitening the 4 x 4 map raised kNN-20 from 0.665 to 0.700 and lightly's features from 0.546 to
0.621 (BENCHMARKS.md, "Session 14"); a fit on 2,048 images scored as one on all of a set's
(2,320-10,000), one on 64 images as the unwhitened features. The floor keeps the weakest axes from
amplifying noise. A linear probe is better off without it (it learns its own scaling): evaluate
probes the unwhitened features.
"""
from __future__ import annotations

import numpy as np

WHITEN_DIM = 512  # kept axes: 256 and 1,024 scored within 0.3 points of 512 (BENCHMARKS.md, "Session 14")
FLOOR = 0.01  # each axis' variance is floored at this fraction of the largest's
MIN_AXES = 127  # training images spanning fewer axes are not whitened: 128 images (127 axes) gained 1.3
# points of kNN, 64 none (BENCHMARKS.md, "Session 15"), and a whitened row keeps only the axes they span
NULL = 1e-9  # axes with less variance than this fraction of the largest's are null: the rows do not span
# them (repeated images, dead features); their directions are rounding noise, and at the floor's weight
# they took kNN from 0.37 to 0.19 on a set with repeated icons


def fit(u: np.ndarray, dim: int = WHITEN_DIM) -> tuple[np.ndarray, np.ndarray]:
    """(mean float32 [D], matrix float32 [D, K]) whitening the rows of `u` (float [N, D], N >= 2):
    K = min(dim, the number of axes the centred rows span) (at most N - 1; fewer when rows repeat).
    Decomposes the N x N Gram matrix when N < D (a 2,048 x 4,096 fit: one 2,048 x 2,048 eigh), else
    the D x D covariance, in float64."""
    x = np.asarray(u, np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"whitening needs at least 2 rows, not {n}")
    mean = x.mean(axis=0)
    x = x - mean
    k = min(dim, d, n - 1)
    if n < d:
        var, left = np.linalg.eigh(x @ x.T)  # ascending
        var, left = var[::-1][:k], left[:, ::-1][:, :k]
        axes = x.T @ left / np.sqrt(np.maximum(var, 1e-30))  # [D, K]: unit right singular vectors
    else:
        var, axes = np.linalg.eigh(x.T @ x)
        var, axes = var[::-1][:k], axes[:, ::-1][:, :k]
    var = np.maximum(var, 0.0) / (n - 1)
    spanned = int(np.count_nonzero(var > NULL * max(var[0], 1e-30)))
    var, axes = var[:spanned], axes[:, :spanned]
    matrix = axes / np.sqrt(np.maximum(var, FLOOR * max(var[0], 1e-30)))
    return mean.astype(np.float32), matrix.astype(np.float32)


def apply(u: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """float32 [N, K] unit rows: unit feature rows `u` [N, D] whitened by `fit`'s (mean, matrix)."""
    z = (np.asarray(u, np.float32) - mean) @ matrix
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
