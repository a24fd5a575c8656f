"""Files the tool writes: atomic replacement (a reader sees the old file or the new one, never half)
and the user cache directory."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def cache_dir() -> Path:
    """$CONTRASTIVE_CACHE_DIR, else $XDG_CACHE_HOME/contrastive, else ~/.cache/contrastive."""
    if os.environ.get("CONTRASTIVE_CACHE_DIR"):
        return Path(os.environ["CONTRASTIVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "contrastive"


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`.

    The data is flushed to disk before the rename, so after a crash `path` holds the old bytes or
    the new ones. The new file gets the mode a plain `open` would give it (the umask applies).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON (strict: NaN and infinity are refused), replaced atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text (file names that are not UTF-8 keep their bytes), replaced atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
