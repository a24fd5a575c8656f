"""Files the tool writes: atomic replacement (a reader sees the old file or the new one, never half)
and the user cache directory.

A failed write (disk full, quota, read-only folder, a folder where the file should be) leaves the old
file as it was and no temporary file behind, and raises `WriteError`: an OSError that names the file
the user asked for, not the temporary name.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """Writing `filename` failed (errno and strerror as the OSError that caused it)."""


def cache_dir() -> Path:
    """$CONTRASTIVE_CACHE_DIR, else $XDG_CACHE_HOME/contrastive, else ~/.cache/contrastive."""
    if os.environ.get("CONTRASTIVE_CACHE_DIR"):
        return Path(os.environ["CONTRASTIVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "contrastive"


def write_error(path: Path, e: OSError) -> WriteError:
    """`e` as a WriteError about `path`."""
    return WriteError(e.errno or errno.EIO, e.strerror or str(e), str(path))


def write_temp(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a new temporary file beside `path`; flushed to disk; its path.

    The file gets the mode a plain `open` would give it (0666 less the umask; mkstemp's is 0600).
    On any failure the temporary file is removed; an OSError comes back as a WriteError naming `path`.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(errno.EISDIR, "Is a directory", str(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e) from None
        raise
    return Path(tmp)


def replace_all(moves: list[tuple[Path, Path]], *, stop: Callable[[], bool] | None = None) -> None:
    """Rename each (temporary, target) in order, then flush the folders' entries to disk.

    SIGINT and SIGTERM are held off while the renames run (in the main thread), so none lands
    between two of them; one that arrived is delivered when they are done. `stop()` is asked first:
    True (a signal arrived and was swallowed somewhere) raises KeyboardInterrupt and renames nothing.
    Temporary files not renamed are removed.
    """
    moved = 0
    try:
        with _signals_held():
            if stop is not None and stop():
                raise KeyboardInterrupt
            for tmp, target in moves:
                try:
                    os.replace(tmp, target)
                except OSError as e:
                    raise write_error(target, e) from None
                moved += 1
    finally:
        for tmp, _ in moves[moved:]:
            Path(tmp).unlink(missing_ok=True)
    for folder in {Path(t).parent for _, t in moves}:
        _fsync_dir(folder)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`.

    The data is flushed to disk before the rename, so after a crash `path` holds the old bytes or
    the new ones. The new file gets the mode a plain `open` would give it (the umask applies).
    """
    replace_all([(write_temp(path, write), Path(path))])


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON (strict: NaN and infinity are refused), replaced atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text (file names that are not UTF-8 keep their bytes), replaced atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM inside the block are recorded, then handed to the previous handlers on exit.

    (Blocking them with pthread_sigmask would not do: another thread can take the signal, and
    Python then runs the handler in the main thread anyway.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in held[:1]:
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (some file systems refuse to open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
