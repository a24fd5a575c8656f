"""kNN evaluation of embeddings: class labels from subfolders, a seeded per-class split, weighted
kNN accuracy (Wu et al. 2018, as DINO and solo-learn: the k = 20 nearest training embeddings by
cosine vote for their class with weight exp(s / 0.07), streamed by `search.top_k`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .search import top_k

KNN_K = 20
KNN_TEMPERATURE = 0.07


def class_labels(paths: list[str], folder: Path, *, min_classes: int = 2) -> tuple[np.ndarray, list[str]]:
    """Class index of each relative path (its first folder) and the sorted class names.

    Raises InputError for an image outside every class subfolder, or fewer than `min_classes`."""
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise InputError(f"{folder} is not a labeled folder: {len(loose)} image(s) such as {loose[0]!r} "
                         "are not inside a class subfolder")
    names = sorted({p.split("/", 1)[0] for p in paths})
    if len(names) < min_classes:
        raise InputError(f"{folder} has {len(names)} class subfolder; a kNN probe needs at least {min_classes} classes")
    lookup = {c: i for i, c in enumerate(names)}
    return np.asarray([lookup[p.split("/", 1)[0]] for p in paths]), names


def stratified_split(labels: np.ndarray, test_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): `test_fraction` of each class (at least one) goes to test, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise InputError(f"class {c} has {len(idx)} image; each class needs at least 2 to split")
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                 *, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Weighted kNN accuracy with cosine similarity (rows need not be normalised)."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    k = min(k, len(train))
    scores, idx = top_k(unit(test).astype(np.float32), unit(train).astype(np.float32), k)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = np.zeros((len(test), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(test)), k), train_labels[idx].ravel()),
              np.exp(scores / temperature).ravel())
    return float((votes.argmax(1) == test_labels).mean())
