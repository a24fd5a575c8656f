"""Embedding quality on a real labeled dataset: Fashion-MNIST, from Debian's `dataset-fashion-mnist`.

Writes the 60k training images (class subfolders; pretrain ignores them: it never sees labels) and
the 10k test images as PNG folders, pretrains for a fixed wall-clock budget per loss, then reports
kNN (k=20) and linear-probe accuracy on the test set, with the training set as the labeled
reference, against raw pixels and a randomly initialised encoder. One JSON line per result.
Pretraining runs as `contrastive pretrain` runs it: the speed wing switched on at start-up
(perf.switch_on), JAX's compilation cache and the step cache (CONTRASTIVE_STEP_CACHE=0: none), the
convolution "auto" resolved for the backend ("winograd" on CPU; `--set model.conv=xla` to choose).

    apt-get install dataset-fashion-mnist      # once (a real image set, MIT licence)
    python benchmarks/quality_fashion_mnist.py --minutes 10 --losses ntxent cosine
"""
from __future__ import annotations  # noqa: I001  (contrastive_cli.perf before numpy/jax: see perf/malloc.py tune_malloc)

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

from contrastive_cli import perf  # noqa: I001  (first: the CLI's malloc and XLA settings, before JAX starts)
perf.switch_on(reexec=True)  # as the `contrastive` command: re-run once with glibc's tunables
import numpy as np
from PIL import Image

SRC = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(SRC / name).read(), np.uint8, offset=offset)


def write_split(root: Path, split: str, limit: int | None) -> Path:
    prefix = "train" if split == "train" else "t10k"
    out = root / split
    if (out / ".complete").exists():
        return out
    x = read_idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = read_idx(f"{prefix}-labels-idx1-ubyte.gz", 8)
    n = len(x) if limit is None else min(limit, len(x))
    for name in NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(x[i]).save(out / NAMES[y[i]] / f"{i:05d}.png")
    (out / ".complete").write_text(str(n))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget per loss")
    p.add_argument("--steps", type=int, default=0,
                   help="train a fixed number of steps instead of --minutes (fair on a busy machine)")
    p.add_argument("--losses", nargs="+", default=["ntxent", "cosine"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--encoder", default="small")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--no-baselines", action="store_true", help="skip raw pixels and random init")
    p.add_argument("--work", type=Path, default=Path(".bench/fashion-mnist"))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="TrainConfig overrides, e.g. temperature=0.2 augment.blur_p=0 augment.crop_scale=0.2,1")
    a = p.parse_args()
    if not SRC.exists():
        sys.exit(f"{SRC} not found: apt-get install dataset-fashion-mnist")

    import dataclasses

    from contrastive_cli.cli import _enable_compilation_cache, _step_cache  # what `contrastive pretrain` uses
    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.infer.encoder import load_encoder, random_encoder
    from contrastive_cli.infer.evaluate import evaluate
    from contrastive_cli.nn.conv import resolve
    from contrastive_cli.train.loop import pretrain

    _enable_compilation_cache()

    t = time.perf_counter()
    train_dir = write_split(a.work, "train", a.train_limit)
    test_dir = write_split(a.work, "test", None)
    print(f"folders ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    def report(**row):
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)

    base = TrainConfig(model=ModelConfig(encoder=a.encoder, image_size=a.image_size, conv="auto"), batch_size=a.batch_size,
                       time_budget=0 if a.steps else a.minutes, steps=a.steps, log_every=50)
    base = with_overrides(base, a.set)
    # "auto" resolved here, as pretrain resolves it: the random encoder is built from this config too.
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, conv=resolve(base.model.conv)))
    if not a.no_baselines:
        rnd = evaluate(None, None, train_dir=train_dir, test_dir=test_dir, encoder=random_encoder(base))
        report(model="random init", **{k: rnd[k] for k in ("embed_grid", "dim", "knn", "linear", "n_train", "n_test")})
        report(model="raw pixels", knn=rnd["raw_knn"], linear=rnd["raw_linear"])
    for loss in a.losses:
        cfg = TrainConfig(**{**base.__dict__, "loss": loss})
        tag = "".join(f"-{kv.replace('augment.', '').replace(',', '_')}" for kv in a.set)
        batch = "" if a.batch_size == 256 else f"-b{a.batch_size}"  # 256: the names of older runs
        run = a.work / f"run-{loss}-{a.encoder}-{a.image_size}{batch}-{f'{a.steps}steps' if a.steps else f'{a.minutes:g}min'}{tag}"
        summary = pretrain(train_dir, cfg, run, force=True, step_cache=_step_cache())
        res = evaluate(None, None, train_dir=train_dir, test_dir=test_dir, encoder=load_encoder(run), raw=False)
        report(model=f"{a.encoder} {loss}", settings=a.set, budget_minutes=0 if a.steps else a.minutes,
               steps=summary["steps"], wall_s=round(summary["wall_s"]), embed_grid=res["embed_grid"],
               dim=res["dim"], knn=res["knn"], linear=res["linear"], final_loss=summary["final_loss"])
        if res["embed_grid"] > 1:  # the same weights read out by global average pooling, for comparison
            gap = evaluate(None, None, train_dir=train_dir, test_dir=test_dir, raw=False,
                           encoder=load_encoder(run, embed_grid=1))
            report(model=f"{a.encoder} {loss}", embed_grid=1, dim=gap["dim"], knn=gap["knn"], linear=gap["linear"])


def with_overrides(cfg, pairs: list[str]):
    """cfg with KEY=VALUE pairs applied; `augment.` and `model.` reach the nested configs; a value
    takes the type of the field it replaces (tuples: comma-separated)."""
    import dataclasses

    nested: dict[str, dict] = {"": {}, "augment": {}, "model": {}}
    for pair in pairs:
        key, _, value = pair.partition("=")
        part, _, name = key.rpartition(".")
        target = getattr(cfg, part) if part else cfg
        old = getattr(target, name)  # AttributeError names an unknown key
        if isinstance(old, tuple):
            new = tuple(type(old[0])(v) for v in value.split(","))
        elif isinstance(old, bool):
            new = value.lower() in ("1", "true", "yes")
        else:
            new = type(old)(value)
        nested[part][name] = new
    for part in ("augment", "model"):
        if nested[part]:
            nested[""][part] = dataclasses.replace(getattr(cfg, part), **nested[part])
    return dataclasses.replace(cfg, **nested[""])


if __name__ == "__main__":
    main()
