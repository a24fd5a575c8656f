"""Input pipeline and end-to-end training speed against the peer (lightly), in one run.

Prints one JSON line per figure:
  loader_cold   images/s decoding a folder of photo-sized JPEGs (threads, JPEG draft)
  loader_warm   images/s loading the same folder from the decoded-image cache
  augment       views/s of the on-device augmentation (jit, B=256)
  e2e           pretrain pairs/s over whole epochs (decode included, cold cache), data-wait share:
                `pairs_per_s` over the whole run (set-up, final checkpoint and plot included);
                `loop_pairs_per_s` over decoding + the training loop, what the peer's figure times
                (it starts after building its model and ends after its last epoch, no save)
  peer_e2e      lightly's SimCLRTransform + ImageFolder + DataLoader(2 workers) + the same encoder
  ratio         ours / peer

`pretrain` runs as `contrastive pretrain` runs it: the speed wing switched on at start-up
(perf.switch_on: a re-exec with glibc's tunables, malloc, the Eigen flag), JAX's compilation cache
and the step cache in the user cache directory (CONTRASTIVE_STEP_CACHE=0: none), and the
convolution "auto" (resolved to "winograd" on CPU, recorded in the run's config.json).

    .peer/bin/pip ...   # see ../shared/peers/README.md for the peer's venv
    python benchmarks/pipeline_speed.py --images 2000 --epochs 2 --repeats 3
"""
from __future__ import annotations  # noqa: I001  (contrastive_cli.perf before numpy/jax: see perf/malloc.py tune_malloc)

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from contrastive_cli import perf  # noqa: I001  (first: the CLI's malloc and XLA settings, before JAX starts)
perf.switch_on(reexec=True)  # as the `contrastive` command: re-run once with glibc's tunables
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "lightly_simclr_bench.py"


def write_photos(folder: Path, n: int, seed: int = 0) -> Path:
    """n synthetic 500x375 JPEGs (smooth gradients, shapes, texture): decode cost of real photos."""
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(seed)
    sub = folder / "all"  # the peer's ImageFolder wants one level of subfolders
    sub.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (np.cos(rng.uniform(0, 6.3)) * xx + np.sin(rng.uniform(0, 6.3)) * yy)[..., None]
        base = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (375, 500, 3))
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 500), rng.integers(0, 375)
            r = rng.integers(20, 120)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.filter(ImageFilter.GaussianBlur(1)).save(sub / f"{i:05d}.jpg", quality=90)
    (folder / ".complete").write_text(str(n))
    return folder


def emit(**row):
    row["loadavg"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--encoder", default="small", choices=["small", "resnet18"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "photos")
    p.add_argument("--peer-python", type=Path, default=ROOT / ".peer" / "bin" / "python")
    a = p.parse_args()

    import jax

    from contrastive_cli.nn import augment
    from contrastive_cli.data.cache import load_cached
    from contrastive_cli.config import AugmentConfig, ModelConfig, TrainConfig
    from contrastive_cli.data.decode import load_folder
    from contrastive_cli.train.loop import pretrain
    from contrastive_cli.cli import _enable_compilation_cache, _step_cache  # what `contrastive pretrain` uses
    from contrastive_cli.train.step import working_size

    _enable_compilation_cache()
    folder = write_photos(a.work, a.images)
    r = working_size(a.size)

    cold, warm = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        load_folder(folder, r)
        cold.append(a.images / (time.perf_counter() - t))
        cache_root = Path(tempfile.mkdtemp())
        load_cached(folder, r, root=cache_root)
        t = time.perf_counter()
        data, decoded = load_cached(folder, r, root=cache_root)
        np.asarray(data.images).sum()  # touch every byte
        warm.append(a.images / (time.perf_counter() - t))
        shutil.rmtree(cache_root)
    emit(figure="loader_cold", images_per_s=statistics.median(cold), runs=cold, resolution=r)
    emit(figure="loader_warm", images_per_s=statistics.median(warm), runs=warm)

    cfg = AugmentConfig()
    fn = jax.jit(lambda x, k: augment.augment_views(x, key=k, cfg=cfg, size=a.size))
    x = jax.numpy.asarray(data.images[: a.batch])
    jax.block_until_ready(fn(x, jax.random.key(0)))
    times = []
    for i in range(max(5, a.repeats)):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, jax.random.key(i)))
        times.append(time.perf_counter() - t)
    emit(figure="augment", views_per_s=2 * a.batch / statistics.median(times))

    ours, loops, waits, steady = [], [], [], []
    for i in range(a.repeats):
        run = Path(tempfile.mkdtemp()) / "run"
        train_cfg = TrainConfig(model=ModelConfig(encoder=a.encoder, image_size=a.size, conv="auto"), batch_size=a.batch,
                                epochs=a.epochs)  # log_every as the CLI: 10
        # cold: decoding is part of the figure; the step cache as the CLI gives it
        s = pretrain(folder, train_cfg, run, cache=False, step_cache=_step_cache())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        # Compilation is a one-off (and cached across runs): leave the first step out, as the peer
        # leaves out its warm-up steps.
        ours.append(s["steps"] * a.batch / (s["wall_s"] - s["compile_s"]))
        loops.append(s["steps"] * a.batch / (s["load_s"] + s["loop_s"] - s["compile_s"]))
        later = [r for r in records[1:] if r["pairs_per_s"]] or records
        steady.append(statistics.median(r["pairs_per_s"] or 0.0 for r in later))
        waits.append(statistics.mean(r["data_wait"] for r in later))
        shutil.rmtree(run.parent)
    emit(figure="e2e", pairs_per_s=statistics.median(ours), runs=ours, loop_pairs_per_s=statistics.median(loops),
         loop_runs=loops, steady_step_pairs_per_s=statistics.median(steady),
         data_wait_share=statistics.median(waits), encoder=a.encoder, batch=a.batch, epochs=a.epochs)

    if not a.peer_python.exists():
        emit(figure="peer_e2e", skipped=f"no peer venv at {a.peer_python}")
        return
    peer = []
    for _ in range(a.repeats):
        out = subprocess.run([str(a.peer_python), str(PEER), "--mode", "e2e", "--data", str(folder),
                              "--model", a.encoder, "--size", str(a.size), "--batch", str(a.batch),
                              "--epochs", str(a.epochs)],
                             capture_output=True, text=True, check=True)
        peer.append(json.loads(out.stdout.strip().splitlines()[-1])["imgs_per_s"])
    emit(figure="peer_e2e", pairs_per_s=statistics.median(peer), runs=peer)
    emit(figure="ratio", e2e_ours_over_peer=statistics.median(ours) / statistics.median(peer),
         loop_ours_over_peer=statistics.median(loops) / statistics.median(peer))


if __name__ == "__main__":
    main()
