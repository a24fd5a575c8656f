"""An approximate nearest-neighbour index beside the embeddings: X.npy -> X.ann (faiss IVF).

Why faiss's inverted file (IVF) and not a graph (HNSW, usearch): it is trained and filled in a
minute at 1M x 256 on 2 cores, and it answers *range* queries (every row above a cosine), which is
what near-duplicate groups need; a graph answers top-k only, and misses pairs in any group larger
than k (measurements in BENCHMARKS.md, "Search at a million").

The index is a coarse k-means quantizer of `nlist` cells over the unit rows; each row is stored in
its cell as float16 (`IVF<nlist>,SQfp16`: lossless for a float16 .npy); a query scans the `nprobe`
cells whose centroids are nearest to it. Every score this module returns is recomputed exactly
(float32) from the embeddings themselves, so the approximation only ever *misses* a neighbour or a
pair; it never misreports a cosine.

The file: MAGIC, an 8-byte little-endian length, a JSON header, then faiss's own serialisation. The
header ties the index to the .npy it was built from (its size and sha256, as X.json records them):
a changed .npy makes the index stale (`load_index` says so in one line and returns None). Written
atomically (files.write_atomic). faiss is imported only here, and only when first used.
"""
from __future__ import annotations

import json
import math
import os
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from ..files import sha256_file, write_atomic
from .embfile import block

MAGIC = b"contrastive-ann\n"
VERSION = 1
MIN_ROWS = 50_000  # below this the exact streamed search is as fast (BENCHMARKS.md) and needs no file
NPROBE = 16  # cells scanned per query by default
TRAIN_PER_CELL = 40  # k-means sample: faiss asks for at least 39 points per centroid
ADD_CHUNK = 65536  # rows read, converted to float32 and added at a time
QUERY_CHUNK = 4096  # rows range-searched at a time (results per query are bounded by the cells scanned)
SLACK = 2e-3  # range radius below the threshold: float16 storage of a float32 .npy, then exact rescoring


class Index(NamedTuple):
    """A loaded or freshly built index: the faiss object and its header (nlist, nprobe, ...)."""

    faiss: object
    header: dict


def ann_path(embeddings: Path) -> Path:
    """X.npy -> X.ann: the index beside the embeddings."""
    return Path(embeddings).with_suffix(".ann")


def faiss_module():
    """faiss, with its threads set to the CPUs this process may use (OpenMP would take every core)."""
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate index needs faiss: pip install faiss-cpu (or search with --exact)") from None
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return faiss


def default_nlist(n: int) -> int:
    """Cells for n rows: the power of two nearest 4 sqrt(n) (faiss's guideline), with at least
    TRAIN_PER_CELL rows per cell to train on. 1M -> 4096, 100k -> 1024, 10k -> 128, 1k -> 16."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = 2 ** int(math.log2(max(1, n // TRAIN_PER_CELL)))
    return max(1, min(target, cap))


def npy_digest(embeddings: Path, index: dict) -> tuple[int, str]:
    """(bytes, sha256) of the .npy: as X.json records them (load_embeddings has checked them), else hashed."""
    if isinstance(index.get("npy_sha256"), str) and isinstance(index.get("npy_bytes"), int):
        return index["npy_bytes"], index["npy_sha256"]
    return Path(embeddings).stat().st_size, sha256_file(embeddings)


# --- build, save, load -------------------------------------------------------------------------

def build_index(x: np.ndarray, *, valid: np.ndarray | None = None, nlist: int = 0, nprobe: int = 0,
                seed: int = 0, tie: tuple[int, str] | None = None) -> Index:
    """Train an IVF index on x [N, D] (unit rows, float16/32, memmap fine) and add its valid rows.

    nlist 0: default_nlist(N); nprobe 0: NPROBE (stored as the default for queries). Training uses
    TRAIN_PER_CELL * nlist rows drawn with `seed`, k-means 10 iterations. Rows outside `valid` are
    not added (their ids never come back). `tie`: (npy bytes, sha256) recorded in the header.
    """
    faiss = faiss_module()
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise InputError(f"nlist {nlist} must be between 1 and the number of rows ({n})")
    nprobe = min(nprobe or NPROBE, nlist)
    ok = np.ones(n, bool) if valid is None else valid
    usable = np.flatnonzero(ok)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(usable, min(len(usable), TRAIN_PER_CELL * nlist), replace=False))
    train = np.asarray(x[sample], np.float32)  # [S, D] fancy indexing reads only those rows
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed = 10, seed
    index.cp.min_points_per_centroid = 1  # small sets: no warning printed from C++
    index.train(train)
    index.own_fields = True  # the quantizer lives as long as the index (Python would free it)
    quantizer.this.disown()
    del train
    for start in range(0, n, ADD_CHUNK):
        rows = block(x, start, ADD_CHUNK)[:n - start].astype(np.float32)
        keep = ok[start:start + len(rows)]
        index.add_with_ids(rows[keep], np.flatnonzero(keep).astype(np.int64) + start)
    header = {"version": VERSION, "kind": f"IVF{nlist},SQfp16", "metric": "inner_product", "nlist": nlist,
              "nprobe": nprobe, "rows": int(n), "dim": int(d), "indexed": int(len(usable)),
              "faiss": faiss.__version__, "seed": seed, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if tie is not None:
        header["npy_bytes"], header["npy_sha256"] = tie
    return Index(index, header)


def save_index(path: Path, index: Index) -> None:
    """Write the index to `path` atomically (temporary file, fsync, rename)."""
    faiss = faiss_module()
    head = json.dumps(index.header).encode()

    def write(f):
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        faiss.write_index(index.faiss, faiss.PyCallbackIOWriter(f.write))

    write_atomic(path, write)


def is_ours(path: Path) -> bool:
    """Whether `path` is a file this tool wrote as an index (any version): one it may replace."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path: Path) -> dict | None:
    """The header of an index file, or None when `path` is not one (another file, damaged, older)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("version") == VERSION else None


def stale_reason(header: dict | None, x: np.ndarray, tie: tuple[int, str]) -> str | None:
    """Why an index with this header cannot serve x (None: it can)."""
    if header is None:
        return "it is not an index this version of contrastive wrote"
    if (header.get("rows"), header.get("dim")) != tuple(x.shape):
        return f"it was built for {header.get('rows')} x {header.get('dim')} embeddings, not {x.shape[0]} x {x.shape[1]}"
    if (header.get("npy_bytes"), header.get("npy_sha256")) != tuple(tie):
        return "the embeddings changed since it was built (their sha256 differs)"
    return None


def load_index(path: Path, x: np.ndarray, tie: tuple[int, str]) -> tuple[Index | None, str | None]:
    """(the index at `path`, None) when it was built from these very embeddings; (None, why not)
    when it is stale or unreadable; (None, None) when there is none."""
    path = Path(path)
    if not path.exists():
        return None, None
    header = read_header(path)
    if (reason := stale_reason(header, x, tie)) is not None:
        return None, f"index {path} is out of date: {reason}"
    faiss = faiss_module()
    try:
        with open(path, "rb") as f:
            f.seek(len(MAGIC) + 8 + len(json.dumps(header).encode()))
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except (OSError, RuntimeError) as e:
        return None, f"index {path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return Index(index, header), None


# --- queries ------------------------------------------------------------------------------------

def _nprobe(index: Index, nprobe: int) -> int:
    return min(nprobe or index.header["nprobe"], index.header["nlist"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise exact cosines of unit rows a[t] . b[t] in float32, clipped like search.top_k's."""
    return np.clip(np.einsum("td,td->t", a.astype(np.float32), b.astype(np.float32)), -1.0, 1.0)


