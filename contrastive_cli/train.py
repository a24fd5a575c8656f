"""The `pretrain()` loop: folder -> run directory (checkpoints, metrics, config).

All mutable state (parameters, BatchNorm statistics, optimizer state, step) is one pytree that goes
through one `jax.jit` step donating its input (Flax NNX in the functional style: split once, merge
inside the step). Augmentation runs inside the same step, on the device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, health
from .cache import load_cached
from .config import TrainConfig
from .data import ImageSet, load_folder
from .errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted
from .guards import Budget, FiniteCheck, SignalFlag
from .mesh import agree, batch_sharding, check_batch, data_mesh, init_distributed, is_primary, replicated
from .optim import learning_rate, lr_at, make_optimizer
from .plot import plot_metrics
from .prefetch import Prefetcher
from .probe import KnnProbe
from .rundir import default_run_dir, prepare_run_dir, truncate_metrics
from .runtime import enable_compilation_cache
from .step import compute_dtype, init_state, make_step, working_size
from .stepcache import make_cached_step

# Re-exported: the train module is where callers look for the step's pieces.
__all__ = ["pretrain", "Monitor", "TrainingDiverged", "TrainingInterrupted", "learning_rate", "lr_at",
           "make_optimizer", "compute_dtype", "init_state", "make_step", "working_size"]


COLLAPSE_PATIENCE = 3  # log records in a row that must signal collapse before the warning


class Monitor:
    """What pretrain() reports while it runs; the CLI's Rich display overrides these no-ops."""

    def loading(self, done: int, total: int) -> None: ...
    def start(self, info: dict) -> None: ...
    def step(self, step: int, total: int, record: dict | None) -> None: ...
    def warn(self, message: str) -> None: ...
    def end(self, summary: dict) -> None: ...


def _check_same_images(data: ImageSet, folder: Path) -> None:
    """Every process must train on the same images: compare counts and a checksum of the paths."""
    digest = zlib.crc32("\n".join(data.paths).encode("utf-8", "surrogateescape")) & 0x7FFFFFFF
    seen = agree([len(data), digest])
    if (seen != seen[0]).any():
        counts = ", ".join(f"process {i}: {n}" for i, n in enumerate(seen[:, 0]))
        raise ConfigError(f"the processes see different images in {folder} ({counts}); "
                          "every process must read the same folder")


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

    Every log step appends the loss and the batch's health metrics (health.batch_metrics) to
    output/metrics.jsonl; when they signal collapse for COLLAPSE_PATIENCE log steps in a row the
    monitor gets one warning. With cfg.eval_folder, a kNN probe (probe.KnnProbe) on that labeled
    folder adds `knn` to the records of every cfg.eval_every-th and of the last step. At the end,
    the metrics are drawn to output/metrics.png (a failure to draw is only a warning).

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
    # Decoded before the run directory is made, so a bad labeled folder fails before anything is written.
    probe = KnnProbe(cfg.eval_folder, cfg, cache=cache, on_progress=monitor.loading) if cfg.eval_folder else None
    if not resume:
        prepare_run_dir(output, cfg, force=force)
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
            truncate_metrics(output / "metrics.jsonl", start)
    if start >= total:
        monitor.warn(f"{output} already finished all {total} steps; nothing to do")
    budget = Budget(cfg.time_budget * 60.0, t0) if cfg.time_budget and not (resume and start) else None

    # Traced once per config and code version, then loaded from disk (stepcache.py).
    batch = jax.ShapeDtypeStruct((cfg.batch_size, *data.images.shape[1:]), data.images.dtype)
    step_fn = make_cached_step(cfg, graphdef, tx, mesh, state, batch)
    metrics_fn = jax.jit(health.batch_metrics)
    monitor.start(dict(output=str(output), images=len(data), skipped=len(data.skipped), steps=total,
                       start=start, batch_size=cfg.batch_size, devices=mesh.devices.size,
                       backend=jax.default_backend(), load_s=load_s))

    log = open(output / "metrics.jsonl", "a") if primary else None
    loader = Prefetcher(data.images, cfg, start, sharding=batch_sharding(mesh))
    check = FiniteCheck(start)
    dim = cfg.model.proj_dim
    collapsed, collapse_warned = 0, False  # log records in a row that signal collapse; one warning per run
    temperature_hint = ", a larger --temperature" if cfg.loss in ("ntxent", "dcl") else ""
    window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
    compile_s = None
    loss = float("nan")
    step = start
    proposal = None  # a new step total from the time budget, not yet agreed on
    stop = 0  # the signal that stops the run, once agreed on
    try:
        loop_t0 = time.perf_counter()
        with SignalFlag() as flag:
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
                is_eval = probe is not None and not stop and (
                    step == total or bool(cfg.eval_every and step % cfg.eval_every == 0))
                is_log = step % cfg.log_every == 0 or step == total or step == start + 1 or stop or is_eval
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
                    if step == start + 1:  # compiling (or loading from the persistent cache) + one step
                        record["first_step_s"] = compile_s
                    if "logit_scale" in out:  # the sigmoid loss's learned t = exp(t') and b
                        record["sigmoid_t"] = math.exp(float(out["logit_scale"]))
                        record["sigmoid_b"] = float(out["logit_bias"])
                    if is_eval:  # before the next step: it donates (invalidates) this state
                        record["knn"] = probe(graphdef, mesh, state["params"], state["stats"])
                    signal_text = health.collapse_signal(record, dim)
                    collapsed = collapsed + 1 if signal_text else 0
                    if collapsed >= COLLAPSE_PATIENCE and not collapse_warned:
                        collapse_warned = True
                        monitor.warn(f"the embeddings look collapsed (all images alike) for {COLLAPSE_PATIENCE} log "
                                     f"steps up to step {step}: {signal_text}; try a lower --lr{temperature_hint}, "
                                     "or check that the augmentations leave the images recognisable")
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
            loop_s = time.perf_counter() - loop_t0  # the steps alone: no set-up, final save or plot
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
                   wall_s=time.perf_counter() - t0, load_s=load_s, loop_s=loop_s, devices=mesh.devices.size,
                   processes=jax.process_count())
    if primary:
        checkpoint.write_json_atomic(output / "summary.json", summary)
        try:
            plot_metrics(output)
        except Exception as e:  # a picture is never worth a failed run
            monitor.warn(f"could not plot {output / 'metrics.jsonl'}: {type(e).__name__}: {e}")
    monitor.end(summary)
    return summary
