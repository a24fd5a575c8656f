"""Optimizer, the one jitted train step, and the `pretrain()` loop.

All mutable state (parameters, BatchNorm statistics, optimizer state, step) is one pytree that goes
through one `jax.jit` step donating its input (Flax NNX in the functional style: split once, merge
inside the step). Augmentation runs inside the same step, on the device.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import augment, checkpoint, losses
from .config import TrainConfig
from .cache import load_cached
from .data import ImageSet, batch_indices, load_folder
from .errors import CheckpointError, ConfigError, ContrastiveError
from .mesh import batch_sharding, check_batch, data_mesh, replicated
from .models import SimCLRModel
from .runtime import enable_compilation_cache


class TrainingInterrupted(ContrastiveError):
    """SIGINT/SIGTERM arrived: the step in flight finished and a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class TrainingDiverged(ContrastiveError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
def learning_rate(cfg: TrainConfig) -> float:
    """The peak learning rate: cfg.lr, or the optimizer's usual default scaled with batch size.

    sgd: 0.06 x B/128 (lightly's SimCLR example); lars: 0.3 x B/256 (SimCLR, section B.9);
    adamw: 2e-3 x sqrt(B/256), the square-root rule for adaptive optimizers.
    """
    if cfg.lr:
        return cfg.lr
    b = cfg.batch_size
    return {"sgd": 0.06 * b / 128, "lars": 0.3 * b / 256, "adamw": 2e-3 * math.sqrt(b / 256)}[cfg.optimizer]


def _decay_mask(params):
    # Biases and BatchNorm scales/offsets (all 1-D leaves) get no weight decay (SimCLR, LARS paper).
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lr_at(step, total, *, peak: float, warmup_fraction: float):
    """Linear warm-up over the first `warmup_fraction` of `total` steps, then cosine decay to 0.

    A function of traced (step, total): the total lives in the train state, so a time budget can
    set it after measuring throughput without recompiling, and a resumed run keeps its schedule.
    """
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)
    warmup = jnp.floor(warmup_fraction * total)
    warm = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return jnp.where(step < warmup, warm, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer with its learning rate as an injected hyperparameter (set every step)."""

    def factory(learning_rate):
        if cfg.optimizer == "adamw":
            return optax.adamw(learning_rate, weight_decay=cfg.weight_decay, mask=_decay_mask)
        if cfg.optimizer == "sgd":
            return optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                               optax.sgd(learning_rate, momentum=0.9))
        return optax.lars(learning_rate, weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
                          trust_ratio_mask=_decay_mask, momentum=0.9)

    return optax.inject_hyperparams(factory)(learning_rate=learning_rate(cfg))


# ---------------------------------------------------------------------------------------------
# State and step
# ---------------------------------------------------------------------------------------------
def compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, dict]:
    """Model graph (static) and the state pytree {params, stats, opt, step, total}, seeded by cfg.seed."""
    model = SimCLRModel(cfg.model, dtype=compute_dtype(cfg), rngs=nnx.Rngs(params=jax.random.key(cfg.seed)))
    graphdef, params, stats = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.int32(0),
                      "total": jnp.int32(1)}


def working_size(image_size: int) -> int:
    """Side of the decoded-image cache: 1.5x the crop size, so small crops keep their detail."""
    return int(math.ceil(image_size * 1.5))


def make_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh):
    """The jitted step: (state, uint8 images [B, R, R, 3], base key) -> (state, outputs)."""
    loss_fn = losses.LOSSES[cfg.loss]
    size = cfg.model.image_size
    peak = learning_rate(cfg)

    def step(state, images, base_key):
        key = jax.random.fold_in(base_key, state["step"])  # a resumed run replays the same stream
        v1, v2 = augment.augment_views(images, key=key, cfg=cfg.augment, size=size)
        x = jnp.concatenate([v1, v2])  # [2B, S, S, 3]: one encoder pass, BN statistics over both views

        def objective(params):
            # Fresh Variable objects at this trace level: BatchNorm updates its statistics in place.
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state["stats"]))
            _, z = model(x, train=True)
            z1, z2 = jnp.split(z.astype(jnp.float32), 2)  # [B, D] each
            new_stats = nnx.state(model, nnx.BatchStat)
            return loss_fn(z1, z2, temperature=cfg.temperature), (new_stats, z1, z2)

        (loss, (stats, z1, z2)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        lr = lr_at(state["step"], state["total"], peak=peak, warmup_fraction=cfg.warmup_fraction)
        opt = state["opt"]
        opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lr})
        updates, opt = tx.update(grads, opt, state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "stats": stats, "opt": opt, "step": state["step"] + 1, "total": state["total"]}
        return new, {"loss": loss, "lr": lr, "z1": z1, "z2": z2}

    repl, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, batch, repl), out_shardings=(repl, repl), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class Monitor:
    """What pretrain() reports while it runs; the CLI's Rich display overrides these no-ops."""

    def loading(self, done: int, total: int) -> None: ...
    def start(self, info: dict) -> None: ...
    def step(self, step: int, total: int, record: dict | None) -> None: ...
    def warn(self, message: str) -> None: ...
    def end(self, summary: dict) -> None: ...


@dataclass
class _Prefetcher:
    """Gathers and transfers the next host batches on a thread while the current step runs."""

    images: np.ndarray
    cfg: TrainConfig
    start: int
    sharding: Any
    depth: int = 2
    _q: queue.Queue = field(init=False)

    def __post_init__(self):
        self._q = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for s in itertools.count(self.start):
                idx = batch_indices(len(self.images), self.cfg.batch_size, s, seed=self.cfg.seed)
                item = jax.device_put(self.images[idx], self.sharding)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # surface loader failures in the training thread
            self._q.put(e)

    def get(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()


def default_run_dir(cfg: TrainConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = root / f"{stamp}-{cfg.model.encoder}", 1
    while path.exists():
        i += 1
        path = root / f"{stamp}-{cfg.model.encoder}-{i}"
    return path


def _prepare_run_dir(output: Path, cfg: TrainConfig, *, resume: bool, force: bool) -> TrainConfig:
    """Create or reopen `output`; never overwrite a user's run without --force."""
    if resume:
        saved = checkpoint.read_config(output)
        return saved
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not force:
            raise CheckpointError(f"{output} already exists; pass --resume to continue that run or --force to replace it")
        if output.is_dir() and not checkpoint.is_run_dir(output):
            raise CheckpointError(f"{output} exists and is not a run directory; --force only replaces runs")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.mkdir(parents=True, exist_ok=True)
    cfg.save(output / "config.json")
    return cfg


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def pretrain(
    folder: Path,
    cfg: TrainConfig,
    output: Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    monitor: Monitor | None = None,
    images: ImageSet | None = None,
    cache: bool = True,
) -> dict:
    """Train on the images under `folder`; write checkpoints, metrics and config to `output`.

    Returns the summary written to output/summary.json. Raises ContrastiveError subclasses for
    anything a user can fix; TrainingInterrupted after saving when SIGINT/SIGTERM arrive.
    """
    monitor = monitor or Monitor()
    enable_compilation_cache()
    output = Path(output) if output else default_run_dir(cfg)
    if resume and not checkpoint.is_run_dir(output):
        raise CheckpointError(f"cannot resume: {output} is not a run directory (no config.json)")
    mesh = data_mesh()
    check_batch(cfg.batch_size, mesh)

    t0 = time.perf_counter()
    size = working_size(cfg.model.image_size)
    if images is not None:
        data = images
    elif cache:  # decoded once per folder and resolution, reused by later runs (cache.py)
        data = load_cached(folder, size, on_progress=monitor.loading)[0]
    else:
        data = load_folder(folder, size, on_progress=monitor.loading)
    load_s = time.perf_counter() - t0
    cfg = _prepare_run_dir(output, cfg, resume=resume, force=force)
    check_batch(cfg.batch_size, mesh)
    if data.skipped:
        # surrogateescape: a file name that is not UTF-8 is written back as its original bytes
        (output / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in data.skipped),
                                            encoding="utf-8", errors="surrogateescape")
        monitor.warn(f"skipped {len(data.skipped)} of {len(data) + len(data.skipped)} files "
                     f"(listed in {output / 'skipped.txt'}): " + "; ".join(f"{p}: {r}" for p, r in data.skipped[:3])
                     + (" ..." if len(data.skipped) > 3 else ""))
    if len(data) < 2:
        raise ConfigError(f"{folder} has {len(data)} usable image; contrastive training needs at least 2")
    if cfg.batch_size > len(data):
        # A batch larger than the folder would repeat images, making copies each other's negatives.
        fit = len(data) - len(data) % mesh.devices.size
        if fit < 2:
            raise ConfigError(f"{len(data)} images cannot fill a batch on {mesh.devices.size} devices")
        monitor.warn(f"batch size {cfg.batch_size} is larger than the {len(data)} images; using {fit}")
        cfg = dataclasses.replace(cfg, batch_size=fit)
        if not resume:
            cfg.save(output / "config.json")
    # With a time budget, a placeholder until the compiled step's speed is measured (step 4).
    total = 10**6 if cfg.time_budget else cfg.total_steps(len(data))

    tx = make_optimizer(cfg)
    graphdef, state = init_state(cfg, tx)
    state["total"] = jnp.int32(total)
    state = jax.device_put(state, replicated(mesh))
    mngr = checkpoint.manager(output, cfg.keep_checkpoints)
    start = 0
    if resume:
        if mngr.latest_step() is not None:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            start, state = checkpoint.restore(mngr, abstract)
            total = int(state["total"])  # the schedule the run started with (a time budget set it)
        _truncate_metrics(output / "metrics.jsonl", start)
    if start >= total:
        monitor.warn(f"{output} already finished all {total} steps; nothing to do")
    budget = _Budget(cfg.time_budget * 60.0, t0) if cfg.time_budget and not (resume and start) else None

    step_fn = make_step(cfg, graphdef, tx, mesh)
    metrics_fn = jax.jit(losses.batch_metrics)
    base_key = jax.device_put(jax.random.key(cfg.seed + 1), replicated(mesh))
    monitor.start(dict(output=str(output), images=len(data), skipped=len(data.skipped), steps=total,
                       start=start, batch_size=cfg.batch_size, devices=mesh.devices.size,
                       backend=jax.default_backend(), load_s=load_s))

    log = open(output / "metrics.jsonl", "a")
    loader = _Prefetcher(data.images, cfg, start, sharding=batch_sharding(mesh))
    last_good, window_t, window_wait, window_steps = start, time.perf_counter(), 0.0, 0
    compile_s = None
    loss = float("nan")
    step = start
    try:
        with _SignalFlag() as flag:
            while step < total:
                tw = time.perf_counter()
                batch = loader.get()
                window_wait += time.perf_counter() - tw
                ts = time.perf_counter()
                state, out = step_fn(state, batch, base_key)
                step += 1
                window_steps += 1
                new_total = budget.update(step, start, out) if budget else None
                if new_total is not None and new_total != total:
                    total = max(new_total, step)
                    state["total"] = jax.device_put(jnp.int32(total), replicated(mesh))
                is_log = step % cfg.log_every == 0 or step == total or step == start + 1 or flag.signum
                record = None
                if is_log:
                    loss = float(out["loss"])  # waits for the step
                    now = time.perf_counter()
                    if compile_s is None:
                        compile_s = now - ts
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"loss became {loss} between steps {last_good} and {step}; "
                            f"the last good checkpoint (step {mngr.latest_step()}) is kept in {output}; "
                            f"try a lower --lr (was {learning_rate(cfg):g})")
                    last_good = step
                    elapsed = now - window_t
                    record = {"step": step, "loss": loss, "lr": float(out["lr"]),
                              "pairs_per_s": window_steps * cfg.batch_size / elapsed if step != start + 1 else None,
                              "data_wait": window_wait / elapsed,
                              **{k: float(v) for k, v in metrics_fn(out["z1"], out["z2"]).items()}}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
                monitor.step(step, total, record)
                if flag.signum or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    checkpoint.save(mngr, step, state)
                if flag.signum:
                    mngr.wait_until_finished()
                    name = signal.Signals(flag.signum).name
                    raise TrainingInterrupted(
                        f"stopped by {name} after step {step}; checkpoint saved, continue with: "
                        f"contrastive pretrain {folder} --output {output} --resume", flag.signum)
            if step > start and mngr.latest_step() != step:
                checkpoint.save(mngr, step, state)
            mngr.wait_until_finished()
    finally:
        loader.close()
        log.close()
        mngr.close()

    summary = dict(output=str(output), steps=step, resumed_from=start, images=len(data),
                   skipped=len(data.skipped), final_loss=loss, batch_size=cfg.batch_size,
                   encoder=cfg.model.encoder, loss=cfg.loss, compile_s=compile_s,
                   wall_s=time.perf_counter() - t0, load_s=load_s, devices=mesh.devices.size)
    checkpoint.write_json_atomic(output / "summary.json", summary)
    monitor.end(summary)
    return summary


class _Budget:
    """Turns a wall-clock budget into a step count, from throughput measured after compilation.

    The first estimate comes from steps 2-4 (step 1 includes the compile), a refined one from the
    steps up to a fifth of the budget; the learning-rate schedule follows the total it sets.
    """

    def __init__(self, seconds: float, t0: float):
        self.seconds, self.t0 = seconds, t0
        self.mark = None  # (step, time) after the compiled first step
        self.refined = False

    def update(self, step: int, start: int, out) -> int | None:
        """Called after each step: a new total step count, or None to keep the current one."""
        done, elapsed = step - start, self._elapsed()
        if elapsed > self.seconds:
            return step  # over budget (a slow save, a busy machine): stop here
        first = done == 1
        estimate = done == 4 or (not self.refined and done > 4 and elapsed > self.seconds / 5)
        if not (first or estimate):
            return None
        jax.block_until_ready(out["loss"])
        now = time.perf_counter()
        if first:
            self.mark = (step, now)
            return None
        self.refined = done > 4
        per_step = (now - self.mark[1]) / (step - self.mark[0])
        left = self.seconds - (now - self.t0) - 2 * per_step - 1.0  # keep time for the final save
        return step + max(0, int(left / per_step))

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the restored step, so a resumed run does not log steps twice."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(keep))
