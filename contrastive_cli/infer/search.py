"""Nearest neighbours and near-duplicates over an embeddings file, in bounded memory.

Rows are unit vectors (see embed.py), so a dot product is a cosine. Nothing here builds an N x N
matrix: `top_k` streams the embeddings in chunks of `chunk` rows through faiss's exact k-NN (merged
into the running top k), and `duplicate_pairs` streams row blocks x column blocks through NumPy's
BLAS, so memory is bounded by the chunk size whatever N is. Inputs may be float16 or float32 (a
`np.load(mmap_mode="r")` memmap included); scores are computed in float32 (near-duplicate
thresholds sit in the third decimal). Both run on the host's CPUs: the embeddings file is there.

Rows that are not finite (NaN or infinite: a diverged model, a damaged file) would score NaN or
+-1 against everything; `top_k` and `duplicate_pairs` take a `valid` mask that leaves them out, and
the commands' twins (find.py) build it (`finite_rows`) and warn about what they left out. This is
the exact search; ann.py is the approximate one for large files, and find.py picks between them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np

from .embfile import DTYPES, block, load_embeddings, release  # load_embeddings: for callers of this module
from ..errors import InputError

CHUNK = 8192  # rows per duplicate_pairs block: a [CHUNK, CHUNK] float32 score block is 256 MiB
TOPK_CHUNK = 65536  # rows per top_k chunk: 64 MiB as float32 at D = 256

Progress = Callable[[int, int], None]


class DuplicateGroup(NamedTuple):
    """Rows connected by pairs at or above the threshold; scores[i]: rows[i]'s best cosine in the group."""

    rows: np.ndarray  # int64 [G], ascending
    scores: np.ndarray  # float32 [G]


# --- top k -------------------------------------------------------------------------------------

def _as_queries(q: np.ndarray, d: int) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype.name not in DTYPES:
        q = q.astype(np.float32)  # what the search computes in
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != d:
        raise InputError(f"queries have shape {tuple(q.shape)}; expected [Q, {d}] like the embeddings")
    bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
    if len(bad):
        raise InputError(f"{len(bad)} query row(s) are not finite (NaN or infinite), first {_rows(bad)}; "
                         f"they cannot be searched for")
    return q


def finite_rows(x: np.ndarray, *, chunk: int = CHUNK) -> np.ndarray:
    """bool [N]: which rows of x [N, D] are all finite; streamed `chunk` rows at a time."""
    ok = np.empty(x.shape[0], bool)
    for start in range(0, x.shape[0], chunk):
        rows = block(x, start, chunk)[:x.shape[0] - start]
        ok[start:start + len(rows)] = np.isfinite(rows).all(axis=1)
    return ok


def _rows(rows: np.ndarray, shown: int = 5) -> str:
    return ", ".join(map(str, rows[:shown].tolist())) + (" ..." if len(rows) > shown else "")


def _mask(valid: np.ndarray | None, start: int, size: int) -> np.ndarray:
    """valid[start:start + size] padded with False to `size` (all True without a mask)."""
    if valid is None:
        return np.ones(size, bool)
    out = np.zeros(size, bool)
    part = valid[start:start + size]
    out[:len(part)] = part
    return out


def _left_out(path, valid: np.ndarray) -> str | None:
    """The warning for the non-finite rows a search leaves out, or None."""
    bad = np.flatnonzero(~valid)
    if not len(bad):
        return None
    return (f"{path}: left out {len(bad)} row(s) that are not finite (NaN or infinite), rows {_rows(bad)}; "
            f"embed the folder again (was the model diverged?)")


