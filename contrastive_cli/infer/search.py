"""Nearest neighbours and near-duplicates over an embeddings file, in bounded memory.

Rows are unit vectors (see embed.py), so a dot product is a cosine. Nothing here builds an N x N
matrix: `top_k` streams the embeddings in chunks of `chunk` rows through one jit-compiled step
(matmul, `jax.lax.top_k`, merge with the running top k), and `duplicate_pairs` streams row blocks x
column blocks, so memory is bounded by the chunk size whatever N is. Inputs may be float16 or float32
(a `np.load(mmap_mode="r")` memmap included); scores are computed in float32 at full matmul precision
(no TF32 on GPUs: near-duplicate thresholds sit in the third decimal).

Rows that are not finite (NaN or infinite: a diverged model, a damaged file) would score NaN or
+-1 against everything; `top_k` and `duplicate_pairs` take a `valid` mask that leaves them out, and
the commands' twins build it (`finite_rows`) and warn about what they left out.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .embfile import DTYPES, block, full_path, load_embeddings, row_of_path
from ..errors import InputError

CHUNK = 4096  # rows per streamed block: a [CHUNK, CHUNK] float32 score block is 64 MiB
QUERY_CHUNK = 1024  # queries per pass over the embeddings in top_k

Progress = Callable[[int, int], None]


class DuplicateGroup(NamedTuple):
    """Rows connected by pairs at or above the threshold; scores[i]: rows[i]'s best cosine in the group."""

    rows: np.ndarray  # int64 [G], ascending
    scores: np.ndarray  # float32 [G]


# --- top k -------------------------------------------------------------------------------------

def _as_queries(q: np.ndarray, d: int) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype.name not in DTYPES:
        q = q.astype(np.float32)  # float64 would be cut to float32 by JAX anyway (x64 off)
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


