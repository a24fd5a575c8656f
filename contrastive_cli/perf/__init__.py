"""The opt-in CPU speed wing: glibc malloc settings and the start-up re-exec that applies them
(malloc.py), XLA:CPU flags (xla.py), faster convolutions (fastconv.py, winograd.py) and the train
step kept on disk (stepcache.py).

Nothing here runs at import. The CLI switches it on for the commands that train or embed
(`switch_on`), a config that names "im2col" or "winograd" convolutions uses fastconv, and
`pretrain(step_cache=...)` uses the step cache. Delete this folder and everything still runs, slower.
"""
from __future__ import annotations


def switch_on(*, reexec: bool) -> None:
    """Process-wide settings for a training or embedding command, before NumPy or JAX start.

    `reexec`: run the process again from the start with glibc's malloc tunables when they are not
    set yet (glibc reads them only at start-up); only a console entry point should ask for it.
    """
    from . import malloc, xla

    if reexec:
        malloc.reexec_with_malloc_tunables()
    malloc.tune_malloc()
    xla.prefer_eigen_convolutions()
