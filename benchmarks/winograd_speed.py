"""Winograd F(2x2, 3x3) against XLA's convolution: forward and both gradients together, per shape.

For each 3x3 stride-1 shape of ResNet-18 at 32 px (batch 128 = 64 pairs, or --batch), times one
jitted value-and-gradient (a weighted sum of the output, gradients wrt input and kernel) of
`winograd.conv3x3` and of `lax.conv_general_dilated`, interleaved, median of --repeats; prints the
largest difference of each output relative to its largest entry. GFLOP/s count a direct
convolution's 3 x 2*N*H*W*9*C*O for both, so they compare time.

    python benchmarks/winograd_speed.py
    python benchmarks/winograd_speed.py --batch 512 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contrastive_cli import perf  # noqa: I001  (first: the CLI's malloc and XLA settings, before JAX starts)
perf.switch_on(reexec=False)
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from contrastive_cli.perf import winograd

# (H = W, C = O) of ResNet-18's stride-1 3x3 convolutions after the stem, and their count.
SHAPES = [(32, 64, 4), (16, 128, 3), (8, 256, 3), (4, 512, 3)]


def native(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def value_and_grads(conv):
    return jax.jit(jax.value_and_grad(lambda x, k, r: jnp.vdot(conv(x, k), r), argnums=(0, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    for side, c, count in SHAPES:
        x = jnp.asarray(rng.standard_normal((a.batch, side, side, c), np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) / np.sqrt(9 * c))
        r = jnp.asarray(rng.standard_normal((a.batch, side, side, c), np.float32))
        fns = {"xla": value_and_grads(native), "winograd": value_and_grads(winograd.conv3x3)}
        outs = {name: jax.block_until_ready(f(x, k, r)) for name, f in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(a.repeats):
            for name, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(x, k, r))
                times[name].append(time.perf_counter() - t)
        flop = 3 * 2 * a.batch * side * side * 9 * c * c
        med = {name: statistics.median(t) for name, t in times.items()}
        (y0, (dx0, dk0)), (y1, (dx1, dk1)) = outs["xla"], outs["winograd"]

        def rel(got, ref):
            return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))

        print(json.dumps({
            "shape": [a.batch, side, side, c, c], "count_in_resnet18": count,
            "xla_ms": round(med["xla"] * 1e3, 1), "winograd_ms": round(med["winograd"] * 1e3, 1),
            "speedup": round(med["xla"] / med["winograd"], 2),
            "xla_gflop_s": round(flop / med["xla"] / 1e9), "winograd_gflop_s": round(flop / med["winograd"] / 1e9),
            "rel_diff": {"value": rel(y1, y0), "dx": rel(dx1, dx0), "dkernel": rel(dk1, dk0)},
        }), flush=True)


if __name__ == "__main__":
    main()
