"""perf/malloc.py: a freed big buffer is reused, not faulted in from the kernel again; huge pages and
a heap never trimmed, by re-exec."""
import subprocess
import sys

import pytest

from contrastive_cli.perf.malloc import HUGE_PAGES, NEVER_TRIM

pytestmark = pytest.mark.slow  # subprocesses

# malloc, fill and free a 64 MiB block three times (as XLA does a step's buffers); print the page
# faults of the last two.
PROBE = """
import ctypes, resource
from contrastive_cli.perf import malloc as runtime
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


# Re-exec with huge pages, then report the tunables, how much of a touched 64 MiB heap block the
# kernel backs with huge pages (AnonHugePages of the process, in kB), and the resident memory (kB)
# left after touching and freeing a 2.5 GiB block (more than mallopt's largest trim threshold;
# only when asked: `big` on the command line).
HUGE_PROBE = """
import ctypes, os, sys
from contrastive_cli.perf import malloc as runtime
runtime.tune_malloc()
runtime.reexec_with_malloc_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(2**26)
ctypes.memset(p, 1, 2**26)
huge = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
if "big" in sys.argv:
    big = libc.malloc(5 * 2**29)
    ctypes.memset(big, 1, 5 * 2**29)
    libc.free(big)
rss = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")]
print(os.environ.get("GLIBC_TUNABLES", "-"), huge[0] if huge else -1, rss[0])
"""


def huge_pages(env: dict) -> tuple[str, int]:
    return probe(env, big=False)[:2]


def probe(env: dict, big: bool = True) -> tuple[str, int, int]:
    env = {"PATH": "/usr/bin:/bin", **env}
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE, *(["big"] if big else [])], env=env,
                         capture_output=True, text=True, check=True)
    tunables, huge_kb, rss_kb = out.stdout.split()
    return tunables, int(huge_kb), int(rss_kb)


def runtime_glibc_2_35() -> bool:
    from contrastive_cli.perf import malloc as runtime
    return runtime._glibc_at_least(2, 35)


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not (sys.platform.startswith("linux") and runtime_glibc_2_35()), reason="glibc >= 2.35")
def test_reexec_asks_glibc_for_huge_pages_once_and_respects_the_user():
    tunables, huge_kb, rss_kb = probe({})
    assert tunables == f"{HUGE_PAGES}:{NEVER_TRIM}"  # set once (a second exec would not change it)
    if _thp_available():
        assert huge_kb >= 32 * 1024  # most of the 64 MiB block is on 2 MiB pages
    plain_tunables, plain_kb = huge_pages({"CONTRASTIVE_MALLOC_TUNING": "0"})
    assert plain_tunables == "-"
    assert plain_kb < huge_kb or not _thp_available()
    # Freed memory stays in the process even past 2 GiB (ResNet-18 at 256 pairs frees more than that
    # every step, and faulting it back in made the step 1.6x slower); untuned glibc gives it back.
    assert rss_kb > 5 * 2**19
    assert probe({"CONTRASTIVE_MALLOC_TUNING": "0"})[2] < 2**20
    assert huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})[0] == "glibc.malloc.hugetlb=0"
    kept = huge_pages({"GLIBC_TUNABLES": "glibc.malloc.check=0"})[0]
    assert kept == f"glibc.malloc.check=0:{HUGE_PAGES}:{NEVER_TRIM}"
    mine = huge_pages({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"})[0]
    assert mine == f"glibc.malloc.trim_threshold=4096:{HUGE_PAGES}"
