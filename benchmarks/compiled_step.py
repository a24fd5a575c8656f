"""Is the compiled train step the same program in two checkouts? A hash of XLA's compiled step.

Compiles the tool's CPU train step (Winograd convolutions, the Eigen XLA flag; SGD; 32 px) in this
checkout and in each `--tree` (another checkout: its own package, its own benchmarks/step_speed.py
set-up), strips the source-location tables (file names and line numbers differ when code moves),
and prints one JSON line per encoder and tree with the hash and size of what is left. Equal hashes:
the same program, so any speed difference between the trees is the machine's noise.

    git worktree add /tmp/before 6e062ee
    python benchmarks/compiled_step.py --tree /tmp/before
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("small", 256), ("resnet18", 64))


def worker() -> None:
    """In a checkout's root (cwd): compile its step for RUNS and print the hashes."""
    root = Path.cwd()
    sys.path[:0] = [str(root), str(root / "benchmarks")]
    layered = (root / "contrastive_cli" / "perf").is_dir()
    if layered:  # the CLI's process settings: the speed wing's XLA flag before JAX starts
        from contrastive_cli.perf import xla

        xla.prefer_eigen_convolutions()
    else:  # checkouts before the wing: importing the package set them
        import contrastive_cli  # noqa: F401
    import step_speed

    from contrastive_cli.config import ModelConfig, TrainConfig

    for encoder, pairs in RUNS:
        conv = {"conv": "winograd"} if layered else {}  # older checkouts: fastconv by default on CPU
        cfg = TrainConfig(model=ModelConfig(encoder=encoder, image_size=32, **conv), batch_size=pairs,
                          optimizer="sgd")
        step, state, images = step_speed.build(cfg)
        text = step.lower(state, images).compile().as_text()
        body = "\n".join(line for line in text.splitlines()
                         if not re.match(r'^\d+ (\{|")', line)  # the file-name and location tables
                         and not line.startswith("HloModule"))
        body = re.sub(r"(, )?metadata=\{[^}]*\}", "", body)
        print(json.dumps({"encoder": encoder, "pairs": pairs, "tree": str(root),
                          "program_sha256": hashlib.sha256(body.encode()).hexdigest()[:16],
                          "lines": body.count("\n") + 1}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="another checkout to compare with")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker()
    for tree in [ROOT, *map(Path, a.tree)]:
        env = dict(os.environ, PYTHONPATH=str(tree.resolve()), JAX_PLATFORMS="cpu",
                   CONTRASTIVE_FAST_CONV="1", CONTRASTIVE_WINOGRAD="1")  # what older checkouts read
        subprocess.run([sys.executable, __file__, "--worker"], cwd=tree, env=env, check=True)


if __name__ == "__main__":
    main()