def top_k(queries: np.ndarray, embeddings: np.ndarray, k: int, *, chunk: int = TOPK_CHUNK,
          valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `embeddings` [N, D] with the highest cosine to each of `queries` [Q, D].

    Returns (scores float32 [Q, k] descending, indices int64 [Q, k]; equal scores: the earlier row
    first). Reads `embeddings` once, in chunks of `chunk` rows converted to float32 once, each
    searched by faiss's exact inner-product k-NN (`faiss.knn`: BLAS blocks and a heap per query, no
    sort), the chunk's top k merged into the running top k; memory holds one chunk and faiss's
    score block, never [Q, N]. faiss, not our JAX step: on 10,000 queries x 1M rows it ran 2.1x
    faster (31 s against 66 s, 2 Zen 5 cores; BENCHMARKS.md). float16 or float32 inputs; scores in
    float32. Needs 1 <= k <= N. `valid` (bool [N]): only those rows are searched (then k <= their
    count). Queries must be finite.
    """
    from .ann import faiss_module

    n, d = embeddings.shape
    queries = np.ascontiguousarray(_as_queries(queries, d), np.float32)
    usable = n if valid is None else int(np.count_nonzero(valid))
    if not 1 <= k <= usable:
        finite = " finite" if valid is not None else ""
        raise InputError(f"k = {k} must be between 1 and the number of embeddings ({usable}{finite})")
    if chunk < 1:
        raise InputError(f"chunk size must be positive, not {chunk}")
    faiss = faiss_module()
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.full((len(queries), 0), -1, np.int64)
    for start in range(0, n, chunk):
        x = np.array(embeddings[start:start + chunk], np.float32)  # [C, D], read and converted once
        release(embeddings, start, start + len(x))
        rows = np.arange(start, start + len(x))
        if valid is not None:
            ok = _mask(valid, start, len(x))
            x, rows = np.ascontiguousarray(x[ok]), rows[ok]
        if not len(x):
            continue
        s, j = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, rows[j]], axis=1)
        order = np.lexsort((all_i, -all_s), axis=1)[:, :k]  # score descending, then row ascending
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return np.clip(best_s, -1.0, 1.0), best_i  # rounding can put a unit vector's self-cosine at 1 + 1e-7


def duplicate_pairs(embeddings: np.ndarray, threshold: float, *, other: np.ndarray | None = None,
                    chunk: int = CHUNK, on_progress: Progress | None = None, valid: np.ndarray | None = None,
                    other_valid: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair with cosine >= threshold, as (i, j, score) arrays, one triple per block with hits.

    Without `other`: pairs of rows of `embeddings` with i < j. With `other` [M, D]: pairs with i a
    row of `embeddings` and j a row of `other`. Streams blocks of `chunk` rows x `chunk` rows (only
    the upper triangle of blocks without `other`) through one float32 BLAS matmul each (NumPy's:
    the scores are thresholded where they lie, no device round trip), then one pass that keeps the
    hits; nothing sorts. `on_progress(blocks_done, blocks_total)` is called after each block.
    `valid`, `other_valid` (bool [N], [M]): rows outside them are in no pair.
    """
    d = embeddings.shape[1]
    if chunk < 1:
        raise InputError(f"chunk size must be positive, not {chunk}")
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold {threshold} is not a cosine in [-1, 1]")
    cols = embeddings if other is None else other
    if cols.ndim != 2 or cols.shape[1] != d:
        raise InputError(f"the two embedding sets have different widths: {d} and {cols.shape[-1]} "
                         f"(made by different models?)")
    col_valid = valid if other is None else other_valid
    return _pairs(embeddings, cols, np.float32(threshold), other is None, chunk, on_progress, valid, col_valid)


