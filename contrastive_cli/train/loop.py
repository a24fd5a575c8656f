"""`pretrain()`: folder -> run directory (checkpoints, metrics, config), as a short list of steps.

All mutable state (parameters, BatchNorm statistics, optimizer state, step) is one pytree that goes
through one `jax.jit` step donating its input (step.py); augmentation runs inside it, on the device.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint, processor
from ..config import TrainConfig
from ..data.cache import load_cached
from ..data.decode import ImageSet, load_folder
from ..data.prefetch import Prefetcher
from ..data.scan import LOCK_NAME
from ..errors import CheckpointError, ConfigError, TrainingInterrupted
from ..infer.encoder import readout_stats
from ..mesh import (
    JOIN_TIMEOUT,
    agree,
    batch_sharding,
    check_batch,
    data_mesh,
    disagreements,
    init_distributed,
    is_primary,
    replicated,
)
from ..nn.conv import resolve
from ..nn.models import resolve_precision
from ..plot import plot_metrics
from .guards import Budget, FiniteCheck, SignalFlag
from .logbook import Logbook
from .optim import make_optimizer
from .probe import KnnProbe
from .rundir import RunDir
from .state import init_state
from .step import make_step, working_size


class Monitor:
    """What pretrain() reports while it runs; the CLI's Rich display overrides these no-ops."""

    def loading(self, done: int, total: int) -> None: ...
    def start(self, info: dict) -> None: ...
    def step(self, step: int, total: int, record: dict | None) -> None: ...
    def warn(self, message: str) -> None: ...
    def end(self, summary: dict) -> None: ...


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
    join_timeout: float = JOIN_TIMEOUT,
    step_cache: Path | None = None,
) -> dict:
    """Train on the images under `folder`; write checkpoints, metrics and config to `output`.

    `devices`: the devices to train on (default: every device of every process). `coordinator`,
    `num_processes`, `process_id`: join a multi-process run (see `mesh.init_distributed`); then
    every process calls this with the same folder and `output` (a directory all of them reach),
    each feeds its own devices' rows of every batch, and only process 0 writes metrics, config,
    summary and progress; checkpoints are written by all together. `step_cache`: a folder where
    the traced train step is kept between runs (perf/stepcache.py; None: traced every run).
    A config whose convolution is "auto" runs the fastest for the backend (nn.conv.resolve), and
    its config.json records which.

    Every log step appends the loss and the batch's health metrics to RUN/metrics.jsonl
    (logbook.py). With cfg.eval_folder, a kNN probe (probe.KnnProbe) on that labeled folder adds
    `knn` to the records of every cfg.eval_every-th and of the last step. At the end the metrics
    are drawn to RUN/metrics.png (a failure to draw is only a warning).

    Returns the summary written to RUN/summary.json. Raises ContrastiveError subclasses for
    anything a user can fix; TrainingInterrupted after saving when SIGINT/SIGTERM arrive;
    TrainingDiverged (nothing non-finite saved) when the loss or the state stops being finite.
    """
    t0 = time.perf_counter()
    multi = init_distributed(coordinator, num_processes, process_id, join_timeout=join_timeout)
    monitor = (monitor or Monitor()) if is_primary() else Monitor()
    if multi:
        _same_settings(folder, cfg, output, resume=resume, force=force, cache=cache)
    run, cfg, steps = _open_run(output, cfg, resume=resume, multi=multi)
    # Held from before the folder is made (or an old run replaced) to the end, errors included:
    # a second pretrain on the same folder stops with the holder's pid.
    with run.lock(fresh=not resume, force=force, images=folder):
        if multi:
            _same_run_dir(run)
        mesh = data_mesh(devices)
        check_batch(cfg.batch_size, mesh)
        data = _load_images(folder, cfg, images=images, cache=cache, monitor=monitor, multi=multi)
        load_s = time.perf_counter() - t0
        # Decoded before the run directory is made, so a bad labeled folder fails before anything is written.
        probe = (KnnProbe(cfg.eval_folder, cfg, cache=cache, on_progress=monitor.loading, on_warning=monitor.warn)
                 if cfg.eval_folder else None)
        if not resume:
            run.create(cfg, force=force, images=folder)
        _report_skipped(run, data, monitor)
        cfg = _fit_batch(cfg, len(data), mesh, run, resume=resume, monitor=monitor)
        state = _build_state(cfg, run, mesh, resume=resume, n_images=len(data), steps=steps, monitor=monitor)
        batch = jax.ShapeDtypeStruct((cfg.batch_size, *data.images.shape[1:]), data.images.dtype)
        step_fn = _step_function(cfg, state, mesh, batch, step_cache)
        budget = Budget(cfg.time_budget * 60.0, t0) if cfg.time_budget and not state.start else None
        monitor.start(dict(output=str(run), images=len(data), skipped=len(data.skipped),
                           steps=None if budget else state.total, time_budget=cfg.time_budget if budget else None,
                           start=state.start, batch_size=cfg.batch_size, devices=mesh.devices.size,
                           backend=jax.default_backend(), load_s=load_s))
        result = _train(folder, cfg, run, mesh, data, state, step_fn, probe=probe, budget=budget,
                        monitor=monitor, multi=multi)
        summary = dict(output=str(run), steps=result.step, resumed_from=state.start, images=len(data),
                       skipped=len(data.skipped), final_loss=result.loss if math.isfinite(result.loss) else None,
                       batch_size=cfg.batch_size, encoder=cfg.model.encoder, conv=cfg.model.conv, loss=cfg.loss,
                       compile_s=result.first_step_s, wall_s=time.perf_counter() - t0, load_s=load_s,
                       loop_s=result.loop_s, devices=mesh.devices.size, processes=jax.process_count(),
                       **_machine(cfg))
        _finish(run, summary, monitor)
    return summary


