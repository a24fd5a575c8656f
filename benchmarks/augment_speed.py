"""Throughput of `augment_views` under jit: one JSON line per (batch, size, resolution) on stdout.

    python benchmarks/augment_speed.py [--repeats 7]

Views/s counts both views (2 x batch per call); the figure is the median of `--repeats` timed calls
after two warm-up calls, each call with a fresh fold_in key as in training. The process is set up
as `contrastive pretrain`'s, where the augmentation runs (perf.switch_on: glibc tunables by a
re-exec, malloc, XLA flags).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contrastive_cli import perf  # first: before NumPy or JAX start

perf.switch_on(reexec=True)

import jax
import numpy as np

from contrastive_cli.nn.augment import augment_views
from contrastive_cli.config import AugmentConfig

# (batch, output size, cached working resolution R)
CONFIGS = ((256, 32, 64), (256, 96, 128))


def bench(batch: int, size: int, resolution: int, repeats: int) -> dict:
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    )
    cfg = AugmentConfig()
    step = jax.jit(lambda images, key: augment_views(images, key=key, cfg=cfg, size=size))
    base = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(step(images, jax.random.fold_in(base, 0)))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(step(images, jax.random.fold_in(base, 1)))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(images, jax.random.fold_in(base, 2 + i)))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "bench": "augment_views",
        "batch": batch,
        "size": size,
        "resolution": resolution,
        "views_per_s": round(2 * batch / median, 1),
        "ms_per_call": round(1e3 * median, 2),
        "min_ms": round(1e3 * min(times), 2),
        "first_call_s": round(compile_s, 2),
        "backend": jax.default_backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for batch, size, resolution in CONFIGS:
        print(json.dumps(bench(batch, size, resolution, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
