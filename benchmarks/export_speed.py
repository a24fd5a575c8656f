"""Exported encoders against `embed`, and the time a `similarity` query takes (issue 21).

For each encoder (small CNN, ResNet-18; 32 px, trained 2 steps on the bundled example: speed does
not depend on the weights), in one process, interleaved, median of --repeats:
  - images/s of `embed`'s forward pass (load_encoder(run).embed: XLA with the run's convolution)
  - images/s of the exported ONNX model in ONNX Runtime (CPU provider, its default threads)
  - images/s of the exported StableHLO in JAX
over --images random uint8 images in batches of 128 (decoding left out: the same for all three).
Then the wall time of `contrastive similarity A B` as a fresh process, warm (median of --repeats
after one untimed run), with the user cache of encoders on and off (CONTRASTIVE_ENCODER_CACHE=0:
the checkpoint is restored through Orbax each time, as before 0.3).

    python benchmarks/export_speed.py [--images 2048] [--repeats 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from contrastive_cli.processor import isa, processor  # noqa: E402

CLI = Path(sys.executable).parent / "contrastive"
EXAMPLE = ROOT / "examples" / "fashion-mnist"


def rate(fn, x, repeats):
    fn(x[:128])  # compile / warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def wall(cmd, env, repeats):
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm: caches filled
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import onnxruntime as ort

    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.infer.export import export
    from contrastive_cli.infer.portable import read_stablehlo

    info = {**processor(), "isa": isa()}
    print(f"# cpu: {info.get('model')} isa={info['isa']} cores={os.cpu_count()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="export-speed-"))
    env = {**os.environ, "CONTRASTIVE_CACHE_DIR": str(work / "cache")}
    x = np.random.default_rng(0).integers(0, 256, (a.images, 32, 32, 3), dtype=np.uint8)
    results = {"cpu": info, "images": a.images, "repeats": a.repeats, "encoders": {}}
    pair = [str(EXAMPLE / "bag" / "00018.png"), str(EXAMPLE / "coat" / "00006.png")]
    for name in ("small", "resnet18"):
        run = work / name
        subprocess.run([str(CLI), "pretrain", str(EXAMPLE), "-o", str(run), "--encoder", name, "--steps", "2",
                        "--batch-size", "16", "--quiet"], env=env, check=True, capture_output=True)
        onnx_path = export(run, "onnx", work / f"{name}.onnx")
        hlo_path = export(run, "stablehlo", work / f"{name}.stablehlo")
        encoder = load_encoder(run)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        hlo = read_stablehlo(hlo_path)

        def onnx_embed(images):
            for i in range(0, len(images), 128):
                session.run(None, {"images": images[i:i + 128]})

        rates = {"embed": [], "onnxruntime": [], "stablehlo": []}
        for _ in range(3):  # interleaved rounds: a noisy neighbour hits all three alike
            rates["embed"].append(rate(encoder.embed, x, a.repeats))
            rates["onnxruntime"].append(rate(onnx_embed, x, a.repeats))
            rates["stablehlo"].append(rate(hlo.embed, x, a.repeats))
        row = {k: statistics.median(v) for k, v in rates.items()}
        sim = [str(CLI), "similarity", *pair, "-m", str(run)]
        row["similarity_s_cached"] = wall(sim, env, a.repeats)
        row["similarity_s_uncached"] = wall(sim, {**env, "CONTRASTIVE_ENCODER_CACHE": "0"}, a.repeats)
        results["encoders"][name] = row
        print(f"{name:9} cpu={info['isa']} embed {row['embed']:8.0f} img/s  onnxruntime {row['onnxruntime']:8.0f} "
              f"img/s ({row['onnxruntime'] / row['embed']:.2f}x)  stablehlo {row['stablehlo']:8.0f} img/s "
              f"({row['stablehlo'] / row['embed']:.2f}x)  similarity warm {row['similarity_s_cached'][0]:.2f} s "
              f"(cache off {row['similarity_s_uncached'][0]:.2f} s)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
