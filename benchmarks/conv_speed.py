"""Convolution speed on this backend: XLA's native conv against fastconv.conv2d, per layer and part.

For every conv shape of the small CNN (batch 512 = 256 pairs, two views concatenated) and of
ResNet-18 with the small-image stem (batch 128), at 32x32 input, times the forward, the input
gradient and the weight gradient of both implementations (each jitted alone: XLA drops the
gradient that is not asked for), interleaved so machine load hits both alike, median of --repeats.
GFLOP/s count 2*N*Ho*Wo*kh*kw*C*O for every part; `speedup` is native time / fast time. The `net`
rows weight each shape by its count in the network: the share of a train step's conv time each
implementation needs, and (`best`) the faster of the two for every part. With half the batch as
pairs, `best` bounds the train step's speed from above: pairs/s with everything but the
convolutions (BatchNorm, ReLU, augmentation, loss, update) free.

    python benchmarks/conv_speed.py                      # both networks, ~5 min on 2 vCPUs
    python benchmarks/conv_speed.py --net small --repeats 5
    python benchmarks/conv_speed.py --net resnet18 --batch 512         # ResNet-18 at 256 pairs
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/conv_speed.py   # flags: set before JAX starts
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution python benchmarks/conv_speed.py

`fast` is `conv2d`, the "winograd" convolution (Winograd where `winograd.applies`, else fastconv's
`_plan`, which reads XLA_FLAGS). malloc is tuned first, as in the CLI's training commands
(perf/malloc.py tune_malloc); XLA_FLAGS stay as given: without the second line's flag, which
`contrastive pretrain` adds (perf/xla.py), XLA runs YNNPACK's convolutions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contrastive_cli.perf import malloc  # first: before NumPy or JAX start threads

malloc.tune_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from contrastive_cli.perf import fastconv  # noqa: E402

# (name, count in the network, N, H, C, O, k, stride); padding k // 2 as the models use.
SMALL = [
    ("conv1 3->32 s1", 1, 512, 32, 3, 32, 3, 1),
    ("conv2 32->64 s2", 1, 512, 32, 32, 64, 3, 2),
    ("conv3 64->128 s2", 1, 512, 16, 64, 128, 3, 2),
    ("conv4 128->256 s2", 1, 512, 8, 128, 256, 3, 2),
]
RESNET18 = [
    ("stem 3->64 s1", 1, 128, 32, 3, 64, 3, 1),
    ("layer1 64->64 s1", 4, 128, 32, 64, 64, 3, 1),
    ("layer2 64->128 s2", 1, 128, 32, 64, 128, 3, 2),
    ("layer2 128->128 s1", 3, 128, 16, 128, 128, 3, 1),
    ("layer2 short 1x1 s2", 1, 128, 32, 64, 128, 1, 2),
    ("layer3 128->256 s2", 1, 128, 16, 128, 256, 3, 2),
    ("layer3 256->256 s1", 3, 128, 8, 256, 256, 3, 1),
    ("layer3 short 1x1 s2", 1, 128, 16, 128, 256, 1, 2),
    ("layer4 256->512 s2", 1, 128, 8, 256, 512, 3, 2),
    ("layer4 512->512 s1", 3, 128, 4, 512, 512, 3, 1),
    ("layer4 short 1x1 s2", 1, 128, 8, 256, 512, 1, 2),
]
PARTS = ("forward", "input-grad", "weight-grad")


def native(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def fast(x, kernel, stride, padding):
    return fastconv.conv2d(x, kernel, stride=stride, padding=padding)


def parts(conv, stride, padding):
    """Jitted (x, kernel, dy) -> forward / input gradient / weight gradient of `conv`."""
    def fwd(x, k, dy):
        return conv(x, k, stride, padding)

    def dx(x, k, dy):
        return jax.vjp(lambda x: conv(x, k, stride, padding), x)[1](dy)[0]

    def dk(x, k, dy):
        return jax.vjp(lambda k: conv(x, k, stride, padding), k)[1](dy)[0]

    return {name: jax.jit(f) for name, f in zip(PARTS, (fwd, dx, dk))}


def time_round_robin(fns: dict, args, repeats: int) -> dict:
    """Median seconds of each function, called in turn so that load changes hit all of them."""
    outs = {k: jax.block_until_ready(f(*args)) for k, f in fns.items()}  # compile + warm up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def bench_layer(n, h, c, o, k, stride, dtype, repeats):
    padding = k // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), dtype)
    ho = (h + 2 * padding - k) // stride + 1
    dy = jnp.asarray(rng.standard_normal((n, ho, ho, o)), dtype)
    fns = {}
    for impl, conv in (("native", native), ("fast", fast)):
        for part, f in parts(conv, stride, padding).items():
            fns[impl, part] = f
    secs, outs = time_round_robin(fns, (x, kernel, dy), repeats)
    for part in PARTS:  # a benchmark of wrong numbers is worthless: check against native
        a, b = (np.asarray(outs[i, part], np.float32) for i in ("native", "fast"))
        err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
        if err > (1e-4 if dtype == jnp.float32 else 3e-2):
            raise SystemExit(f"fast {part} differs from native by {err:.2e} (relative to max)")
    return secs, 2 * n * ho * ho * k * k * c * o


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=("small", "resnet18", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=0, help="images per batch instead of 512 (small) / 128 (resnet18)")
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    print(f"# backend {jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {a.dtype}, "
          f"median of {a.repeats}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"loadavg {os.getloadavg()[0]:.1f}")
    print(f"{'layer':22s} {'N':>4s} {'part':12s} {'native':>8s} {'fast':>8s} {'speedup':>7s}  (GFLOP/s, GFLOP/s, time ratio)")
    nets = {"small": SMALL, "resnet18": RESNET18}
    for net in (("small", "resnet18") if a.net == "both" else (a.net,)):
        totals = {"native": 0.0, "fast": 0.0, "best": 0.0}
        batch = 0
        for name, count, n, h, c, o, k, stride in nets[net]:
            n = batch = a.batch or n
            secs, flops = bench_layer(n, h, c, o, k, stride, dtype, a.repeats)
            for part in PARTS:
                if part == "input-grad" and c == 3:
                    continue  # the first layer's input is data: no gradient in a train step
                tn, tf = secs["native", part], secs["fast", part]
                totals["native"] += count * tn
                totals["fast"] += count * tf
                totals["best"] += count * min(tn, tf)
                print(f"{name:22s} {n:4d} {part:12s} {flops / tn / 1e9:8.1f} {flops / tf / 1e9:8.1f} {tn / tf:7.2f}",
                      flush=True)
        print(f"{'net ' + net:22s} {'':4s} {'conv seconds':12s} {totals['native']:8.3f} {totals['fast']:8.3f} "
              f"{totals['native'] / totals['fast']:7.2f}  (loadavg {os.getloadavg()[0]:.1f})", flush=True)
        print(f"{'net ' + net:22s} {'':4s} {'best of both':12s} {totals['best']:8.3f} s: at most "
              f"{batch / 2 / totals['best']:.0f} pairs/s with the rest of the step free", flush=True)


if __name__ == "__main__":
    main()
