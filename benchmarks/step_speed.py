"""Whole train-step speed: fastconv on and off, XLA flag sets, and the peer (lightly), in one run.

Times `train.step.make_step` (augmentation, encoder, projection head, NT-Xent, SGD: one jitted program)
on random uint8 images, small CNN and ResNet-18 at 32x32. Each variant is a worker process of its
own (its convolution, ModelConfig.conv, and XLA_FLAGS, read before JAX starts); the driver asks the workers
for one step each in turn, so machine load hits all variants alike, and reports medians. It also
checks the variants compute the same step: the first step's loss and parameter update are compared
with the first variant's. The peer, shared/peers/lightly_simclr_bench.py in its own venv on the
same model and batch, runs as workers too, one per --peer-args layout, asked for steps in the same
turns (its model and step are the script's own code, executed up to its timing loop), so a load
change between our runs and the peer's cannot make the ratio: the machine is shared and one step
can take 1.3x another. Its pure mode has no augmentation: `augment_s` is our step's share for it.
One JSON line per figure; pairs/s = pairs of views per second.

    python benchmarks/step_speed.py                       # small:256 resnet18:64 resnet18:256, fast vs native
    python benchmarks/step_speed.py --runs small:256 --steps 10
    python benchmarks/step_speed.py --runs small:256 --variants fast native \\
        "native:--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    python benchmarks/step_speed.py --peer-args=--channels_last   # the peer's fastest small-CNN layout
    python benchmarks/step_speed.py --peer-args="" --peer-args="--views concat" --peer-args=--channels_last

A variant is `fast` or `native`, optionally `:XLA_FLAGS`; a `plain-` prefix leaves malloc untuned
(perf/malloc.py tune_malloc) and without huge pages (malloc_tunables_environ), e.g. `plain-fast`; `fast` runs
the "winograd" convolution, `native` XLA's ("xla"); a `nowino-` prefix runs "im2col" (fastconv without Winograd),
e.g. `nowino-fast`; a `bf16-` prefix runs that variant with `--precision bf16` (bfloat16 compute, as on
a processor with bf16 dot instructions), whatever --precision says, so fp32 and bf16 interleave in one run,
e.g. `bf16-fast`; `nohuge-` runs without the glibc tunables (huge pages, never trimming the heap; malloc still tuned), e.g. `nohuge-fast`; the two views go through the encoder as the tool's
default does (TrainConfig.views: `concat`, one pass over both) unless a suffix says `+separate`
(one pass each) or `+concat`, e.g. `fast+separate`. The peer gets its script's defaults (views separate) plus
each --peer-args; `--autocast` there (this script's, not the peer's) runs the peer's step under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as a PyTorch user asks for bf16 on CPU. Every line carries
the processor (model, family, and its SIMD flags: avx2, avx512*, amx*), since figures from different
instruction sets do not compare. Without flags the
tool's own XLA flags apply (perf/xla.py prefer_eigen_convolutions); `:default` runs XLA's defaults
(YNNPACK convolutions):

    python benchmarks/step_speed.py --variants fast fast:default native:default
    python benchmarks/step_speed.py --variants fast bf16-fast --peer-args=--channels_last \
        --peer-args="--channels_last --autocast"          # fp32 and bf16, ours and the peer's, one run

A `@DIR` suffix runs that variant's worker from another checkout (its own benchmarks/step_speed.py
and package), steps interleaved with this one's: before/after a change, in one run.

    git worktree add /tmp/before HEAD~5 && python benchmarks/step_speed.py --no-peer --variants fast fast@/tmp/before
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

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    # A worker switches the speed wing on as `contrastive pretrain` does (perf.switch_on; the driver
    # set glibc's tunables in its environment): malloc first, before NumPy or JAX start threads,
    # then the Eigen flag, before JAX starts. CONTRASTIVE_MALLOC_TUNING=0 / CONTRASTIVE_XLA_FLAGS=0
    # (the `plain-` prefix, `:default`) leave them alone.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from contrastive_cli.perf import malloc, xla

    malloc.tune_malloc()
    xla.prefer_eigen_convolutions()

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from contrastive_cli.processor import isa, processor  # noqa: E402  (no JAX: safe in the peer's venv)

PROCESSOR = {**processor(), "isa": isa()}
PEER_PY = ROOT / ".peer" / "bin" / "python"
PEER = ROOT.parent / "shared" / "peers" / "lightly_simclr_bench.py"


def emit(**row):
    row["loadavg"] = round(os.getloadavg()[0], 2)
    row["cpu"] = PROCESSOR
    print(json.dumps(row), flush=True)


def setup(cfg):
    """What pretrain builds a step from: the mesh, the optimizer, the model graph, its first state,
    and a batch of random uint8 images (as the loader's: side working_size, split over the mesh)."""
    import jax

    from contrastive_cli.mesh import batch_sharding, data_mesh, replicated
    from contrastive_cli.train.optim import make_optimizer
    from contrastive_cli.train.state import init_state
    from contrastive_cli.train.step import working_size

    mesh = data_mesh()
    tx = make_optimizer(cfg)
    graphdef, state = init_state(cfg, tx, replicated(mesh))
    r = working_size(cfg.model.image_size)
    host = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, r, r, 3), dtype=np.uint8)
    return mesh, tx, graphdef, state, jax.device_put(host, batch_sharding(mesh))


