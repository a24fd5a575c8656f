"""Decoded-image cache: decode a folder once, reuse it in every later run on that folder.

    CACHE/decoded/<hash of folder path and resolution>/
        index.json        rows: [relative path, byte size, mtime_ns, ctime_ns, inode] per cached image,
                          skipped files
        images-<id>.bin   uint8 [N, R, R, 3], memory-mapped (a folder larger than RAM stays on disk)

Entries are keyed per file by (path, size, mtime, ctime, inode) and per folder by resolution, so a
run after a change re-decodes only the files that changed. The ctime is there because a rewrite of
the same size with its mtime restored (`cp -p`, `rsync -t`, `tar x`) keeps size and mtime, but no
user can set a ctime. The index is replaced atomically and names the data file it describes, so a
concurrent reader never sees an index with the wrong data.

The data file is allocated for real (posix_fallocate) before anything is written to its mapping:
writing a page of a sparse mapping on a full disk kills the process with SIGBUS. When the disk has
not room for it (with FREE_MARGIN to spare), or the cache cannot be written at all, the folder is
decoded in memory instead and `on_warning` is told why.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import cache_dir, write_json_atomic
from .decode import ImageSet, decode_or_reason, decode_pool, load_folder, quiet_pillow
from .scan import no_usable_image, scan_images

VERSION = 2  # bump when decoding or the key changes, so old entries are not reused (2: ctime, inode)
FREE_MARGIN = 64 << 20  # bytes left free on the cache's disk beside a new data file


def _entry_dir(folder: Path, size: int, root: Path | None) -> Path:
    name = f"{Path(folder).resolve()}|{size}|v{VERSION}".encode("utf-8", "surrogateescape")  # any folder name
    key = hashlib.sha1(name).hexdigest()[:20]
    return (root or cache_dir() / "decoded") / key


def _stat_key(folder: Path, path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_entry(entry: Path, size: int):
    """(rows {key: row}, skipped {key: reason}, images memmap, data file name) of an entry, or empties."""
    try:
        index = json.loads((entry / "index.json").read_text(errors="surrogateescape"))
        shape = (len(index["rows"]), size, size, 3)
        images = np.memmap(entry / index["data"], np.uint8, "r", shape=shape) if index["rows"] else None
        rows = {tuple(k): i for i, k in enumerate(index["rows"])}
        skipped = {tuple(k): r for k, r in index["skipped"]}
        return rows, skipped, images, index["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}, None, None


def _allocate(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` really allocated on disk (room checked first); OSError if not."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if nbytes + FREE_MARGIN > free:
        raise OSError(errno.ENOSPC, f"{nbytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free "
                                    f"(keeping {FREE_MARGIN / 2**20:.0f} MiB spare)", str(path.parent))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, nbytes)  # no fallocate here: room was checked above
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def load_cached(
    folder: Path,
    size: int,
    *,
    root: Path | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> tuple[ImageSet, int]:
    """Like decode.load_folder, through the cache: (ImageSet with memory-mapped images, files decoded now).

    Falls back to decoding in memory when the cache cannot be written (read-only, no room for the
    data file, a failed write); `on_warning(message)` is then told why (nothing is said without it).
    """
    folder = Path(folder)
    entry = _entry_dir(folder, size, root)

    def in_memory(reason: str):
        if on_warning is not None:
            on_warning(f"decoded-image cache {entry} not used: {reason}; decoding in memory this time")
        data = load_folder(folder, size, workers=workers, on_progress=on_progress)
        return data, len(data) + len(data.skipped)

    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return in_memory(e.strerror or str(e))
    unreadable: list[tuple[str, str]] = []
    files = scan_images(folder, skipped=unreadable)
    keys = [_stat_key(folder, f) for f in files]
    old_rows, old_skipped, old_images, old_name = _read_entry(entry, size)
    fresh = [i for i, k in enumerate(keys) if k is None or (k not in old_rows and k not in old_skipped)]
    if not fresh and old_images is not None and [k for k in keys if k in old_rows] == list(old_rows):
        # Nothing changed (files may have been removed only if none were: rows match in order).
        if on_progress:
            on_progress(len(files), len(files))
        paths = [k[0] for k in keys if k in old_rows]
        skipped = unreadable + [(k[0], old_skipped[k]) for k in keys if k in old_skipped]
        return ImageSet(folder, paths, old_images, skipped), 0

    data_name = f"images-{uuid.uuid4().hex[:12]}.bin"
    shape = (len(files), size, size, 3)
    try:
        _allocate(entry / data_name, int(np.prod(shape)))
    except OSError as e:
        return in_memory(e.strerror or str(e))
    out = np.memmap(entry / data_name, np.uint8, "r+", shape=shape) if files else np.zeros(shape, np.uint8)
    rows, skipped_keys, paths, skipped = [], [], [], list(unreadable)
    decoded = iter(())
    try:
        with decode_pool(workers) as pool, quiet_pillow():
            decoded = pool.map(lambda i: decode_or_reason(files[i], size), fresh)
            fresh_set = set(fresh)
            j = 0
            for i, key in enumerate(keys):
                if i in fresh_set:
                    result = next(decoded)
                elif key in old_rows:
                    result = old_images[old_rows[key]]
                else:
                    result = old_skipped[key]
                rel = files[i].relative_to(folder).as_posix()
                if isinstance(result, str):
                    skipped.append((rel, result))
                    if key is not None and not result.startswith("permission denied"):
                        # (access can come back with the same bytes: an unreadable file is tried again)
                        skipped_keys.append([list(key), result])
                else:
                    out[j] = result
                    rows.append(list(key))
                    paths.append(rel)
                    j += 1
                if on_progress:
                    on_progress(i + 1, len(files))
    except BaseException:  # interrupted, or a decoder failed: no orphan data file
        del out
        (entry / data_name).unlink(missing_ok=True)
        raise
    if not paths:
        del out
        (entry / data_name).unlink(missing_ok=True)
        raise no_usable_image(folder, len(files), skipped)
    try:
        if isinstance(out, np.memmap):
            out.flush()
        os.truncate(entry / data_name, j * size * size * 3)
        write_json_atomic(entry / "index.json", {"version": VERSION, "folder": str(folder.resolve()),
                                                 "size": size, "data": data_name, "rows": rows,
                                                 "skipped": skipped_keys})
    except OSError as e:  # the pixels are all here: keep them in memory, leave no half entry behind
        images = np.array(out[:j])
        del out
        (entry / data_name).unlink(missing_ok=True)
        if on_warning is not None:
            on_warning(f"decoded-image cache {entry} not used: {e.strerror or e}; keeping the decoded "
                       f"images in memory this time")
        return ImageSet(folder, paths, images, skipped), len(fresh)
    del out
    # Drop the data this index replaced (a reader that has it mapped keeps its pages), and leftovers
    # of interrupted runs; never a file another run may still be writing.
    for stale in entry.glob("images-*.bin"):
        if stale.name != data_name and (stale.name == old_name or _age_s(stale) > 24 * 3600):
            stale.unlink(missing_ok=True)
    images = np.memmap(entry / data_name, np.uint8, "r", shape=(j, size, size, 3))
    return ImageSet(folder, paths, images, skipped), len(fresh)
