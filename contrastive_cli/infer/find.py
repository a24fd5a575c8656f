"""The twins of `neighbors`, `duplicates` and `index`: open EMB.npy, pick the exact or the
approximate search, report which ran.

search="auto" uses the approximate index (ann.py) when the file has at least ann.MIN_ROWS rows
(the cross file's rows for `duplicates --cross`), loading X.ann when it was built from these very
embeddings and building it on first use otherwise (saved beside the .npy when the folder can be
written; a stale one is replaced, with a one-line warning). "exact" streams the exact search
(search.py); "approximate" uses the index whatever the size. Every result says which ran in its
"search" entry: {"method": "exact"} or {"method": "approximate", "index": "IVF4096,SQfp16",
"nprobe": 16}; cosines are exact either way (ann.py rescores).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import ann
from .embfile import full_path, load_embeddings, row_of_path
from .search import CHUNK, Progress, _left_out, duplicate_pairs, finite_rows, groups_of, top_k
from ..errors import InputError

SEARCHES = ("auto", "exact", "approximate")
Note = Callable[[str], None]


def _approximate(search: str, n: int) -> bool:
    if search not in SEARCHES:
        raise InputError(f"search {search!r} must be one of {', '.join(SEARCHES)}")
    return search == "approximate" or (search == "auto" and n >= ann.MIN_ROWS)


def open_index(path: Path, x: np.ndarray, index: dict, valid: np.ndarray, *, warnings: list[str],
               nlist: int = 0, nprobe: int = 0, on_info: Note | None = None) -> ann.Index:
    """The index of EMB.npy at `path`: X.ann when it was built from these embeddings (and, when
    given, with this nlist), else built now and saved beside it. A file at X.ann that this tool did
    not write is never replaced (the index is then kept in memory, with a warning)."""
    tie = ann.npy_digest(path, index)
    target = ann.ann_path(path)
    loaded, why = ann.load_index(target, x, tie)
    if loaded is not None and (not nlist or loaded.header["nlist"] == nlist):
        return loaded
    if why:
        warnings.append(f"{why}; building it again")
    if on_info is not None:
        on_info(f"building the approximate index of {path} ({x.shape[0]} rows; once: later searches load {target})")
    built = ann.build_index(x, valid=valid, nlist=nlist, nprobe=nprobe, tie=tie)
    if target.exists() and not ann.is_ours(target):
        warnings.append(f"{target} exists and is not an index contrastive wrote: left as it is, the index "
                        f"was used for this search only")
        return built
    try:
        ann.save_index(target, built)
    except OSError as e:
        warnings.append(f"cannot write {target} ({e.strerror or e}): the index was used for this search only")
    return built


def _method(idx: ann.Index | None, nprobe: int) -> dict:
    if idx is None:
        return {"method": "exact"}
    return {"method": "approximate", "index": idx.header["kind"],
            "nprobe": min(nprobe or idx.header["nprobe"], idx.header["nlist"])}


def make_index(embeddings_path: Path, *, nlist: int = 0, nprobe: int = 0, force: bool = False,
               on_info: Note | None = None) -> dict:
    """`contrastive index`: build X.ann beside EMB.npy unless an up-to-date one (same nlist and
    nprobe when given) is there. Returns {"path", "built": bool, "header", "warnings"}."""
    x, index = load_embeddings(embeddings_path)
    target = ann.ann_path(embeddings_path)
    if target.exists() and not ann.is_ours(target) and not force:
        raise InputError(f"{target} exists and is not an index contrastive wrote; pass --force to replace it")
    tie = ann.npy_digest(embeddings_path, index)
    loaded, why = ann.load_index(target, x, tie) if ann.is_ours(target) else (None, None)
    if loaded is not None and nlist in (0, loaded.header["nlist"]) and nprobe in (0, loaded.header["nprobe"]):
        return {"path": str(target), "built": False, "header": loaded.header, "warnings": []}
    valid = finite_rows(x)
    warnings = [w for w in (why, _left_out(embeddings_path, valid)) if w]
    if on_info is not None:
        on_info(f"building the approximate index of {embeddings_path} ({x.shape[0]} rows)")
    built = ann.build_index(x, valid=valid, nlist=nlist, nprobe=nprobe, tie=tie)
    ann.save_index(target, built)
    return {"path": str(target), "built": True, "header": built.header, "warnings": warnings}


def neighbors(embeddings_path: Path, k: int, *, row: int | None = None, path: str | Path | None = None,
              image: Path | None = None, model: Path | None = None, search: str = "auto", nprobe: int = 0,
              on_info: Note | None = None) -> dict:
    """The k nearest rows of EMB.npy to one query: an indexed row, an indexed path, or an image file.

    An image is embedded with `model` (default: the run named in the index). A row or path query
    leaves the row itself out. Rows that are not finite are left out (with a warning); a query that
    is not finite is an InputError. Returns {"query", "model", "search", "neighbors": [{rank, row,
    path, cosine}], "warnings": [...]}, paths joined to the index's root.
    """
    if sum(q is not None for q in (row, path, image)) != 1:
        raise InputError("give exactly one query: an image (with a model), a row, or a path")
    x, index = load_embeddings(embeddings_path)
    n, d = x.shape
    approximate = _approximate(search, n)
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
    idx = None
    if approximate:
        idx = open_index(embeddings_path, x, index, valid, warnings=warnings, on_info=on_info)
        exclude = None if self_row is None else np.array([self_row])
        scores, rows = ann.ann_top_k(q, x, idx, k, nprobe=nprobe, exclude=exclude)
        keep = rows[0] >= 0
        scores, rows = scores[0][keep], rows[0][keep]
    else:
        scores, rows = top_k(q, x, min(k + (self_row is not None), usable), valid=valid)
        keep = rows[0] != self_row
        scores, rows = scores[0][keep][:k], rows[0][keep][:k]
    return {
        "query": {"row": self_row, "path": label},
        "model": used_model or index.get("model"),
        "search": _method(idx, nprobe),
        "neighbors": [{"rank": r + 1, "row": int(i), "path": full_path(index, index["paths"][i]),
                       "cosine": float(s)} for r, (i, s) in enumerate(zip(rows, scores))],
        "warnings": warnings,
    }


def find_duplicates(embeddings_path: Path, threshold: float, *, cross: Path | None = None,
                    chunk: int = CHUNK, on_progress: Progress | None = None, search: str = "auto",
                    nprobe: int = 0, on_info: Note | None = None) -> dict:
    """Near-duplicates in EMB.npy (groups), or between EMB.npy and `cross` (pairs), at cosine >= threshold.

    Returns {"threshold", "rows", "search", "groups": [{"group", "members": [{row, path, score}]}]}
    where a member's score is its best cosine within the group; with `cross`, "pairs": [{row, path,
    other_row, other_path, score}] best first. Groups are the connected components of the pairs
    found, exact or approximate. Paths are joined to each index's root. Rows that are not finite
    join no group or pair (a warning says which).
    """
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold {threshold} is not a cosine in [-1, 1]")
    x, index = load_embeddings(embeddings_path)
    out = {"threshold": threshold, "rows": int(x.shape[0]), "warnings": []}
    valid = finite_rows(x)
    if (message := _left_out(embeddings_path, valid)) is not None:
        out["warnings"].append(message)
    if cross is None:
        idx = None
        if _approximate(search, x.shape[0]):
            idx = open_index(embeddings_path, x, index, valid, warnings=out["warnings"], on_info=on_info)
            pairs = ann.ann_pairs(x, x, idx, threshold, upper=True, nprobe=nprobe, row_valid=valid,
                                  on_progress=on_progress)
        else:
            pairs = duplicate_pairs(x, threshold, chunk=chunk, on_progress=on_progress, valid=valid)
        out["search"] = _method(idx, nprobe)
        out["groups"] = [{"group": g, "members": [{"row": int(r), "path": full_path(index, index["paths"][r]),
                                                  "score": float(s)} for r, s in zip(*group)]}
                         for g, group in enumerate(groups_of(x.shape[0], pairs), 1)]
        return out
    y, other = load_embeddings(cross)
    other_valid = finite_rows(y)
    if (message := _left_out(cross, other_valid)) is not None:
        out["warnings"].append(message)
    if index.get("model") and other.get("model") and index["model"] != other["model"]:
        out["warnings"].append(f"{embeddings_path} and {cross} were made by different models "
                               f"({index['model']}, {other['model']}): cosines across models are meaningless")
    if y.shape[1] != x.shape[1]:
        raise InputError(f"the two embedding sets have different widths: {x.shape[1]} and {y.shape[1]} "
                         f"(made by different models?)")
    idx = None
    if _approximate(search, y.shape[0]):
        idx = open_index(cross, y, other, other_valid, warnings=out["warnings"], on_info=on_info)
        blocks = ann.ann_pairs(x, y, idx, threshold, upper=False, nprobe=nprobe, row_valid=valid,
                               on_progress=on_progress)
    else:
        blocks = duplicate_pairs(x, threshold, other=y, chunk=chunk, on_progress=on_progress, valid=valid,
                                 other_valid=other_valid)
    found = [np.concatenate(a) for a in zip(*blocks)]
    i, j, s = found if found else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    order = np.lexsort((j, i, -s))  # best first; ties in row order
    out["search"] = _method(idx, nprobe)
    out["other_rows"] = int(y.shape[0])
    out["pairs"] = [{"row": int(i[t]), "path": full_path(index, index["paths"][i[t]]), "other_row": int(j[t]),
                     "other_path": full_path(other, other["paths"][j[t]]), "score": float(s[t])} for t in order]
    return out