def build(cfg):
    """The jitted (traced) train step, its first state, and a batch of random uint8 images."""
    from contrastive_cli.train.step import make_step

    mesh, tx, graphdef, state, images = setup(cfg)
    return make_step(cfg, graphdef, tx, mesh), state, images


# ---- worker: one variant, one process --------------------------------------------------------
def worker(encoder: str, pairs: int, precision: str, views: str, update_path: str) -> None:
    """Build and compile the step, answer `step` (time one step), `augment`, `quit` on stdin."""
    sys.path.insert(0, str(ROOT))  # malloc and XLA flags: set at the top of the module, before NumPy
    import jax
    import jax.numpy as jnp

    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.nn import augment

    # SGD as the peer; the optimizer barely moves step time.
    conv = os.environ["STEP_SPEED_CONV"]  # the variant's convolution (ModelConfig.conv)
    cfg = TrainConfig(model=ModelConfig(encoder=encoder, image_size=32, conv=conv), batch_size=pairs, optimizer="sgd",
                      precision=precision, views=TrainConfig.views if views == "default" else views)
    step, state, images = build(cfg)
    before = [np.asarray(p) for p in jax.tree.leaves(state["params"])]
    convs = step.lower(state, images).as_text().count("stablehlo.convolution")
    t = time.perf_counter()
    state, out = step(state, images)  # compile (or load from the cache) + first step
    loss = float(out["loss"])
    first = time.perf_counter() - t
    after = [np.asarray(p) for p in jax.tree.leaves(state["params"])]
    np.save(update_path, np.concatenate([(a - b).ravel() for a, b in zip(after, before)]))
    reply = {"ready": True, "first_s": first, "convs": convs, "loss": loss, "fast": conv != "xla"}
    print(json.dumps(reply), flush=True)
    aug = jax.jit(lambda im, key: jnp.concatenate(augment.augment_views(im, key=key, cfg=cfg.augment, size=32)))
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        t = time.perf_counter()
        if cmd == "step":
            state, out = step(state, images)
            jax.block_until_ready(out["loss"])
        elif cmd == "augment":
            jax.block_until_ready(aug(images, jax.random.key(0)))
        print(json.dumps({"s": time.perf_counter() - t}), flush=True)


# ---- driver ----------------------------------------------------------------------------------
class Process:
    """A worker process answering one JSON line per command on stdin."""

    proc: subprocess.Popen

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited with {self.proc.wait()} (run it alone to see why)")
        return json.loads(line)

    def ask(self, cmd: str) -> float:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


