"""Readouts of the same trained runs (issue 19): which features of a run `embed` should write.

For every run harness.py left under ROOT/runs/TAG/ (`<set>-ours-s<seed>`), embeds the set's train/
and test/ folders with the run's encoder read out several ways and scores each as the harness does
(kNN-20 and linear probe on the fixed split). No training: the weights are the run's.

    python benchmarks/quality/readouts.py --root .bench/quality --tag defaults-2m --out readouts.jsonl

Readouts:
  grid1        what `embed` writes today: the last feature map's global average, centred on the run's
               training mean (saved in the checkpoint), unit length
  grid2        the same map average-pooled on a 2 x 2 grid (pretrain --embed-grid 2), centred per cell
  grid1-std    grid1 with every feature divided by its spread over the training images
               (standardised; computed here from the train split: a user's folder would give it)
  grid2-std    grid2, standardised likewise
One JSON line per (run, readout), appended to --out; a run whose readouts --out already holds is
skipped (run it again after more harness runs: only the new ones are embedded).
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

from harness import classes_of, emit, image_paths, labels_of, score, unit  # noqa: E402

READOUTS = ("grid1", "grid2", "grid1-std", "grid2-std")


def features(run: Path, folder: Path, grid: int) -> tuple[np.ndarray, list[str]]:
    from contrastive_cli.infer.embed import iter_embeddings
    from contrastive_cli.infer.encoder import load_encoder

    encoder = load_encoder(run, embed_grid=grid)
    paths = image_paths(folder)
    rows, kept_all = [], []
    for kept, _, _, feats in iter_embeddings(encoder, folder, [folder / p for p in paths]):
        if kept:
            rows.append(feats)
            kept_all += kept
    return np.concatenate(rows), kept_all



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(".bench/quality"))
    p.add_argument("--tag", required=True)
    p.add_argument("--out", type=Path, default=Path("readouts.jsonl"))
    a = p.parse_args()
    runs = sorted((a.root / "runs" / a.tag).glob("*-ours-s*"))
    runs = [r for r in runs if r.is_dir() and (r / "summary.json").exists()]
    if not runs:
        sys.exit(f"no finished runs under {a.root / 'runs' / a.tag}: run harness.py --tag {a.tag} first")
    done = set()
    if a.out.exists():
        rows = [json.loads(line) for line in a.out.read_text().splitlines() if line.strip()]
        done = {(r["tag"], r["set"], r["seed"]) for r in rows}
    for run in runs:
        name, seed = run.name.split("-ours-s")
        if (a.tag, name, int(seed)) in done:
            continue
        classes = classes_of(a.root / name)
        got = {}
        for grid in (1, 2):
            got[grid] = {s: features(run, a.root / name / s, grid) for s in ("train", "test")}
        for readout in READOUTS:
            (xtr, ptr), (xte, pte) = got[int(readout[4])]["train"], got[int(readout[4])]["test"]
            if readout.endswith("-std"):
                spread = np.maximum(xtr.std(axis=0), 1e-6)
                xtr, xte = unit(xtr / spread), unit(xte / spread)
            row = {"tag": a.tag, "set": name, "seed": int(seed), "readout": readout,
                   **score(xtr, labels_of(ptr, classes), xte, labels_of(pte, classes), int(seed))}
            emit(a.out, row)


if __name__ == "__main__":
    main()