def _float_block(x: np.ndarray, start: int, size: int, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start + size) as float32, rows outside `valid` zeroed (a NaN would spread through
    the matmul), and bool: which of them are valid."""
    out = np.array(x[start:start + size], np.float32)
    release(x, start, start + len(out))
    ok = _mask(valid, start, len(out))
    out[~ok] = 0.0
    return out, ok


def _pairs(rows, cols, t, upper, chunk, on_progress, row_valid, col_valid):
    """duplicate_pairs' generator, apart so that bad arguments raise at the call, not at first next()."""
    n, m = rows.shape[0], cols.shape[0]
    rc, cc = min(chunk, n), min(chunk, m)
    row_starts = range(0, n, rc)
    col_starts = list(range(0, m, cc))
    total = len(row_starts) * (len(row_starts) + 1) // 2 if upper else len(row_starts) * len(col_starts)
    done = 0
    for r0 in row_starts:
        a, ok_a = _float_block(rows, r0, rc, row_valid)
        for c0 in col_starts:
            if upper and c0 < r0:
                continue  # lower triangle: the pair was seen as (j, i)
            if upper and c0 == r0:
                # A copy, not `a` itself: NumPy runs `a @ a.T` as BLAS syrk, which OpenBLAS ran 3.3x
                # slower than gemm on an 8,192 x 256 block (0.61 s against 0.18 s, 2 Zen 5 cores).
                b, ok_b = a.copy(), ok_a
            else:
                b, ok_b = _float_block(cols, c0, cc, col_valid)
            s = a @ b.T  # [R, C] float32
            i, j = np.divmod(np.flatnonzero(s >= t), s.shape[1])
            keep = ok_a[i] & ok_b[j]
            if upper and c0 == r0:
                keep &= i < j
            done += 1
            if keep.any():
                i, j = i[keep], j[keep]
                yield i + r0, j + c0, np.clip(s[i, j], -1.0, 1.0)  # rounding: a self-cosine of 1 + 1e-7
            if on_progress:
                on_progress(done, total)


def duplicate_groups(embeddings: np.ndarray, threshold: float, *, chunk: int = CHUNK,
                     on_progress: Progress | None = None, valid: np.ndarray | None = None) -> list[DuplicateGroup]:
    """Near-duplicate groups: connected components of the pairs with cosine >= threshold.

    Returns the groups of two or more rows, largest first (ties: lowest first row). Transitive: a and c
    share a group when a~b and b~c even if cos(a, c) < threshold. Union-find over the streamed pairs,
    vectorised in NumPy; memory O(N) besides one block of pairs.
    """
    pairs = duplicate_pairs(embeddings, threshold, chunk=chunk, on_progress=on_progress, valid=valid)
    return groups_of(embeddings.shape[0], pairs)


def groups_of(n: int, pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[DuplicateGroup]:
    """Connected components of (i, j, score) pair blocks over rows 0..n-1 (exact or approximate;
    a pair may come more than once), as duplicate_groups returns them."""
    parent = np.arange(n, dtype=np.int64)
    best = np.full(n, -np.inf, np.float32)
    for i, j, s in pairs:
        np.maximum.at(best, i, s)
        np.maximum.at(best, j, s)
        _union(parent, i, j)
    root = _flatten(parent)
    members = np.flatnonzero(best > -np.inf)
    if not len(members):
        return []
    members = members[np.argsort(root[members], kind="stable")]
    _, starts = np.unique(root[members], return_index=True)
    groups = [DuplicateGroup(g, best[g]) for g in np.split(members, starts[1:])]
    groups.sort(key=lambda g: (-len(g.rows), g.rows[0]))
    return groups


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    while True:
        p = parent[x]
        if np.array_equal(p, x):
            return x
        x = p


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Join the sets of i[t] and j[t] for every t. Roots always hook to a smaller root, so the forest
    stays acyclic; conflicting hooks in one round resolve to the smallest, the rest retry."""
    while len(i):
        ri, rj = _find(parent, i), _find(parent, j)
        parent[i], parent[j] = ri, rj  # path compression for the rows we touched
        apart = ri != rj
        if not apart.any():
            return
        ri, rj = ri[apart], rj[apart]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        np.minimum.at(parent, hi, lo)
        i, j = lo, hi


def _flatten(parent: np.ndarray) -> np.ndarray:
    """Every row's root (pointer jumping until stable)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up