class Worker(Process):
    def __init__(self, variant: str, encoder: str, pairs: int, precision: str, tmp: Path):
        spec, _, tree = variant.partition("@")  # @DIR: the worker of another checkout (before/after)
        kind, _, flags = spec.partition(":")
        plain = kind.startswith("plain-")
        kind = kind.removeprefix("plain-")
        if kind.startswith("bf16-"):
            precision, kind = "bf16", kind.removeprefix("bf16-")
        self.precision = precision
        nowino = kind.startswith("nowino-")
        kind = kind.removeprefix("nowino-")
        nohuge = kind.startswith("nohuge-")
        kind = kind.removeprefix("nohuge-")
        kind, _, views = kind.partition("+")
        if kind not in ("fast", "native"):
            raise SystemExit(f"variant {variant!r} must be fast or native after its prefixes (plain-, bf16-, nowino-, nohuge-)")
        if views not in ("", "separate", "concat"):
            raise SystemExit(f"variant {variant!r}: the suffix is +separate or +concat")
        conv = "xla" if kind == "native" else "im2col" if nowino else "winograd"
        env = dict(os.environ, STEP_SPEED_CONV=conv,
                   # what checkouts before ModelConfig.conv read instead
                   CONTRASTIVE_FAST_CONV="0" if kind == "native" else "1", CONTRASTIVE_WINOGRAD="0" if nowino else "1",
                   XLA_FLAGS="" if flags == "default" else flags,
                   CONTRASTIVE_XLA_FLAGS="0" if flags == "default" else "1",
                   CONTRASTIVE_MALLOC_TUNING="0" if plain else "1")
        if not (plain or nohuge):  # as `contrastive pretrain` runs: glibc asked for huge pages
            from contrastive_cli.perf.malloc import malloc_tunables_environ

            env = malloc_tunables_environ(env) or env
        self.update_path = tmp / f"update{abs(hash(variant))}.npy"
        script = Path(tree).resolve() / "benchmarks" / "step_speed.py" if tree else Path(__file__)
        if tree:
            env["PYTHONPATH"] = str(Path(tree).resolve())
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", encoder, str(pairs), precision, views or "default",
             str(self.update_path)], cwd=script.parent.parent,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.info = self._read()
        if self.info.get("fast") != (kind == "fast"):
            raise SystemExit(f"variant {variant!r}: worker reports fast = {self.info.get('fast')}")


# FLOPs of one training pair (two views, forward and backward) by torch's FlopCounter on the peer's
# identical model (lightly_simclr_bench.py --flops), used when the peer's venv is missing.
FLOP_PER_PAIR = {"small": 0.179e9, "resnet18": 6.66e9}


