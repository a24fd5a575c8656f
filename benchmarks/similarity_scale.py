"""Which representation gives a similarity a person can read: edited copies of an image near 1,
unrelated images near 0, whatever the run (issue 19).

For N images of FOLDER, writes one edited copy of each as a real file (a crop of 80-95% of the
area, a 50% downscale, JPEG at quality 40, a colour change, or a mix), embeds originals and copies
with the run's encoder, and scores three representations of each image:

    features    the encoder's features h, L2-normalised (what `embed` wrote before 0.2.1)
    centred     h minus the mean of h over REFERENCE images (other images than the N), normalised
    projection  the projection head's output z, normalised (what the loss compares)
    whitened    h less the REFERENCE mean, on its first 512 principal axes, each divided by the square
                root of its variance (PCA whitening fit on REFERENCE), normalised
    embed       h minus the run's saved centre (the mean over its training images), normalised:
                what `embed` writes since 0.2.1

Prints, per representation, the median cosine of (image, its copy) pairs and of random distinct
pairs, the ROC AUC of copies against distinct pairs, the share of distinct pairs at or above the
cosine that keeps 95% of the copies, and the gap between the copies' 5th and the distinct pairs'
95th percentile. One JSON line each.

    python benchmarks/similarity_scale.py --run RUN --folder IMAGES [--n 400] [--reference DIR]

`--knn SET` instead scores kNN-20 (cosine, as `contrastive evaluate`) of SET/test against SET/train
(class = first subfolder; the harness's sets, benchmarks/quality/sets.py) with each representation,
the centre of "centred" being the mean over SET/train (or REFERENCE).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageEnhance

from contrastive_cli.data.decode import decode_or_reason
from contrastive_cli.data.scan import scan_images
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.nn import augment


def edit(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if kind == "crop":
        s = np.sqrt(rng.uniform(0.80, 0.95))
        cw, ch = max(1, int(w * s)), max(1, int(h * s))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        return image.crop((x, y, x + cw, y + ch))
    if kind == "resize":
        return image.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=40)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "colour":
        out = ImageEnhance.Brightness(image.convert("RGB")).enhance(rng.uniform(0.8, 1.2))
        return ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    return edit(edit(edit(image, "crop", rng), "colour", rng), "jpeg", rng)  # "mix"


def forward_fn(encoder):
    cfg = encoder.cfg

    @jax.jit
    def forward(params, stats, images):
        model = nnx.merge(encoder.graphdef, params, stats)
        x = augment.normalize(images, cfg.augment)
        h = model.embed(x, cfg.model.embed_grid)
        _, z = model(x, train=False)
        return h, z

    return forward


def represent(encoder, forward, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    hs, zs = [], []
    images = np.stack([decode_or_reason(p, encoder.image_size) for p in paths])
    for i in range(0, len(images), 128):
        h, z = forward(encoder.params, encoder.stats, jnp.asarray(images[i:i + 128]))
        hs.append(np.asarray(h))
        zs.append(np.asarray(z))
    return np.concatenate(hs), np.concatenate(zs)


def whitening(href: np.ndarray, dims: int = 512, floor: float = 0.01):
    """x -> (x - mean) @ W: the reference's first `dims` principal axes, each divided by the square
    root of its variance (floored at `floor` of the largest): PCA whitening, fit on the reference."""
    mean = href.mean(axis=0)
    _, sv, vt = np.linalg.svd(href - mean, full_matrices=False)
    var = sv[:dims] ** 2
    w = vt[:dims].T / np.sqrt(np.maximum(var, floor * var[0]))
    return lambda x: (x - mean) @ w


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a copy pair scores above a distinct pair), ties counted half (Mann-Whitney U)."""
    scores = np.concatenate([pos, neg])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def score(name: str, a: np.ndarray, b: np.ndarray, pairs: np.ndarray) -> dict:
    copies = np.sum(a * b, axis=1)
    distinct = np.sum(a[pairs[:, 0]] * a[pairs[:, 1]], axis=1)
    keep95 = np.quantile(copies, 0.05)
    return {"representation": name, "copies_median": round(float(np.median(copies)), 4),
            "distinct_median": round(float(np.median(distinct)), 4),
            "distinct_p95": round(float(np.quantile(distinct, 0.95)), 4),
            "copies_p05": round(float(keep95), 4), "gap": round(float(keep95 - np.quantile(distinct, 0.95)), 4),
            "auc": round(auc(copies, distinct), 4),
            "false_pos_at_95_recall": round(float(np.mean(distinct >= keep95)), 4)}


