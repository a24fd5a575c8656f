"""runtime.tune_malloc: a freed big buffer is reused, not faulted in from the kernel again."""
import subprocess
import sys

import pytest

# malloc, fill and free a 64 MiB block three times (as XLA does a step's buffers); print the page
# faults of the last two.
PROBE = """
import ctypes, resource
from contrastive_cli import runtime
print(runtime.tune_malloc())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def use():
    p = libc.malloc(2**26)
    ctypes.memset(p, 1, 2**26)
    libc.free(p)
use()  # first use: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
use(); use()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(tuning: str) -> tuple[bool, int]:
    env = {"CONTRASTIVE_MALLOC_TUNING": tuning, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, n = out.stdout.split()
    return applied == "True", int(n)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_big_blocks_without_page_faults():
    applied, tuned = faults("1")
    skipped, plain = faults("0")
    assert applied and not skipped
    pages = 2 * 2**26 // 4096  # two 64 MiB buffers in 4 KiB pages
    assert plain > pages // 2  # glibc's default: each buffer mmapped afresh and faulted in
    assert tuned < pages // 20  # tuned: the freed block is reused