def flop_per_pair(model: str, batch: int) -> float:
    if not PEER_PY.exists():
        return FLOP_PER_PAIR[model]
    cmd = [str(PEER_PY), str(PEER), "--model", model, "--batch", str(batch), "--flops"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["train_flops_per_pair"]


def matmul_peak() -> float:
    """GFLOP/s of a jitted float32 4096 x 4096 matmul here (median of 7): the ceiling a step can near."""
    code = ("import time, statistics, jax, jax.numpy as jnp\n"
            "a = jnp.ones((4096, 4096), jnp.float32); f = jax.jit(lambda a: a @ a); f(a).block_until_ready()\n"
            "ts = []\n"
            "for _ in range(7):\n"
            "    t = time.perf_counter(); f(a).block_until_ready(); ts.append(time.perf_counter() - t)\n"
            "print(2 * 4096 ** 3 / statistics.median(ts) / 1e9)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


# The peer script's model, loss, optimizer and step: its source up to its timing code, run as is.
PEER_CUT = "\nif a.flops:"


def peer_worker(argv: list[str]) -> None:
    """In the peer's venv: build the peer script's model with `argv`, answer `step` and `quit`."""
    src = PEER.read_text()
    head, found, _ = src.partition(PEER_CUT)
    if not found:
        raise SystemExit(f"{PEER} has no {PEER_CUT.strip()!r} to cut its set-up at")
    autocast = "--autocast" in argv  # this script's flag: the peer's step under bf16 autocast
    sys.argv = [str(PEER), *[x for x in argv if x != "--autocast"]]
    ns = {"__name__": "lightly_simclr_bench"}
    exec(compile(head, str(PEER), "exec"), ns)  # noqa: S102  (the peer's own file, as its CLI would run it)
    a, step = ns["a"], ns["step"]
    if autocast:
        import torch

        plain_step = step

        def step(x0, x1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain_step(x0, x1)
    x0, x1 = ns["rnd"]()
    loss = float(step(x0, x1))  # first step: the script's warm-up (allocator, oneDNN primitives)
    for _ in range(max(a.warmup - 1, 0)):
        float(step(x0, x1))
    info = {k: ns["info"][k] for k in ("views", "channels_last", "threads")}
    info["autocast_bf16"] = autocast
    print(json.dumps({"ready": True, "loss": loss, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        t = time.perf_counter()
        float(step(x0, x1))
        print(json.dumps({"s": time.perf_counter() - t}), flush=True)


class PeerWorker(Process):
    """The peer in one layout (`extra`: the script's flags), as a worker answering `step`."""

    def __init__(self, model: str, batch: int, extra: list[str], log: Path):
        argv = ["--model", model, "--batch", str(batch), *extra]
        with log.open("w") as err:  # a file, not a pipe: nobody reads it until something fails
            self.proc = subprocess.Popen([str(PEER_PY), __file__, "--peer-worker", *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"peer worker failed ({' '.join(argv)}):\n{log.read_text()[-2000:]}")
        self.info = json.loads(line)


def run(encoder: str, pairs: int, a, tmp: Path, peak: float) -> None:
    flop = flop_per_pair(encoder, pairs)
    workers = {}
    for v in a.variants:  # one at a time: compiles do not compete
        workers[v] = Worker(v, encoder, pairs, a.precision, tmp)
    peers = {}
    if PEER_PY.exists() and not a.no_peer:
        for extra in a.peer_args or [""]:  # each layout the peer is asked to try
            peers[extra] = PeerWorker(encoder, pairs, extra.split(), tmp / f"peer{len(peers)}.log")
    everyone = {**{("ours", v): w for v, w in workers.items()}, **{("peer", e): w for e, w in peers.items()}}
    try:
        aug = statistics.median(workers[a.variants[0]].ask("augment") for _ in range(3))
        times = {k: [] for k in everyone}
        for _ in range(a.steps):
            for k, w in everyone.items():
                times[k].append(w.ask("step"))
    finally:
        for w in everyone.values():
            w.close()
    ours = {v: pairs / statistics.median(times["ours", v]) for v in workers}
    base = a.variants[0]
    ref = np.load(workers[base].update_path)
    for v, w in workers.items():
        upd = np.load(w.update_path)
        emit(what="step", encoder=encoder, pairs=pairs, precision=w.precision, variant=v,
             pairs_s=round(ours[v], 2), gflop_s=round(ours[v] * flop / 1e9, 1),
             of_matmul_peak=round(ours[v] * flop / 1e9 / peak, 3),
             speedup_vs_first=round(ours[v] / ours[base], 3),
             first_loss=w.info["loss"], loss_diff=abs(w.info["loss"] - workers[base].info["loss"]),
             update_max_diff=float(np.abs(upd - ref).max() / np.abs(ref).max()),  # of the largest entry
             update_l2_diff=float(np.linalg.norm(upd - ref) / np.linalg.norm(ref)),
             convs=w.info["convs"], first_step_s=round(w.info["first_s"], 1), augment_s=round(aug, 4),
             step_times=[round(t, 3) for t in times["ours", v]])
    if peers:
        best = max(ours.values())
        theirs = {e: pairs / statistics.median(times["peer", e]) for e in peers}
        for e, w in peers.items():
            emit(what="peer", encoder=encoder, pairs=pairs, args=e, pairs_s=round(theirs[e], 2),
                 gflop_s=round(theirs[e] * flop / 1e9, 1), of_matmul_peak=round(theirs[e] * flop / 1e9 / peak, 3),
                 views=w.info["views"], channels_last=w.info["channels_last"], threads=w.info["threads"],
                autocast_bf16=w.info.get("autocast_bf16", False),
                 first_loss=w.info["loss"], best_ours_over_peer=round(best / theirs[e], 3),
                 **{f"{v}_over_peer": round(ours[v] / theirs[e], 3) for v in workers},
                 step_times=[round(t, 3) for t in times["peer", e]])
        best_v, best_e = max(ours, key=ours.get), max(theirs, key=theirs.get)
        # Each turn's ratio too (the two ran seconds apart): its spread shows the noise left in the medians.
        turns = [p / o for p, o in zip(times["peer", best_e], times["ours", best_v])]
        emit(what="ratio", encoder=encoder, pairs=pairs, best_ours=round(best, 2), best_variant=best_v,
             best_peer=round(theirs[best_e], 2), best_peer_args=best_e,
             best_ours_over_best_peer=round(best / theirs[best_e], 3),
             turn_ratios=[round(r, 3) for r in turns], median_turn_ratio=round(statistics.median(turns), 3))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-worker":
        return peer_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        encoder, pairs, precision, views, update_path = sys.argv[2:7]
        return worker(encoder, int(pairs), precision, views, update_path)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["small:256", "resnet18:64", "resnet18:256"],
                   help="encoder:pairs_per_step")
    p.add_argument("--variants", nargs="+", default=["fast", "native"], help="fast|native[:XLA_FLAGS]")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant, interleaved")
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-args", action="append",
                   help="extra arguments for the peer script, e.g. --channels_last; repeat to time several "
                        "layouts (the ratio line compares with the fastest)")
    a = p.parse_args()
    peak = matmul_peak()
    emit(what="setup", cpus=os.cpu_count(), variants=a.variants, peer=PEER_PY.exists() and not a.no_peer,
         matmul_peak_gflop_s=round(peak, 1))
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.runs:
            encoder, pairs = spec.split(":")
            run(encoder, int(pairs), a, Path(tmp), peak)


if __name__ == "__main__":
    main()
