"""Multi-layer readouts of the same trained runs (issue 19): do earlier feature maps help kNN?

Raw pixels beat trained encoders in kNN on shape-heavy sets (glyphs, icons): the last map of a
contrastively trained CNN is invariant to much of what tells those classes apart. This reads a
small-CNN run's layers 2, 3 and 4 (the maps after each ConvBNReLU), average-pools each on a grid,
centres every block on its mean over the set's train split, scales each block to unit length and
concatenates them (each block weighs the same in a cosine), and scores them as harness.py does.

    python benchmarks/quality/layers.py --root .bench/quality --tag defaults-2m --out layers.jsonl

Readouts are named by their blocks: "4g2" = layer 4 on a 2 x 2 grid (what embed writes today, but
centred on the train split instead of the run's saved centre); "3g2+4g2" = both blocks. One JSON line
per (run, readout), appended to --out; runs already there are skipped.

`--peer` reads the peer's runs of the tag instead (`<set>-lightly-s<seed>`: the embeddings the peer
script wrote, its backbone's global average): one block, "h", so readouts "h", "h/pca256", "h/pcaw256"
(the same centring, PCA and whitening as ours get).
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

READOUTS = ("4g1", "4g2", "4g4", "3g2+4g2", "3g4+4g2", "3g4+4g4", "2g4+3g4+4g2", "3g2+4g1", "3g4+4g1",
            "4g4/pca1024", "4g4/pcaw1024", "3g4+4g4/pca1024", "3g4+4g4/pcaw1024", "4g4/pca256")


def maps(run: Path, folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """{"2g4": float32 [N, 16*64], ...} for every block a readout names, and the kept paths."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from contrastive_cli.data.decode import decode_files, decode_pool
    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.nn import augment
    from contrastive_cli.nn.models import grid_pool

    encoder = load_encoder(run)
    if encoder.name != "small":
        sys.exit(f"{run}: layers.py reads the small CNN's layers, not {encoder.name}")
    blocks = sorted({b for r in READOUTS for b in r.partition("/")[0].split("+")})
    cfg = encoder.cfg

    @jax.jit
    def forward(params, stats, images):
        model = nnx.merge(encoder.graphdef, params, stats)
        x = augment.normalize(images, cfg.augment)
        out = {}
        for i, layer in enumerate(model.encoder.layers, 1):
            x = layer(x, False)
            for b in blocks:
                if int(b[0]) == i:
                    out[b] = grid_pool(x, int(b[2:]))
        return out

    paths = image_paths(folder)
    with decode_pool() as pool:
        images, kept, _ = decode_files(folder, [folder / p for p in paths], encoder.image_size, pool=pool)
    rows: dict[str, list] = {b: [] for b in blocks}
    for i in range(0, len(images), 256):
        got = forward(encoder.params, encoder.stats, jnp.asarray(images[i:i + 256]))
        for b in blocks:
            rows[b].append(np.asarray(got[b]))
    return {b: np.concatenate(v) for b, v in rows.items()}, kept



def readout(name: str, train: dict, test: dict) -> tuple[np.ndarray, np.ndarray]:
    """Blocks centred, unit, concatenated; "/pcaD" then projects on the train split's first D
    principal axes, "/pcawD" also divides each axis by the square root of its spread (whitening,
    eigenvalues floored at 1% of the largest), before the final unit length."""
    name, _, reduce = name.partition("/")
    parts_tr, parts_te = [], []
    for b in name.split("+"):
        mean = train[b].mean(axis=0)
        parts_tr.append(unit(train[b] - mean))
        parts_te.append(unit(test[b] - mean))
    xtr, xte = np.concatenate(parts_tr, 1), np.concatenate(parts_te, 1)
    if reduce:
        reduce, _, floor = reduce.partition("@")
        floor = float(floor or 0.01)
        d = int(reduce.lstrip("pcaw"))
        mean = xtr.mean(axis=0)
        _, sv, vt = np.linalg.svd(xtr - mean, full_matrices=False)
        axes = vt[:d].T
        if reduce.startswith("pcaw"):
            var = sv[:d] ** 2
            axes = axes / np.sqrt(np.maximum(var, floor * var[0]))
        xtr, xte = (xtr - mean) @ axes, (xte - mean) @ axes
    return unit(xtr), unit(xte)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(".bench/quality"))
    p.add_argument("--tag", required=True)
    p.add_argument("--out", type=Path, default=Path("layers.jsonl"))
    p.add_argument("--readouts", nargs="+", default=None, help="default: all of READOUTS (--peer: h h/pcaw256)")
    p.add_argument("--peer", action="store_true", help="the tag's lightly runs, not ours")
    a = p.parse_args()
    a.readouts = a.readouts or (["h", "h/pca256", "h/pcaw256"] if a.peer else list(READOUTS))
    kind = "lightly" if a.peer else "ours"
    runs = sorted((a.root / "runs" / a.tag).glob(f"*-{kind}-s*"))
    runs = [r for r in runs if (r / "test.npy").exists()] if a.peer else [r for r in runs if (r / "summary.json").exists()]
    if not runs:
        sys.exit(f"no finished runs under {a.root / 'runs' / a.tag}: run harness.py --tag {a.tag} first")
    done = set()
    if a.out.exists():
        done = {(r["tag"], r["set"], r["seed"]) for r in map(json.loads, a.out.read_text().splitlines())}
    for run in runs:
        name, seed = run.name.split(f"-{kind}-s")
        if (a.tag, name, int(seed)) in done:
            continue
        classes = classes_of(a.root / name)
        cache = run / "layers.npz"  # the maps, kept: a new readout reruns in seconds
        if a.peer:
            (tr, ptr), (te, pte) = [({"h": np.load(run / f"{s}.npy")}, json.loads((run / f"{s}.json").read_text())["paths"])
                                    for s in ("train", "test")]
        elif cache.exists():
            z = np.load(cache, allow_pickle=True)
            (tr, ptr), (te, pte) = [({k[len(s) + 1:]: z[k] for k in z.files if k.startswith(s + ":")}, list(z[s + "-paths"]))
                                    for s in ("train", "test")]
        else:
            (tr, ptr), (te, pte) = (maps(run, a.root / name / s) for s in ("train", "test"))
            np.savez(cache, **{f"train:{k}": v for k, v in tr.items()}, **{f"test:{k}": v for k, v in te.items()},
                     **{"train-paths": np.asarray(ptr), "test-paths": np.asarray(pte)})
        for r in a.readouts:
            xtr, xte = readout(r, tr, te)
            row = {"tag": a.tag, "set": name, "seed": int(seed), "method": kind, "readout": r,
                   **score(xtr, labels_of(ptr, classes), xte, labels_of(pte, classes), int(seed))}
            emit(a.out, row)


if __name__ == "__main__":
    main()