def _scores(q: jax.Array, x: jax.Array) -> jax.Array:
    """[Q, D] x [C, D] -> float32 [Q, C] cosines (unit rows)."""
    s = jnp.matmul(q.astype(jnp.float32), x.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(s, -1.0, 1.0)  # rounding can put a unit vector's self-cosine at 1 + 1e-7


@partial(jax.jit, static_argnames="k", donate_argnums=(0, 1))
def _top_k_step(best_s, best_i, q, x, ok, offset, *, k):
    """Merge chunk x (rows offset.. of the embeddings; ok [C]: real and valid rows) into the running top k."""
    s = _scores(q, x)  # [Q, C]
    s = jnp.where(ok, s, -jnp.inf)  # padding and left-out rows never win
    cs, ci = jax.lax.top_k(s, min(k, x.shape[0]))
    all_s = jnp.concatenate([best_s, cs], axis=1)  # [Q, k + min(k, C)]
    all_i = jnp.concatenate([best_i, ci.astype(best_i.dtype) + offset], axis=1)
    s, j = jax.lax.top_k(all_s, k)  # stable: on ties the earlier row stays first
    return s, jnp.take_along_axis(all_i, j, axis=1)


def top_k(queries: np.ndarray, embeddings: np.ndarray, k: int, *, chunk: int = CHUNK,
          query_chunk: int = QUERY_CHUNK, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `embeddings` [N, D] with the highest cosine to each of `queries` [Q, D].

    Returns (scores float32 [Q, k] descending, indices int64 [Q, k]). Streams `embeddings` in chunks
    of `chunk` rows (the last one padded to the compiled shape with -inf scores: one compile), so
    memory holds one chunk and a [Q, chunk] score block, never [Q, N]. Queries go `query_chunk` at a
    time. float16 or float32 inputs; scores in float32. Needs 1 <= k <= N. `valid` (bool [N]):
    only those rows are searched (then k <= their count). Queries must be finite.
    """
    n, d = embeddings.shape
    queries = _as_queries(queries, d)
    usable = n if valid is None else int(np.count_nonzero(valid))
    if not 1 <= k <= usable:
        finite = " finite" if valid is not None else ""
        raise InputError(f"k = {k} must be between 1 and the number of embeddings ({usable}{finite})")
    if chunk < 1 or query_chunk < 1:
        raise InputError(f"chunk sizes must be positive (chunk {chunk}, query_chunk {query_chunk})")
    c = min(chunk, n)
    qc = min(query_chunk, len(queries))
    out_s = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), qc):
        q = jax.device_put(block(queries, q0, qc))  # on the device once, for every chunk
        best_s = jnp.full((qc, k), -jnp.inf, jnp.float32)
        best_i = jnp.full((qc, k), -1, jnp.int32)  # JAX's default int; N < 2**31
        for start in range(0, n, c):
            best_s, best_i = _top_k_step(best_s, best_i, q, block(embeddings, start, c),
                                         _mask(valid, start, c) & (np.arange(c) < n - start), start, k=k)
        m = min(qc, len(queries) - q0)
        out_s[q0:q0 + m] = np.asarray(best_s)[:m]
        out_i[q0:q0 + m] = np.asarray(best_i)[:m]
    return out_s, out_i


@jax.jit
def _pairblock(a, b, ok_a, ok_b, row0, col0, threshold, upper):
    """Scores of block a x b, -inf where padding or left out (ok_a [R], ok_b [C] False), below
    threshold, or (upper) not strictly above the diagonal."""
    s = _scores(a, b)  # [R, C]
    gi = row0 + jnp.arange(a.shape[0])[:, None]
    gj = col0 + jnp.arange(b.shape[0])[None, :]
    keep = ok_a[:, None] & ok_b[None, :] & (s >= threshold) & (~upper | (gi < gj))
    s = jnp.where(keep, s, -jnp.inf)
    return s, keep.sum()


def duplicate_pairs(embeddings: np.ndarray, threshold: float, *, other: np.ndarray | None = None,
                    chunk: int = CHUNK, on_progress: Progress | None = None, valid: np.ndarray | None = None,
                    other_valid: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair with cosine >= threshold, as (i, j, score) arrays, one triple per block with hits.

    Without `other`: pairs of rows of `embeddings` with i < j. With `other` [M, D]: pairs with i a
    row of `embeddings` and j a row of `other`. Streams blocks of `chunk` rows x `chunk` rows (only
    the upper triangle of blocks without `other`); a block's scores leave the device only when it
    holds a hit. `on_progress(blocks_done, blocks_total)` is called after each block. `valid`,
    `other_valid` (bool [N], [M]): rows outside them are in no pair.
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


def _pairs(rows, cols, t, upper, chunk, on_progress, row_valid, col_valid):
    """duplicate_pairs' generator, apart so that bad arguments raise at the call, not at first next()."""
    n, m = rows.shape[0], cols.shape[0]
    rc, cc = min(chunk, n), min(chunk, m)
    row_starts = range(0, n, rc)
    col_starts = list(range(0, m, cc))
    total = len(row_starts) * (len(row_starts) + 1) // 2 if upper else len(row_starts) * len(col_starts)
    done = 0
    for r0 in row_starts:
        a = jax.device_put(block(rows, r0, rc))
        ok_a = _mask(row_valid, r0, rc) & (np.arange(rc) < n - r0)
        for c0 in col_starts:
            if upper and c0 < r0:
                continue  # lower triangle: the pair was seen as (j, i)
            b = a if (upper and c0 == r0) else block(cols, c0, cc)
            ok_b = _mask(col_valid, c0, cc) & (np.arange(cc) < m - c0)
            s, hits = _pairblock(a, b, ok_a, ok_b, r0, c0, t, upper)
            done += 1
            if int(hits):
                s = np.asarray(s)
                i, j = np.nonzero(s != -np.inf)
                yield (i + r0).astype(np.int64), (j + c0).astype(np.int64), s[i, j]
            if on_progress:
                on_progress(done, total)


def duplicate_groups(embeddings: np.ndarray, threshold: float, *, chunk: int = CHUNK,
                     on_progress: Progress | None = None, valid: np.ndarray | None = None) -> list[DuplicateGroup]:
    """Near-duplicate groups: connected components of the pairs with cosine >= threshold.

    Returns the groups of two or more rows, largest first (ties: lowest first row). Transitive: a and c
    share a group when a~b and b~c even if cos(a, c) < threshold. Union-find over the streamed pairs,
    vectorised in NumPy; memory O(N) besides one block of pairs.
    """
    n = embeddings.shape[0]
    parent = np.arange(n, dtype=np.int64)
    best = np.full(n, -np.inf, np.float32)
    for i, j, s in duplicate_pairs(embeddings, threshold, chunk=chunk, on_progress=on_progress, valid=valid):
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


# --- the commands' twins ------------------------------------------------------------------------

def neighbors(embeddings_path: Path, k: int, *, row: int | None = None, path: str | Path | None = None,
              image: Path | None = None, model: Path | None = None) -> dict:
    """The k nearest rows of EMB.npy to one query: an indexed row, an indexed path, or an image file.

    An image is embedded with `model` (default: the run named in the index). A row or path query
    leaves the row itself out. Rows that are not finite are left out (with a warning); a query that
    is not finite is an InputError. Returns {"query", "model", "neighbors": [{rank, row, path,
    cosine}], "warnings": [...]}, paths joined to the index's root.
    """
    if sum(q is not None for q in (row, path, image)) != 1:
        raise InputError("give exactly one query: an image (with a model), a row, or a path")
    x, index = load_embeddings(embeddings_path)
    n, d = x.shape
    warnings, used_model = [], None
    valid = finite_rows(x)
    if image is not None:
        from .portable import embed_files, load_model  # JAX: only for image queries

        if not Path(image).is_file():
            raise InputError(f"image not found: {image}")
        used_model = str(model) if model else index.get("model")
        if not used_model:
            raise InputError(f"the index of {embeddings_path} names no model; pass --model RUN_DIR")
        if model and index.get("model") and Path(model).resolve() != Path(index["model"]).resolve():
            warnings.append(f"{embeddings_path} was made by {index['model']}, not {model}: "
                            f"cosines across models are meaningless")
        encoder = load_model(Path(used_model), batch_size=1, quick=True)
        warnings += encoder.notes
        if encoder.dim != d:
            raise InputError(f"model {used_model} gives {encoder.dim}-d features but {embeddings_path} "
                             f"holds {d}-d embeddings")
        q, self_row, label = embed_files(encoder, [image]), None, str(image)
        if not np.isfinite(q).all():
            raise InputError(f"the embedding of {image} under {used_model} is not finite (NaN or infinite); "
                             f"the model cannot be used for search")
    else:
        self_row = row_of_path(index, path) if path is not None else row
        if not 0 <= self_row < n:
            raise InputError(f"row {self_row} is out of range: {embeddings_path} has {n} rows (0..{n - 1})")
        q, label = np.asarray(x[self_row:self_row + 1], np.float32), full_path(index, index["paths"][self_row])
        if not valid[self_row]:
            raise InputError(f"row {self_row} ({label}) of {embeddings_path} is not finite (NaN or infinite); "
                             f"it cannot be searched for")
    if (message := _left_out(embeddings_path, valid)) is not None:
        warnings.append(message)
    usable = int(np.count_nonzero(valid))
    available = usable if self_row is None else usable - 1
    if available == 0:
        raise InputError(f"{embeddings_path} holds no row besides the query")
    if k > available:
        warnings.append(f"only {available} other rows: listing {available}, not {k}")
        k = available
    scores, rows = top_k(q, x, min(k + (self_row is not None), usable), valid=valid)
    keep = rows[0] != self_row
    scores, rows = scores[0][keep][:k], rows[0][keep][:k]
    return {
        "query": {"row": self_row, "path": label},
        "model": used_model or index.get("model"),
        "neighbors": [{"rank": r + 1, "row": int(i), "path": full_path(index, index["paths"][i]),
                       "cosine": float(s)} for r, (i, s) in enumerate(zip(rows, scores))],
        "warnings": warnings,
    }


def find_duplicates(embeddings_path: Path, threshold: float, *, cross: Path | None = None,
                    chunk: int = CHUNK, on_progress: Progress | None = None) -> dict:
    """Near-duplicates in EMB.npy (groups), or between EMB.npy and `cross` (pairs), at cosine >= threshold.

    Returns {"threshold", "rows", "groups": [{"group", "members": [{row, path, score}]}]} where a
    member's score is its best cosine within the group; with `cross`, "pairs": [{row, path,
    other_row, other_path, score}] best first. Paths are joined to each index's root. Rows that are
    not finite join no group or pair (a warning says which).
    """
    x, index = load_embeddings(embeddings_path)
    out = {"threshold": threshold, "rows": int(x.shape[0]), "warnings": []}
    valid = finite_rows(x)
    if (message := _left_out(embeddings_path, valid)) is not None:
        out["warnings"].append(message)
    if cross is None:
        groups = duplicate_groups(x, threshold, chunk=chunk, on_progress=on_progress, valid=valid)
        out["groups"] = [{"group": g, "members": [{"row": int(r), "path": full_path(index, index["paths"][r]),
                                                  "score": float(s)} for r, s in zip(*group)]}
                         for g, group in enumerate(groups, 1)]
        return out
    y, other = load_embeddings(cross)
    other_valid = finite_rows(y)
    if (message := _left_out(cross, other_valid)) is not None:
        out["warnings"].append(message)
    if index.get("model") and other.get("model") and index["model"] != other["model"]:
        out["warnings"].append(f"{embeddings_path} and {cross} were made by different models "
                               f"({index['model']}, {other['model']}): cosines across models are meaningless")
    found = [np.concatenate(a) for a in zip(*duplicate_pairs(x, threshold, other=y, chunk=chunk,
                                                             on_progress=on_progress, valid=valid,
                                                             other_valid=other_valid))]
    i, j, s = found if found else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    order = np.lexsort((j, i, -s))  # best first; ties in row order
    out["other_rows"] = int(y.shape[0])
    out["pairs"] = [{"row": int(i[t]), "path": full_path(index, index["paths"][i[t]]), "other_row": int(j[t]),
                     "other_path": full_path(other, other["paths"][j[t]]), "score": float(s[t])} for t in order]
    return out
