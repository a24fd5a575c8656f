"""The processor this process runs on: its model and the SIMD instruction sets that decide CPU speed.

Speed figures from different instruction sets do not compare (AVX2, AVX-512, AVX-512 with bf16 dot
instructions, AMX, Arm NEON/SVE), so training runs record `processor()` in summary.json and the
benchmarks print it beside every figure. Read from /proc/cpuinfo on Linux; elsewhere only what the
`platform` module knows.
"""
from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

# The flags that change which kernels are fastest: x86 vector widths and dot-product extensions,
# Arm's vector extensions. Everything else in /proc/cpuinfo is left out.
_SIMD = re.compile(r"^(avx2|fma|avx512\w*|avx_vnni\w*|amx\w*|asimd\w*|sve\w*|sme(?!p$)\w*|bf16|i8mm)$")


@functools.cache
def processor(cpuinfo: str | None = None) -> dict:
    """{"model", "vendor", "family", "model_id", "simd": [...], "machine"}; `cpuinfo` is the text of
    /proc/cpuinfo (read when None; empty where there is none). Missing fields are ""."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    first: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if first:
                break  # the first processor's block describes them all on the machines we run on
            continue
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = (first.get("flags") or first.get("Features") or "").split()
    return {
        "model": first.get("model name") or first.get("Model") or platform.processor() or "",
        "vendor": first.get("vendor_id") or first.get("CPU implementer", ""),
        "family": first.get("cpu family", ""),
        "model_id": first.get("model") or first.get("CPU part", ""),
        "simd": sorted({f for f in flags if _SIMD.match(f)}),
        "machine": platform.machine(),
    }


def isa(info: dict | None = None) -> str:
    """The widest vector instruction set named in `info` (default: this processor's), as a short
    label for tables: "avx512-bf16", "avx512", "avx2", "sve", "neon" or "other"."""
    simd = set((info or processor())["simd"])
    if "avx512f" in simd:
        return "avx512-bf16" if "avx512_bf16" in simd else "avx512"
    if "avx2" in simd:
        return "avx2"
    if any(f.startswith("sve") for f in simd):
        return "sve"
    if "asimd" in simd:
        return "neon"
    return "other"