def _machine(cfg: TrainConfig) -> dict:
    """What the speed of this run depends on, for summary.json: the backend and its devices, the
    precision, the XLA flags in force, and on CPU the processor and its SIMD instruction sets
    (speed figures from different instruction sets do not compare)."""
    backend = jax.default_backend()
    out = dict(backend=backend, device_kind=jax.devices()[0].device_kind, precision=cfg.precision,
               xla_flags=os.environ.get("XLA_FLAGS", ""))
    if backend == "cpu":
        info = processor.processor()
        out.update(processor=info["model"], isa=processor.isa(info), simd=info["simd"])
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_settings(folder: Path, cfg: TrainConfig, output: Path | None, *, resume: bool, force: bool,
                   cache: bool) -> None:
    """Every process of a multi-process run was started with the same settings, else a ConfigError
    (on every process) naming the fields that differ and the processes that differ from process 0:
    a mixed run would train one program on some processes and another on the rest, or hang in a
    collective that only some of them reach."""
    values = {**{f"config.{k}": v for k, v in _flat(cfg.to_json()).items()},
              "FOLDER": str(Path(folder).absolute()), "--output": str(Path(output).absolute()) if output else None,
              "--resume": resume, "--force": force, "--cache": cache}
    differ = disagreements(values)
    if differ:
        names = ", ".join(f"{k.removeprefix('config.')} (process{'es' if len(p) > 1 else ''} "
                          f"{', '.join(map(str, p))})" for k, p in list(differ.items())[:6])
        raise ConfigError(f"the processes were started with different settings: {names} differ from process 0's; "
                          "start every process with the same command, but for --process-id")


def _same_run_dir(run: RunDir) -> None:
    """Every process sees the run directory process 0 locked (the lock file it wrote), else a
    ConfigError on every process: processes writing to different folders finish training and then
    wait for each other forever inside the checkpoint save."""
    token = (run.path / LOCK_NAME).read_bytes() if is_primary() else b""
    want = agree([zlib.crc32(token) & 0x7FFFFFFF])[0, 0]
    try:
        seen = zlib.crc32((run.path / LOCK_NAME).read_bytes()) & 0x7FFFFFFF
    except OSError:
        seen = -1
    lost = np.flatnonzero(agree([int(seen == want)])[:, 0] == 0)
    if len(lost):
        raise ConfigError(f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} cannot see the run "
                          f"directory {run.path} that process 0 writes: every process needs the same --output, "
                          "on storage all of them reach")


def _open_run(output: Path | None, cfg: TrainConfig, *, resume: bool, multi: bool) -> tuple[RunDir, TrainConfig, int]:
    """The run directory; the config to train with: on --resume, the run's own (image size,
    batch size, ...), not the command line's defaults; an "auto" convolution, precision and stem resolved; and the
    steps the caller asked for (cfg.steps; on --resume 0 unless --steps was given)."""
    steps = cfg.steps
    if output is None and multi:
        raise ConfigError("a multi-process run needs --output: one run directory that every process can reach")
    run = RunDir(output) if output else RunDir.new(cfg)
    if resume:
        if not run.exists():
            raise CheckpointError(f"cannot resume: {run} is not a run directory (no config.json)")
        cfg = run.read_config()
    if cfg.model.conv == "auto":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conv=resolve("auto")))
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision=resolve_precision("auto"))
    cfg = dataclasses.replace(cfg, model=cfg.model.resolved())  # an "auto" stem recorded as the one built
    return run, cfg, steps