def ann_top_k(queries: np.ndarray, x: np.ndarray, index: Index, k: int, *, nprobe: int = 0,
              exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (approximately) k nearest rows of x to each query [Q, D]: (scores float32 [Q, k], rows
    int64 [Q, k]), best first, exact cosines; a query whose scanned cells hold fewer than k rows
    gets -inf / -1 in the slots left. `exclude` (int64 [Q]): a row to leave out per query (its own)."""
    q = np.ascontiguousarray(queries, np.float32)
    extra = 0 if exclude is None else 1
    index.faiss.nprobe = _nprobe(index, nprobe)
    _, found = index.faiss.search(q, k + extra)  # [Q, k + extra], -1 where none
    if exclude is not None:
        found = np.where(found == exclude[:, None], -1, found)
    ok = found >= 0
    scores = np.full(found.shape, -np.inf, np.float32)
    t, c = np.nonzero(ok)
    scores[t, c] = _cosines(q[t], _gather(x, found[t, c]))
    order = np.lexsort((np.where(ok, found, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.where(np.take_along_axis(ok, order, 1),
                                                          np.take_along_axis(found, order, 1), -1)


def ann_pairs(rows: np.ndarray, cols: np.ndarray, index: Index, threshold: float, *, upper: bool,
              nprobe: int = 0, row_valid: np.ndarray | None = None, on_progress=None, chunk: int = QUERY_CHUNK):
    """Pairs (i, j, exact cosine >= threshold) found by range-searching each row of `rows` in the
    index of `cols`, one triple per chunk of rows. upper (rows is cols): pairs with i < j, found
    from either end (so a pair may come twice, from two chunks: union-find does not mind). Rows outside `row_valid` are not searched (the index holds no invalid
    columns). `on_progress(done, total)` after each chunk."""
    n = rows.shape[0]
    index.faiss.nprobe = _nprobe(index, nprobe)
    total = -(-n // chunk)
    for done, start in enumerate(range(0, n, chunk), 1):
        q = block(rows, start, chunk)[:n - start].astype(np.float32)
        ok = np.ones(len(q), bool) if row_valid is None else row_valid[start:start + len(q)]
        lims, _, found = index.faiss.range_search(np.ascontiguousarray(q[ok]), float(threshold) - SLACK)
        i = np.repeat(np.flatnonzero(ok), np.diff(lims).astype(np.int64)) + start
        j = found.astype(np.int64)
        if upper:
            keep = i != j
            i, j = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
            code = np.unique(i * cols.shape[0] + j)  # a pair found from both ends, once
            i, j = code // cols.shape[0], code % cols.shape[0]
        if len(i):
            s = _cosines(_gather(rows, i), _gather(cols, j))
            keep = s >= threshold
            if keep.any():
                yield i[keep], j[keep], s[keep]
        if on_progress:
            on_progress(done, total)


def _gather(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows] in float32, reading each distinct row once (the rows may repeat and be unsorted)."""
    distinct, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(x[distinct], np.float32)[inverse]
