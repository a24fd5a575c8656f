"""The embeddings file pair written by `contrastive embed`: X.npy ([N, D] unit rows) and X.json (its index).

Opening checks that the two agree (row count, width, dtype, and, for indexes written since it was
recorded, the .npy's size and sha256: a pair left half-replaced by a crash is refused, never read
with the wrong paths) and maps the array; `block` copies a run of
rows out and lets the mapped pages go (`release`), so streaming a file larger than RAM keeps the
resident memory at one block.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import sha256_file

DTYPES = ("float32", "float16")


# --- opening -----------------------------------------------------------------------------------

def load_embeddings(path: Path) -> tuple[np.ndarray, dict]:
    """Open X.npy memory-mapped (nothing is read yet) with its index X.json; check they agree.

    Returns (array [N, D] float16/float32, read-only memmap, index dict). Raises InputError for a
    missing or unreadable file, a missing or mismatched index, a non-2-D array or a wrong dtype.
    An index with "npy_sha256" (embed writes one) must match the file's bytes: hashing reads the
    file once (about 1 s per GB); older indexes without it are checked as before.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embeddings not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"cannot read {path} as a .npy array ({e}); expected a file written by `contrastive embed`")
    if array.ndim != 2:
        raise InputError(f"{path} has shape {tuple(array.shape)}; expected a 2-D [N, D] array of embeddings")
    if array.dtype.name not in DTYPES:
        raise InputError(f"{path} has dtype {array.dtype.name}; expected float32 or float16")
    if 0 in array.shape:
        raise InputError(f"{path} is empty (shape {tuple(array.shape)})")
    ipath = path.with_suffix(".json")
    if not ipath.is_file():
        raise InputError(f"index {ipath} not found beside {path} (`contrastive embed` writes both)")
    try:
        index = json.loads(ipath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read index {ipath}: {e}")
    if not isinstance(index, dict) or not isinstance(index.get("paths"), list):
        raise InputError(f"index {ipath} has no \"paths\" list (row i of the embeddings is paths[i])")
    n, d = array.shape
    if len(index["paths"]) != n:
        raise InputError(f"index {ipath} lists {len(index['paths'])} paths but {path} has {n} rows; "
                         f"were they written by different `embed` runs?")
    if index.get("dim", d) != d:
        raise InputError(f"index {ipath} says dim {index['dim']} but {path} has {d} columns")
    if index.get("dtype", array.dtype.name) != array.dtype.name:
        raise InputError(f"index {ipath} says dtype {index['dtype']} but {path} holds {array.dtype.name}")
    _check_checksum(path, ipath, index)
    return array, index


def _check_checksum(path: Path, ipath: Path, index: dict) -> None:
    size, digest = index.get("npy_bytes"), index.get("npy_sha256")
    stale = (f"index {ipath} does not describe {path} ({{}}): the pair was not replaced together "
             f"(an interrupted `embed --force`?); embed the folder again")
    try:
        if isinstance(size, int) and path.stat().st_size != size:
            raise InputError(stale.format(f"{path.stat().st_size} bytes, the index says {size}"))
        if isinstance(digest, str) and sha256_file(path) != digest:
            raise InputError(stale.format("its sha256 differs"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


def row_of_path(index: dict, path: str | Path) -> int:
    """The row of `path`: as written in the index (relative to its root), or any path to that file."""
    paths = index["paths"]
    lookup = {p: i for i, p in enumerate(paths)}
    key = Path(path).as_posix()
    if key in lookup:
        return lookup[key]
    if index.get("root"):
        try:
            rel = Path(path).resolve().relative_to(Path(index["root"]).resolve()).as_posix()
        except ValueError:
            rel = None
        if rel in lookup:
            return lookup[rel]
    raise InputError(f"{path} is not in the index ({len(paths)} paths under {index.get('root', '?')})")


# --- streaming in bounded memory -------------------------------------------------------------

def block(x: np.ndarray, start: int, size: int) -> np.ndarray:
    """Rows [start, start + size) of x as an owned array, zero-padded to `size` rows (the compiled shape)."""
    rows = np.array(x[start:start + size])  # a copy: the memmap's pages can be let go at once
    release(x, start, start + len(rows))
    if len(rows) < size:
        rows = np.concatenate([rows, np.zeros((size - len(rows), x.shape[1]), rows.dtype)])
    return rows


def release(x: np.ndarray, start: int, stop: int) -> None:
    """Drop a read-only memmap's pages for rows [start, stop) from this process.

    Pages of a file mapping count in the process's resident memory once touched; streaming a 1M-row
    file would otherwise end with the whole file resident. They stay in the OS page cache, so reading
    them again costs a minor fault, not disk I/O. Only read-only file mappings: there dropping a page
    can never lose data.
    """
    if not (sys.platform.startswith("linux") and isinstance(x, np.memmap) and x.mode == "r"
            and x.flags.c_contiguous and stop > start):
        return
    page = mmap.PAGESIZE
    row_bytes = x.shape[1] * x.itemsize
    lo = x.ctypes.data + start * row_bytes
    hi = x.ctypes.data + stop * row_bytes
    lo -= lo % page  # whole pages only; a shared page refaults from the file if touched again
    # best effort: a failure only leaves the pages resident
    ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def full_path(index: dict, rel: str) -> str:
    """A row's path as the index lists it, joined to the index's root when it has one."""
    return str(Path(index["root"]) / rel) if index.get("root") else rel