def _load_images(folder: Path, cfg: TrainConfig, *, images: ImageSet | None, cache: bool, monitor: Monitor,
                 multi: bool) -> ImageSet:
    """The folder decoded at the training resolution: through the decoded-image cache (cache.py),
    in memory, or as given; with several processes, checked to be the same images everywhere."""
    size = working_size(cfg.model.image_size)
    if images is not None:
        data = images
    elif cache:
        data = load_cached(folder, size, on_progress=monitor.loading, on_warning=monitor.warn)[0]
    else:
        data = load_folder(folder, size, on_progress=monitor.loading)
    if multi:
        digest = zlib.crc32("\n".join(data.paths).encode("utf-8", "surrogateescape")) & 0x7FFFFFFF
        seen = agree([len(data), digest])
        if (seen != seen[0]).any():
            counts = ", ".join(f"process {i}: {n}" for i, n in enumerate(seen[:, 0]))
            raise ConfigError(f"the processes see different images in {folder} ({counts}); "
                              "every process must read the same folder")
    if len(data) < 2:
        raise ConfigError(f"{folder} has {len(data)} usable image; contrastive training needs at least 2")
    return data


def _report_skipped(run: RunDir, data: ImageSet, monitor: Monitor) -> None:
    if not data.skipped:
        return
    listed = run.write_skipped(data.skipped)
    monitor.warn(f"skipped {len(data.skipped)} of {len(data) + len(data.skipped)} files (listed in {listed}): "
                 + "; ".join(f"{p}: {r}" for p, r in data.skipped[:3]) + (" ..." if len(data.skipped) > 3 else ""))


def _fit_batch(cfg: TrainConfig, n_images: int, mesh, run: RunDir, *, resume: bool, monitor: Monitor) -> TrainConfig:
    """A batch larger than the folder would repeat images, making copies each other's negatives:
    shrink it to the largest that fits the folder and the devices (and say so)."""
    if cfg.batch_size <= n_images:
        return cfg
    fit = n_images - n_images % mesh.devices.size
    if fit < 2:
        raise ConfigError(f"{n_images} images cannot fill a batch on {mesh.devices.size} devices")
    monitor.warn(f"batch size {cfg.batch_size} is larger than the {n_images} images; using {fit}")
    cfg = dataclasses.replace(cfg, batch_size=fit)
    if not resume:
        run.save_config(cfg)
    return cfg


@dataclass
class _State:
    """The train state with what the loop needs besides: its graph, optimizer and step range."""

    graphdef: object
    tx: object
    tree: dict
    start: int
    total: int


def _build_state(cfg: TrainConfig, run: RunDir, mesh, *, resume: bool, n_images: int, steps: int,
                 monitor: Monitor) -> _State:
    """The first state on the devices, or on --resume the newest checkpoint that restores (a newer
    one that cannot be read is passed over, with a warning).

    Resuming with `steps` beyond the run's total extends it to `steps`: the learning rate from the
    restored step on is what a `steps`-step schedule gives there (warm-up and cosine re-laid over
    the new total; after a finished run it rises again from zero), and config.json says `steps`.
    """
    # With a time budget the total is a first guess until the compiled step's speed is measured.
    total = cfg.total_steps(n_images)
    tx = make_optimizer(cfg)
    graphdef, tree = init_state(cfg, tx, replicated(mesh))
    tree["total"] = jax.device_put(np.int32(total), replicated(mesh))
    start = 0
    if resume:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
        restored = run.restore_state(abstract, warn=monitor.warn)
        if restored is not None:
            start, tree = restored
            total = int(tree["total"])  # the schedule the run started with (a time budget set it)
            moved = run.set_aside_after(start)
            if moved:
                monitor.warn(f"moved the unreadable checkpoint(s) aside: {', '.join(map(str, moved))}")
        run.truncate_metrics(start)
        if steps > total:
            done = "finished all" if start >= total else "was to run"
            monitor.warn(f"{run} {done} {total} steps; extending it to {steps} (the learning rate follows "
                         f"a {steps}-step schedule from step {start})")
            total = steps
            tree["total"] = jax.device_put(np.int32(total), replicated(mesh))
            run.save_config(dataclasses.replace(cfg, steps=steps, epochs=0, time_budget=0.0))
        elif steps and steps < total:
            monitor.warn(f"--steps {steps} is less than the {total} steps of {run}; resuming to {total}")
    if start >= total:
        monitor.warn(f"{run} already finished all {total} steps; nothing to do (pass a larger --steps to extend it)")
    return _State(graphdef, tx, tree, start, total)


def _step_function(cfg: TrainConfig, state: _State, mesh, batch: jax.ShapeDtypeStruct, step_cache: Path | None):
    """The jitted train step: traced here, or loaded from `step_cache` when a run with the same
    code, config, shapes and devices traced it before (perf/stepcache.py)."""
    if step_cache is not None:
        try:
            from ..perf.stepcache import make_cached_step
        except ImportError:  # the speed wing is not installed
            pass
        else:
            return make_cached_step(cfg, state.graphdef, state.tx, mesh, state.tree, batch, step_cache)
    return make_step(cfg, state.graphdef, state.tx, mesh)


