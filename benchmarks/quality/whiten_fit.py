"""How many training images does the whitening need? kNN of whitened 4 x 4 maps fitted on N images.

Reads the maps layers.py cached (RUN/layers.npz, block "4g4") of a tag's runs, fits the centre and
the whitening `embed` uses (contrastive_cli.infer.whiten) on N of the train split's images (seeded),
and scores kNN-20 on the test split, for each N (all: the whole split):

    python benchmarks/quality/whiten_fit.py --root .bench/quality --tag s14-defaults

One JSON line per (run, N, dim); then the mean over runs per (N, dim).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from harness import classes_of, labels_of, unit  # noqa: E402

from contrastive_cli.infer import whiten  # noqa: E402
from contrastive_cli.infer.knn import knn_accuracy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(".bench/quality"))
    p.add_argument("--tag", required=True)
    p.add_argument("--n", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 0], help="0: all")
    p.add_argument("--dims", nargs="+", type=int, default=[512])
    a = p.parse_args()
    runs = sorted(r for r in (a.root / "runs" / a.tag).glob("*-ours-s*") if (r / "layers.npz").exists())
    if not runs:
        sys.exit(f"no layers.npz under {a.root / 'runs' / a.tag}: run layers.py --tag {a.tag} first")
    means: dict[tuple[int, int], list[float]] = {}
    for run in runs:
        name, seed = run.name.split("-ours-s")
        z = np.load(run / "layers.npz", allow_pickle=True)
        tr, te = z["train:4g4"], z["test:4g4"]
        classes = classes_of(a.root / name)
        ytr, yte = labels_of(list(z["train-paths"]), classes), labels_of(list(z["test-paths"]), classes)
        for n in a.n:
            pick = np.random.default_rng(int(seed)).permutation(len(tr))[:n or len(tr)]
            centre = tr[pick].mean(axis=0)
            for dim in a.dims:
                mean, matrix = whiten.fit(unit(tr[pick] - centre), dim)
                xtr, xte = (whiten.apply(unit(x - centre), mean, matrix) for x in (tr, te))
                knn = knn_accuracy(xtr, ytr, xte, yte)
                means.setdefault((n, dim), []).append(knn)
                print(json.dumps({"run": run.name, "n": n or len(tr), "dim": dim, "knn": round(knn, 4)}), flush=True)
    for (n, dim), v in sorted(means.items(), key=lambda kv: (kv[0][0] or 10**9, kv[0][1])):
        print(f"N={n or 'all'} dim={dim}: mean kNN {np.mean(v):.4f} over {len(v)} runs")


if __name__ == "__main__":
    main()
