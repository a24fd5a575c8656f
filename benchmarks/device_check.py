"""One prepared check of an accelerator machine (issue 22): ours against the peer, one JSON file.

    benchmarks/device_check.sh [--dry-run] [--out device_check.json] [--peer-python PY]

For each case (model, image size, pairs per step) it runs, as a user would, `contrastive pretrain`
(default precision: bf16 on GPU/TPU) on a folder of synthetic JPEGs it writes, then `contrastive
embed` of that folder with the run, and records: pairs/s (median of the logged intervals after the
first, compile excluded), data wait (the share of the loop spent waiting for a batch), the first
step's compile time, the run's wall time, and embed's images/s over its whole command (start,
decode and compile included, as a user waits for it). Then the peer (benchmarks/device_peer.py:
lightly's SimCLR on PyTorch, channels-last, autocast) on the same cases, and the ratio of the two.

Cases: ResNet-18 and ResNet-50 at 224 px with 256 pairs per step, the small CNN at 32 px with 1,024
(`--dry-run`: tiny sizes on any machine, CPU included, for the test that keeps the script from
rotting; ours runs the small CNN only, the peer both it and ResNet-18). The JSON is rewritten after every case, so a command stopped at its limit keeps what
finished. A case that fails (out of memory, say) records its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "benchmarks" / "device_peer.py"
# (encoder, image size, pairs per step, steps after the first)
FULL = [("resnet18", 224, 256, 30), ("resnet50", 224, 256, 30), ("small", 32, 1024, 60)]
DRY = [("small", 16, 16, 4), ("resnet18", 16, 4, 1)]
DRY_OURS = 1  # of DRY: ours compiles only the small CNN in a dry run (ResNet-18's compile alone took 13 s of a
# 70 s dry run on 2 cores); the peer runs both, its ResNet costing 3 s
FULL_IMAGES, DRY_IMAGES = 2048, 32


def write_folder(folder: Path, n: int, side: int) -> None:
    """`n` JPEGs of side x side: smooth colour fields with a few shapes, as photos compress."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        a = rng.uniform(0, 6, (3, 3))
        img = 127 + 120 * np.sin(a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + a[:, 2, None, None])
        img = img.transpose(1, 2, 0).astype(np.uint8)
        for _ in range(3):
            x0, y0 = rng.integers(0, side - side // 4, 2)
            img[y0:y0 + side // 4, x0:x0 + side // 4] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def contrastive(*args: str, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "contrastive_cli", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    return time.perf_counter() - t, out


def ours(encoder: str, size: int, batch: int, steps: int, folder: Path, n: int, work: Path, timeout: float) -> dict:
    row = dict(model=encoder, image_size=size, batch=batch)
    run = work / f"run-{encoder}-{size}"
    log_every = max(1, steps // 6)
    wall, out = contrastive("pretrain", str(folder), "--encoder", encoder, "--image-size", str(size), "-b", str(batch),
                            "--steps", str(steps + 1), "--log-every", str(log_every), "--output", str(run), "--force",
                            "--quiet", timeout=timeout)
    if out.returncode:
        return {**row, "error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:300]}
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records  # the first interval holds the compile
    row.update(pairs_per_s=round(statistics.median(r["pairs_per_s"] for r in later), 2),
               data_wait=round(statistics.mean(r["data_wait"] for r in later), 4),
               compile_s=round(summary["compile_s"], 2), steps=summary["steps"], pretrain_wall_s=round(wall, 2),
               precision=summary["precision"], conv=summary["conv"], backend=summary["backend"],
               device_kind=summary["device_kind"])
    wall, out = contrastive("embed", str(folder), "-m", str(run), "-o", str(work / f"emb-{encoder}.npy"), "--force",
                            timeout=timeout)
    if out.returncode:
        row["embed_error"] = (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:300]
    else:
        row.update(embed_images=n, embed_wall_s=round(wall, 2), embed_images_per_s=round(n / wall, 1))
    return row


def peer(python: str, cases: list[tuple], dry: bool, timeout: float) -> list[dict]:
    found = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True, text=True)
    if found.returncode:
        return [{"skipped": f"torch and torchvision not importable by {python}"}]
    args = [python, str(PEER), "--steps", "3" if dry else "20", "--warmup", "1" if dry else "3"]
    for encoder, size, batch, _ in cases:
        args += ["--case", f"{encoder}:{size}:{batch}"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"the peer ran past {timeout:.0f} s"}]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode and not rows:
        rows = [{"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:300]}]
    return rows


def machine() -> dict:
    info = dict(host=platform.node(), python=platform.python_version(), cpus=os.cpu_count())
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpus"] = out.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__, jax.default_backend(), "
                            "jax.devices()[0].device_kind, jax.device_count(), sep='|')"],
                           capture_output=True, text=True, cwd=REPO)
    fields = probe.stdout.strip().split("|")
    if len(fields) == 4:
        info.update(jax=fields[0], backend=fields[1], device_kind=fields[2], devices=int(fields[3]))
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, any machine (the test runs this on CPU)")
    p.add_argument("--out", type=Path, default=Path("device_check.json"))
    p.add_argument("--peer-python", default=sys.executable, help="the Python that has torch (default: this one)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    a = p.parse_args()
    cases, n, side = (DRY, DRY_IMAGES, 40) if a.dry_run else (FULL, FULL_IMAGES, 256)
    timeout = 120 if a.dry_run else 240
    work = a.work or Path(tempfile.mkdtemp(prefix="device_check-"))
    t0 = time.perf_counter()
    result = dict(dry_run=a.dry_run, started=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine(), ours=[], peer=[])

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, a.out)

    try:
        write_folder(work / "images", n, side)
        for encoder, size, batch, steps in cases[:DRY_OURS] if a.dry_run else cases:
            try:
                row = ours(encoder, size, batch, steps, work / "images", n, work, timeout)
            except subprocess.TimeoutExpired:
                row = dict(model=encoder, image_size=size, batch=batch, error=f"ran past {timeout} s")
            result["ours"].append(row)
            print(json.dumps(row), flush=True)
            save()
        result["peer"] = peer(a.peer_python, cases, a.dry_run, timeout * len(cases))
        mine = {(r["model"], r["image_size"], r["batch"]): r for r in result["ours"] if "pairs_per_s" in r}
        result["ratio_ours_to_peer"] = {
            f"{r['model']}:{r['image_size']}:{r['batch']}": round(mine[k]["pairs_per_s"] / r["pairs_per_s"], 3)
            for r in result["peer"] if "pairs_per_s" in r and (k := (r["model"], r["image_size"], r["batch"])) in mine}
        save()
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("ratio_ours_to_peer", "wall_s") if k in result}))


if __name__ == "__main__":
    main()
