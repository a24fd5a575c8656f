"""How long until the train step runs: first time, and again with the caches a first run filled.

Each measurement is a fresh process (what a user sees when they run `contrastive pretrain` again):
it makes the step as pretrain does (`make_s`: stepcache.make_cached_step loads the exported step
from disk, or traces and exports it), lowers it (`lower_s`: tracing, or only a call to the loaded
program) and compiles it (`compile_s`: XLA, or a load from JAX's compilation cache); `ready_s` is
the three together. `init_s`, before all that, is the time to the first state (a compiled program
of its own) and a random batch. The worker runs as `contrastive pretrain` does: the speed wing
switched on first (perf.switch_on: glibc tunables by a re-exec, malloc, the Eigen flag), JAX's
compilation cache in CONTRASTIVE_CACHE_DIR, the convolution "auto" resolved (nn.conv.resolve:
"winograd" on CPU), the step cache unless CONTRASTIVE_STEP_CACHE=0. Run 1 has empty caches (JAX's compilation cache and the step
cache), run 2 the caches run 1 filled. `--step-cache off` measures the same with
CONTRASTIVE_STEP_CACHE=0 (tracing every run; the compilation cache still works). One JSON line
per run.

    python benchmarks/compile_time.py                          # small:256 resnet18:256
    python benchmarks/compile_time.py --runs resnet18:64 --step-cache on off --repeats 3
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
    from contrastive_cli import perf  # noqa: I001  (first: the CLI's malloc and XLA settings, before JAX starts)
    perf.switch_on(reexec=True)  # as `contrastive pretrain`: re-run once with glibc's tunables, then tune
    import jax

    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.cli import _enable_compilation_cache as enable_compilation_cache
    from contrastive_cli.perf.stepcache import make_cached_step
    from step_speed import setup  # the same state and images as the speed benchmark

    enable_compilation_cache()  # CONTRASTIVE_CACHE_DIR, set by the driver
    from contrastive_cli.nn.conv import resolve
    from contrastive_cli.train.step import make_step

    cfg = TrainConfig(model=ModelConfig(encoder=encoder, image_size=32, conv=resolve("auto")), batch_size=pairs)
    t = time.perf_counter()
    mesh, tx, graphdef, state, images = setup(cfg)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    t0 = time.perf_counter()
    if os.environ.get("CONTRASTIVE_STEP_CACHE", "1") == "0":  # as the CLI: no step cache
        step = make_step(cfg, graphdef, tx, mesh)
    else:
        step = make_cached_step(cfg, graphdef, tx, mesh, state, jax.ShapeDtypeStruct(images.shape, images.dtype))
    t1 = time.perf_counter()
    lowered = step.lower(state, images)
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    print(json.dumps({"ready_s": t3 - t0, "make_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
                      "init_s": init_s}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["small:256", "resnet18:256"], help="encoder:pairs")
    p.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per run, each with a fresh cache")
    p.add_argument("--step-cache", nargs="+", choices=("on", "off"), default=["on"],
                   help="stepcache on (the tool's default) and/or off (CONTRASTIVE_STEP_CACHE=0)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]))
    for spec in a.runs:
        encoder, _, pairs = spec.partition(":")
        found = {(sc, kind): [] for sc in a.step_cache for kind in ("cold", "cached")}
        for _ in range(a.repeats):
            for sc in a.step_cache:  # alternated, so that load changes hit both alike
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, CONTRASTIVE_CACHE_DIR=cache, CONTRASTIVE_STEP_CACHE="1" if sc == "on" else "0")
                    for kind in ("cold", "cached"):
                        out = subprocess.run([sys.executable, __file__, "--worker", encoder, pairs or "256"], env=env,
                                             capture_output=True, text=True, check=True)
                        found[sc, kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for (sc, kind), rows in found.items():
            row = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
            print(json.dumps({"encoder": encoder, "pairs": int(pairs or 256), "step_cache": sc, "cache": kind, **row,
                              "runs": len(rows), "loadavg": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