@dataclass
class _Result:
    step: int
    loss: float
    first_step_s: float | None
    loop_s: float


def _train(folder: Path, cfg: TrainConfig, run: RunDir, mesh, data: ImageSet, state: _State, step_fn, *,
           probe: KnnProbe | None, budget: Budget | None, monitor: Monitor, multi: bool) -> _Result:
    """The steps from state.start to the total: log, probe, checkpoint, stop on a signal."""
    tree, start, total = state.tree, state.start, state.total
    mngr = run.checkpoints(cfg.keep_checkpoints)
    loader = Prefetcher(data.images, cfg, start, sharding=batch_sharding(mesh))
    book = Logbook(run.metrics if is_primary() else None, cfg, start, monitor.warn)
    check = FiniteCheck(start)
    step = start
    proposal = None  # a new step total from the time budget, not yet agreed on
    readout = None  # (centre, whitening) of this step's state, once computed (probe, save)
    ended = False
    try:
        loop_t0 = time.perf_counter()
        with SignalFlag() as flag, checkpoint.quiet_orbax():
            while step < total:
                tw = time.perf_counter()
                batch = loader.get()
                book.count(time.perf_counter() - tw)
                ts = time.perf_counter()
                tree, out = step_fn(tree, batch)
                step += 1
                check.add(step, out)
                if budget:
                    proposal = budget.update(step, start, out) or proposal
                due = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                # Signals and the time budget are per process; with several processes they are agreed
                # on (one small collective) only at steps every process recognises, so all of them
                # log, save and stop at the same step. Process 0's clock sets the budget.
                stop = 0
                if not multi or due or step % cfg.log_every == 0 or step == total or step - start in (1, 4):
                    votes = agree([flag.signum, -1 if proposal is None else proposal])
                    stop, proposal = int(votes[:, 0].max()), None
                    if votes[0, 1] >= 0 and votes[0, 1] != total:
                        total = max(int(votes[0, 1]), step)
                        tree["total"] = jax.device_put(jnp.int32(total), replicated(mesh))
                is_eval = probe is not None and not stop and (
                    step == total or bool(cfg.eval_every and step % cfg.eval_every == 0))
                record = readout = None
                if step % cfg.log_every == 0 or step in (total, start + 1) or stop or is_eval:
                    check.raise_if_diverged(mngr=mngr, output=run.path, cfg=cfg)
                    # The probe runs before the next step: that step donates (invalidates) this state.
                    knn = None
                    if is_eval:
                        readout = readout_stats(state.graphdef, cfg, mesh, tree["params"], tree["stats"], data.images)
                        knn = probe(state.graphdef, mesh, tree["params"], tree["stats"], *readout)
                    record = book.record(step, out, ts, knn=knn)
                monitor.step(step, total, record)
                if stop or due:
                    check.raise_if_diverged(mngr=mngr, output=run.path, cfg=cfg)  # never save a bad state
                    if readout is None:
                        readout = readout_stats(state.graphdef, cfg, mesh, tree["params"], tree["stats"], data.images)
                    checkpoint.save(mngr, step, tree, *readout)
                if stop:
                    checkpoint.finish(mngr)
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(stop).name} after step {step}; checkpoint saved, continue "
                        f"with: contrastive pretrain {folder} --output {run} --resume", stop)
            loop_s = time.perf_counter() - loop_t0  # the steps alone: no set-up, final save or plot
            if step > start and mngr.latest_step() != step:
                check.raise_if_diverged(mngr=mngr, output=run.path, cfg=cfg)
                if readout is None:
                    readout = readout_stats(state.graphdef, cfg, mesh, tree["params"], tree["stats"], data.images)
                checkpoint.save(mngr, step, tree, *readout)
            checkpoint.finish(mngr)
        ended = True
    finally:
        loader.close()
        book.close()
        with checkpoint.quiet_orbax():
            try:
                mngr.close()
            except Exception:
                if ended:
                    raise
                # else the error in flight (a failed save, a signal) is the one to report
            finally:
                if not ended and is_primary():
                    checkpoint.discard_partial_saves(run.path)  # a failed save's half-written step
    return _Result(step, book.loss, book.first_step_s, loop_s)


def _finish(run: RunDir, summary: dict, monitor: Monitor) -> None:
    run.write_summary(summary)
    if is_primary():
        try:
            plot_metrics(run.path)
        except Exception as e:  # a picture is never worth a failed run
            monitor.warn(f"could not plot {run.metrics}: {type(e).__name__}: {e}")
    monitor.end(summary)
