"""The step `pretrain` runs (stepcache: exported, saved, loaded) against the traced step, in one process.

Both are built from the same config and first state; their steps alternate (so machine load hits
both alike) and the medians are compared. The first losses must match: the loaded program is the
traced one.

    python benchmarks/loaded_step_speed.py --encoder small --pairs 256 --steps 12
    python benchmarks/loaded_step_speed.py --encoder resnet18 --pairs 64 --steps 12
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from contrastive_cli import perf  # noqa: I001  (first: the CLI's malloc and XLA settings, before JAX starts)

perf.switch_on(reexec=True)  # as the `contrastive` command runs

import jax
from step_speed import setup  # the same state and images as the speed benchmark

from contrastive_cli.perf import stepcache
from contrastive_cli.nn.conv import resolve
from contrastive_cli.train.step import make_step
from contrastive_cli.config import ModelConfig, TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="small")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    cfg = TrainConfig(model=ModelConfig(encoder=a.encoder, image_size=32, conv=resolve("auto")), batch_size=a.pairs,
                      optimizer="sgd")
    steps, states = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("traced", "loaded"):
            mesh, tx, graphdef, state, images = setup(cfg)  # a fresh first state each
            spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
            if name == "traced":
                step = make_step(cfg, graphdef, tx, mesh)
            else:
                stepcache.make_cached_step(cfg, graphdef, tx, mesh, state, spec, folder=Path(folder))  # saves
                step = stepcache.make_cached_step(cfg, graphdef, tx, mesh, state, spec, folder=Path(folder))
            state, out = step(state, images)
            print(f"{name}: first loss {float(out['loss'])!r}", flush=True)
            for _ in range(4):  # warm up (the heap grows to its size in the first steps)
                state, out = step(state, images)
            jax.block_until_ready(out["loss"])
            steps[name], states[name] = step, state
    times = {name: [] for name in steps}
    for i in range(a.steps):
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            states[name], out = steps[name](states[name], images)
            jax.block_until_ready(out["loss"])
            times[name].append(time.perf_counter() - t)
    ref = statistics.median(times["traced"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name}: {a.pairs / med:.2f} pairs/s (median of {len(ts)}), {ref / med:.3f}x the traced step; "
              f"turns {[round(a.pairs / t, 1) for t in ts]}", flush=True)


if __name__ == "__main__":
    main()