def written(encoder, h: np.ndarray) -> np.ndarray:
    """What `embed` writes from h: less the run's centre (per cell, or one for every cell), unit,
    whitened when the run saved a whitening (0.4.0 on)."""
    c = encoder.centre if encoder.centre.size == h.shape[1] else np.tile(encoder.centre, encoder.cfg.model.embed_grid ** 2)
    return encoder.whiten(unit(h - c))


def knn(a) -> None:
    from contrastive_cli.infer.knn import knn_accuracy

    encoder = load_encoder(a.run, embed_grid=a.embed_grid)
    forward = forward_fn(encoder)

    def split(name):
        files = scan_images(a.knn / name)
        h, z = represent(encoder, forward, files)
        return h, z, [f.relative_to(a.knn / name).parts[0] for f in files]

    htr, ztr, ytr = split("train")
    hte, zte, yte = split("test")
    classes = sorted(set(ytr) | set(yte))
    ytr, yte = np.array([classes.index(c) for c in ytr]), np.array([classes.index(c) for c in yte])
    mean = represent(encoder, forward, scan_images(a.reference))[0].mean(axis=0) if a.reference else htr.mean(axis=0)
    white = whitening(represent(encoder, forward, scan_images(a.reference))[0] if a.reference else htr)
    reps = [("features", htr, hte), ("centred", htr - mean, hte - mean), ("projection", ztr, zte),
            ("whitened", white(htr), white(hte))]
    if encoder.centre is not None:
        reps.append(("what embed writes", written(encoder, htr), written(encoder, hte)))
    for name, tr, te in reps:
        print(json.dumps({"run": str(a.run), "set": str(a.knn), "representation": name,
                          "knn20": round(knn_accuracy(unit(tr), ytr, unit(te), yte, k=20), 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--folder", type=Path)
    p.add_argument("--knn", type=Path, help="a labeled set with train/ and test/: score kNN instead")
    p.add_argument("--reference", type=Path, help="images for the centring mean (default: FOLDER's other images)")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--embed-grid", type=int, default=0, help="read h on this grid (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.knn:
        return knn(a)
    rng = np.random.default_rng(a.seed)
    files = scan_images(a.folder)
    order = rng.permutation(len(files))
    chosen = [files[i] for i in order[: a.n]]
    reference = (scan_images(a.reference) if a.reference
                 else [files[i] for i in order[a.n: a.n + 2000]])
    encoder = load_encoder(a.run, embed_grid=a.embed_grid)
    forward = forward_fn(encoder)
    kinds = ["crop", "resize", "jpeg", "colour", "mix"]
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for i, path in enumerate(chosen):
            out = Path(tmp) / f"{i:05d}.png"
            edit(Image.open(path).convert("RGB"), kinds[i % len(kinds)], rng).save(out)
            copies.append(out)
        h, z = represent(encoder, forward, chosen)
        hc, zc = represent(encoder, forward, copies)
    href, _ = represent(encoder, forward, reference)
    mean = href.mean(axis=0)
    pairs = rng.integers(0, len(chosen), (4000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    common = {"run": str(a.run), "folder": str(a.folder), "n": len(chosen), "reference": len(reference)}
    reps = [("features", unit(h), unit(hc)), ("centred", unit(h - mean), unit(hc - mean)),
            ("projection", unit(z), unit(zc))]
    white = whitening(href)
    reps.append(("whitened (PCA 512 of the reference)", unit(white(h)), unit(white(hc))))
    if encoder.centre is not None:
        reps.append(("what embed writes", written(encoder, h), written(encoder, hc)))
    for name, x, y in reps:
        print(json.dumps({**common, **score(name, x, y, pairs)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
