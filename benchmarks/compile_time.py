"""How long the train step takes to compile: first time, and again from the persistent cache.

Each measurement is a fresh process (what a user sees when they run `contrastive pretrain` again):
it builds the step as pretrain does, then times tracing + lowering and XLA's compile separately.
Run 1 uses an empty compilation cache, run 2 the cache run 1 filled. One JSON line per run.

    python benchmarks/compile_time.py                          # small:256 resnet18:256
    python benchmarks/compile_time.py --runs small:256 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(encoder: str, pairs: int) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import contrastive_cli  # noqa: F401, I001  (first: it tunes malloc before JAX starts threads)
    import jax

    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.runtime import enable_compilation_cache
    from step_speed import build  # the same step, state and images as the speed benchmark

    enable_compilation_cache()  # CONTRASTIVE_CACHE_DIR, set by the driver
    step, state, images = build(TrainConfig(model=ModelConfig(encoder=encoder, image_size=32), batch_size=pairs))
    t0 = time.perf_counter()
    lowered = step.lower(state, images)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(state, images))
    t3 = time.perf_counter()
    print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": t3 - t0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["small:256", "resnet18:256"], help="encoder:pairs")
    p.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per run, each with a fresh cache")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]))
    for spec in a.runs:
        encoder, _, pairs = spec.partition(":")
        found: dict[str, list[dict]] = {"cold": [], "cached": []}
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, CONTRASTIVE_CACHE_DIR=cache)
                for kind in ("cold", "cached"):
                    out = subprocess.run([sys.executable, __file__, "--worker", encoder, pairs or "256"], env=env,
                                         capture_output=True, text=True, check=True)
                    found[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for kind, rows in found.items():
            row = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
            print(json.dumps({"encoder": encoder, "pairs": int(pairs or 256), "cache": kind, **row,
                              "runs": len(rows), "loadavg": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
