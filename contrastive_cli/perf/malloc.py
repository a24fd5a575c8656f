"""glibc malloc settings for XLA:CPU's step buffers: one heap kept whole, huge pages (Linux only)."""
from __future__ import annotations

import os
import sys


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel at every step.

    XLA:CPU allocates each step's buffers afresh. glibc serves blocks over 32 MiB with their own
    mmap and unmaps them on free, so every step faulted in hundreds of MiB of zeroed pages again;
    served from one heap glibc keeps, the step runs much faster (BENCHMARKS.md, "Figures moved from
    the code"). The process's footprint stays at its peak, which a training run reaches every step
    anyway. Linux/glibc only; CONTRASTIVE_MALLOC_TUNING=0 leaves malloc alone. Returns whether the
    settings were applied.

    Call it before any thread has called malloc: glibc fixes the arena limit then, so it is a no-op
    in a process that started threads first (set MALLOC_ARENA_MAX=1 in the environment there).
    `perf.switch_on` calls it at the start of a training command, before NumPy and JAX start.
    """
    if os.environ.get("CONTRASTIVE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: blocks freed by XLA's threads are reused by the others; no mmap for big blocks;
    # trim the heap's top only past 2 GiB free (the largest value mallopt takes), unless a
    # trim_threshold tunable is set (malloc_tunables_environ: never), which mallopt would override.
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0)]
    if "glibc.malloc.trim_threshold" not in os.environ.get("GLIBC_TUNABLES", ""):
        settings.append((_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(p, v) == 1 for p, v in settings)


HUGE_PAGES = "glibc.malloc.hugetlb=1"
# Never hand the heap's top back. mallopt's trim threshold stops at 2 GiB; ResNet-18's step at 256
# pairs frees more than that at its end, so glibc returned it and the next step faulted it back in,
# 2 MiB page by page (figures: BENCHMARKS.md, "Figures moved from the code").
NEVER_TRIM = "glibc.malloc.trim_threshold=1099511627776"


def malloc_tunables_environ(environ=None) -> dict | None:
    """`environ` plus GLIBC_TUNABLES with HUGE_PAGES and NEVER_TRIM, or None where it does not apply.

    With it, glibc never hands the heap's top back (NEVER_TRIM, above) and asks the kernel for
    transparent huge pages (madvise) on the heap that `tune_malloc` serves every block from: XLA's
    step streams through activations of 16-256 MiB, and 2 MiB pages spare it most TLB misses
    (figures: BENCHMARKS.md, "Figures moved from the code"); identical results. glibc reads
    tunables only at process start, hence `reexec_with_malloc_tunables`. None on other systems, with CONTRASTIVE_MALLOC_TUNING=0, or when GLIBC_TUNABLES already says anything
    about hugetlb; a trim_threshold the user set is kept.
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("CONTRASTIVE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not _glibc_at_least(2, 35):  # the tunable's first release
        return None
    ours = [t for t in (HUGE_PAGES, NEVER_TRIM) if t.partition("=")[0] not in tunables]
    environ["GLIBC_TUNABLES"] = ":".join([tunables, *ours] if tunables else ours)
    return environ


def reexec_with_malloc_tunables() -> None:
    """Run this process again from the start with `malloc_tunables_environ()`, if it applies (once:
    the new process finds the tunable set). For the console entry point, before any work."""
    environ = malloc_tunables_environ()
    if environ is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (major, minor)
    except (ValueError, OSError, AttributeError):
        return False
