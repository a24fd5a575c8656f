"""The processor record: /proc/cpuinfo texts of the kinds of machines users train on."""
from contrastive_cli import processor

ZEN5 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 26
model		: 2
model name	: AMD EPYC 9B45
flags		: fpu sse2 avx fma avx2 smep avx512f avx512dq avx512_bf16 avx512vl avx_vnni

processor	: 1
vendor_id	: AuthenticAMD
model name	: ignored: the first block describes the machine
"""
HASWELL = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 63\nmodel name\t: Intel Xeon E5-2699 v3\nflags\t\t: sse2 avx fma avx2\n"
SAPPHIRE = "model name\t: Intel Xeon Platinum 8481C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve sve2 bf16 i8mm smep\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"


def test_x86_flags_and_model():
    info = processor.processor.__wrapped__(ZEN5)
    assert info["model"] == "AMD EPYC 9B45" and (info["vendor"], info["family"], info["model_id"]) == ("AuthenticAMD", "26", "2")
    # the SIMD flags only (not fpu, sse2 or smep, a security feature that looks like Arm's sme)
    assert info["simd"] == ["avx2", "avx512_bf16", "avx512dq", "avx512f", "avx512vl", "avx_vnni", "fma"]
    assert processor.isa(info) == "avx512-bf16"


def test_isa_labels():
    assert processor.isa(processor.processor.__wrapped__(HASWELL)) == "avx2"
    sapphire = processor.processor.__wrapped__(SAPPHIRE)
    assert processor.isa(sapphire) == "avx512-bf16" and {"amx_bf16", "amx_tile"} <= set(sapphire["simd"])
    assert processor.isa(processor.processor.__wrapped__(HASWELL.replace("avx2", "avx512f avx2"))) == "avx512"
    graviton = processor.processor.__wrapped__(GRAVITON3)
    assert graviton["vendor"] == "0x41" and processor.isa(graviton) == "sve"
    assert processor.isa(processor.processor.__wrapped__("Features\t: fp asimd\n")) == "neon"


def test_no_cpuinfo():
    info = processor.processor.__wrapped__("")
    assert info["simd"] == [] and processor.isa(info) == "other" and info["machine"]


def test_this_machine():
    info = processor.processor()  # read from /proc/cpuinfo here
    assert processor.processor() is info  # read once per process
    assert processor.isa(info) in ("avx512-bf16", "avx512", "avx2", "sve", "neon", "other")
