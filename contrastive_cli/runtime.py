"""Process-wide JAX settings: the persistent compilation cache in a user cache directory."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CONTRASTIVE_CACHE_DIR, else $XDG_CACHE_HOME/contrastive, else ~/.cache/contrastive."""
    if os.environ.get("CONTRASTIVE_CACHE_DIR"):
        return Path(os.environ["CONTRASTIVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "contrastive"


def enable_compilation_cache() -> None:
    """Compiled steps are reused across runs: a second `pretrain` starts in seconds, not tens."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return  # already set (by the user, or by tests/conftest.py)
    path = cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: compile every time rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
