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
import zlib
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
from .mesh import (agree, batch_sharding, check_batch, data_mesh, global_batch, init_distributed, is_primary,
                   local_rows, replicated)
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


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation, sharding=None) -> tuple[nnx.GraphDef, dict]:
    """Model graph (static) and the state pytree {params, stats, opt, step, total}, seeded by cfg.seed.

    With `sharding`, the state is built by one jitted program straight into it: one compile instead
    of an eager op per layer, and no host-to-device copy (checked equal across processes per leaf).
    """
    holder = {}

    def build():
        model = SimCLRModel(cfg.model, dtype=compute_dtype(cfg), rngs=nnx.Rngs(params=jax.random.key(cfg.seed)))
        holder["graphdef"], params, stats = nnx.split(model, nnx.Param, ...)
        return {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.int32(0), "total": jnp.int32(1)}

    state = build() if sharding is None else jax.jit(build, out_shardings=sharding)()
    return holder["graphdef"], state


def working_size(image_size: int) -> int:
    """Side of the decoded-image cache: 1.5x the crop size, so small crops keep their detail."""
    return int(math.ceil(image_size * 1.5))


def make_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh):
    """The jitted step: (state, uint8 images [B, R, R, 3]) -> (state, outputs).

    Outputs: loss and lr of this step, the projections z1, z2 [B, D], and `finite`: the loss and
    the new state are all finite (a state that is not is never saved).
    """
    loss_fn = losses.LOSSES[cfg.loss]
    size = cfg.model.image_size
    peak = learning_rate(cfg)

    def step(state, images):
        base_key = jax.random.key(cfg.seed + 1)
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
        finite = jnp.isfinite(loss)
        for leaf in jax.tree.leaves((params, stats, opt)):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                finite &= jnp.all(jnp.isfinite(leaf))
        return new, {"loss": loss, "lr": lr, "z1": z1, "z2": z2, "finite": finite}

    repl, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, batch), out_shardings=(repl, repl), donate_argnums=0)


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
    """Gathers and transfers the next batches on a thread while the current step runs.

    Each process gathers only the rows of the global batch that its own devices hold.
    """

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
            b = self.cfg.batch_size
            rows = local_rows(self.sharding, b)
            for s in itertools.count(self.start):
                idx = batch_indices(len(self.images), b, s, seed=self.cfg.seed)[rows]
                if not self._put(global_batch(self.images[idx], self.sharding, b)):
                    return
        except BaseException as e:  # surface loader failures in the training thread
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)  # no JAX call left running on a thread at interpreter exit


def default_run_dir(cfg: TrainConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = root / f"{stamp}-{cfg.model.encoder}", 1
    while path.exists():
        i += 1
        path = root / f"{stamp}-{cfg.model.encoder}-{i}"
    return path


def _prepare_run_dir(output: Path, cfg: TrainConfig, *, force: bool) -> None:
    """Create `output` for a new run (process 0 only); never overwrite a user's run without --force.

    A collective: every process calls it, and every process raises when process 0 could not.
    """
    error = None
    if is_primary():
        try:
            _make_run_dir(output, cfg, force=force)
        except ContrastiveError as e:
            error = e
    failed = agree([error is not None])[0, 0]  # also the barrier: the directory is ready after it
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"process 0 could not prepare {output}; see its messages")


