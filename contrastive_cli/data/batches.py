"""Seeded batch order: which images each training step sees, a pure function of (n, batch, step, seed)."""
from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `n` images in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int) -> np.ndarray:
    """Indices of the images in training step `step` (0-based); epochs drop the last partial batch.

    A pure function of (n, batch_size, step, seed), so a resumed run sees the same data order.
    """
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(n, seed=seed, epoch=epoch)[i * batch_size:(i + 1) * batch_size]