def _make_run_dir(output: Path, cfg: TrainConfig, *, force: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not force:
            raise CheckpointError(f"{output} already exists; pass --resume to continue that run or --force to replace it")
        if output.is_dir() and not checkpoint.is_run_dir(output):
            raise CheckpointError(f"{output} exists and is not a run directory; --force only replaces runs")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.mkdir(parents=True, exist_ok=True)
    cfg.save(output / "config.json")


def _check_same_images(data: ImageSet, folder: Path) -> None:
    """Every process must train on the same images: compare counts and a checksum of the paths."""
    digest = zlib.crc32("\n".join(data.paths).encode("utf-8", "surrogateescape")) & 0x7FFFFFFF
    seen = agree([len(data), digest])
    if (seen != seen[0]).any():
        counts = ", ".join(f"process {i}: {n}" for i, n in enumerate(seen[:, 0]))
        raise ConfigError(f"the processes see different images in {folder} ({counts}); "
                          "every process must read the same folder")


class _FiniteCheck:
    """Finds the first step whose loss or new state is not finite.

    Per-step flags stay on the device until a step is logged or saved, then come back in one
    transfer, so the check costs no synchronisation between those steps.
    """

    def __init__(self, start: int):
        self.last_good = start
        self._pending: list[tuple[int, Any, Any]] = []
        self._bad: tuple[int, float] | None = None

    def add(self, step: int, out: dict) -> None:
        self._pending.append((step, out["finite"], out["loss"]))
        if len(self._pending) >= 256:  # bounded, however rarely steps are logged
            self._bad = self._bad or self._first_bad()

    def _first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite step among the pending ones, or None."""
        flags = jax.device_get([(ok, loss) for _, ok, loss in self._pending])
        steps = [s for s, _, _ in self._pending]
        self._pending.clear()
        for step, (ok, loss) in zip(steps, flags):
            if not ok:
                return step, float(loss)
            self.last_good = step
        return None

    def raise_if_diverged(self, *, mngr, output: Path, cfg: TrainConfig) -> None:
        bad = self._bad or self._first_bad()
        if bad is None:
            return
        step, loss = bad
        what = f"loss became {loss}" if not math.isfinite(loss) else f"parameters became non-finite (loss {loss:.4g})"
        since = f"finite up to step {self.last_good}" if self.last_good else "the first step"
        kept = mngr.latest_step()
        where = (f"the last good checkpoint, step {kept}, is kept in {output}" if kept is not None
                 else f"no checkpoint was saved in {output}")
        raise TrainingDiverged(f"training diverged: {what} at step {step} ({since}); {where} (nothing "
                               f"non-finite is saved); try a lower --lr (was {learning_rate(cfg):g})")


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
    devices=None,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict:
    """Train on the images under `folder`; write checkpoints, metrics and config to `output`.

    `devices`: the devices to train on (default: every device of every process). `coordinator`,
    `num_processes`, `process_id`: join a multi-process run (see `mesh.init_distributed`); then
    every process calls this with the same folder and `output` (a directory all of them reach),
    each feeds its own devices' rows of every batch, and only process 0 writes metrics, config,
    summary and progress; checkpoints are written by all together.

    Returns the summary written to output/summary.json. Raises ContrastiveError subclasses for
    anything a user can fix; TrainingInterrupted after saving when SIGINT/SIGTERM arrive;
    TrainingDiverged (nothing non-finite saved) when the loss or the state stops being finite.
    """
    multi = init_distributed(coordinator, num_processes, process_id)
    primary = is_primary()
    monitor = (monitor or Monitor()) if primary else Monitor()
    enable_compilation_cache()
    if output is None and multi:
        raise ConfigError("a multi-process run needs --output: one run directory that every process can reach")
    output = Path(output) if output else default_run_dir(cfg)
    if resume and not checkpoint.is_run_dir(output):
        raise CheckpointError(f"cannot resume: {output} is not a run directory (no config.json)")
    if resume:  # the run's own settings (image size, batch size, ...), not the command line's defaults
        cfg = checkpoint.read_config(output)
    mesh = data_mesh(devices)
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
    if multi:
        _check_same_images(data, folder)
    if not resume:
        _prepare_run_dir(output, cfg, force=force)
    if data.skipped and primary:
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
        if not resume and primary:
            cfg.save(output / "config.json")
    # With a time budget, a placeholder until the compiled step's speed is measured (step 4).
    total = 10**6 if cfg.time_budget else cfg.total_steps(len(data))

    tx = make_optimizer(cfg)
    graphdef, state = init_state(cfg, tx, replicated(mesh))
    state["total"] = jax.device_put(np.int32(total), replicated(mesh))
    mngr = checkpoint.manager(output, cfg.keep_checkpoints)
    start = 0
    if resume:
        if mngr.latest_step() is not None:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            start, state = checkpoint.restore(mngr, abstract)
            total = int(state["total"])  # the schedule the run started with (a time budget set it)
        if primary:
            _truncate_metrics(output / "metrics.jsonl", start)
    if start >= total:
        monitor.warn(f"{output} already finished all {total} steps; nothing to do")
    budget = _Budget(cfg.time_budget * 60.0, t0) if cfg.time_budget and not (resume and start) else None

    step_fn = make_step(cfg, graphdef, tx, mesh)
    metrics_fn = jax.jit(losses.batch_metrics)
    monitor.start(dict(output=str(output), images=len(data), skipped=len(data.skipped), steps=total,
                       start=start, batch_size=cfg.batch_size, devices=mesh.devices.size,
                       backend=jax.default_backend(), load_s=load_s))

    log = open(output / "metrics.jsonl", "a") if primary else None
    loader = _Prefetcher(data.images, cfg, start, sharding=batch_sharding(mesh))
    check = _FiniteCheck(start)
    window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
    compile_s = None
    loss = float("nan")
    step = start
    proposal = None  # a new step total from the time budget, not yet agreed on
    stop = 0  # the signal that stops the run, once agreed on
    try:
        with _SignalFlag() as flag:
            while step < total:
                tw = time.perf_counter()
                batch = loader.get()
                window_wait += time.perf_counter() - tw
                ts = time.perf_counter()
                state, out = step_fn(state, batch)
                step += 1
                window_steps += 1
                check.add(step, out)
                if budget:
                    proposal = budget.update(step, start, out) or proposal
                due = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                # Signals and the time budget are per process; with several processes they are agreed
                # on (one small collective) only at steps every process recognises, so all of them
                # log, save and stop at the same step. Process 0's clock sets the budget.
                if not multi or due or step % cfg.log_every == 0 or step == total or step - start in (1, 4):
                    votes = agree([flag.signum, -1 if proposal is None else proposal])
                    stop, proposal = int(votes[:, 0].max()), None
                    if votes[0, 1] >= 0 and votes[0, 1] != total:
                        total = max(int(votes[0, 1]), step)
                        state["total"] = jax.device_put(jnp.int32(total), replicated(mesh))
                is_log = step % cfg.log_every == 0 or step == total or step == start + 1 or stop
                record = None
                if is_log:
                    check.raise_if_diverged(mngr=mngr, output=output, cfg=cfg)
                    loss = float(out["loss"])  # waits for the step
                    now = time.perf_counter()
                    if compile_s is None:
                        compile_s = now - ts
                    elapsed = now - window_t
                    record = {"step": step, "loss": loss, "lr": float(out["lr"]),
                              "pairs_per_s": window_steps * cfg.batch_size / elapsed if step != start + 1 else None,
                              "data_wait": window_wait / elapsed,
                              **{k: float(v) for k, v in metrics_fn(out["z1"], out["z2"]).items()}}
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
                monitor.step(step, total, record)
                if stop or due:
                    check.raise_if_diverged(mngr=mngr, output=output, cfg=cfg)  # never save a bad state
                    checkpoint.save(mngr, step, state)
                if stop:
                    mngr.wait_until_finished()
                    name = signal.Signals(stop).name
                    raise TrainingInterrupted(
                        f"stopped by {name} after step {step}; checkpoint saved, continue with: "
                        f"contrastive pretrain {folder} --output {output} --resume", stop)
            if step > start and mngr.latest_step() != step:
                check.raise_if_diverged(mngr=mngr, output=output, cfg=cfg)
                checkpoint.save(mngr, step, state)
            mngr.wait_until_finished()
    finally:
        loader.close()
        if log:
            log.close()
        mngr.close()

    summary = dict(output=str(output), steps=step, resumed_from=start, images=len(data),
                   skipped=len(data.skipped), final_loss=loss, batch_size=cfg.batch_size,
                   encoder=cfg.model.encoder, loss=cfg.loss, compile_s=compile_s,
                   wall_s=time.perf_counter() - t0, load_s=load_s, devices=mesh.devices.size,
                   processes=jax.process_count())
    if primary:
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
