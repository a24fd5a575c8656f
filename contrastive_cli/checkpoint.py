"""A run directory's checkpoints and config: the layout, saving, restoring (Orbax).

    RUN/config.json                  TrainConfig: everything needed to rebuild the model
    RUN/checkpoints/<step>/model/    {"params", "stats"}: all an encoder needs
    RUN/checkpoints/<step>/train/    {"opt", "step", "total"}: what resuming needs besides
    RUN/checkpoints/<step>/centre/   {"mean"}: the mean feature over training images, which embed
                                     subtracts (infer/encoder.py); runs before 0.2.1 have none;
                                     since 0.4.0 also {"white_mean", "white_matrix"}: the
                                     whitening embed applies next (infer/whiten.py)

Loading an encoder reads `model` alone, so inference never builds an optimizer. Runs written
before this layout hold one item, `default`, with both; they still load (`model` is read from it
with a partial restore). Orbax writes each step to a temporary folder and renames it when whole.

Each finished step gets RUN/checkpoints/<step>/digest.json, the sha256 of every file Orbax wrote
(written once the step is on disk), and a restore checks the files of the items it reads against it
first: Orbax stores arrays uncompressed with no checksum, so bytes changed on disk (a bad copy, bit
rot, a stray write) would otherwise load as silently wrong weights. Steps without one (saved before
0.2.1, or cut off between Orbax's rename and the digest) are read unchecked.

A step that cannot be read (a file truncated, deleted or corrupted after it was saved) is passed
over for the next older one that restores, and the caller is told through `warn`. Orbax's and
TensorStore's failures, while restoring or saving (disk full), come back as one-line
CheckpointErrors; the tracebacks Orbax's threads log meanwhile are held back (`quiet_orbax`).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import TrainConfig
from .errors import CheckpointError

MODEL_ITEM, TRAIN_ITEM, CENTRE_ITEM = "model", "train", "centre"
LEGACY_ITEM = "default"  # one item holding model and training state (runs before 0.2)
DIGEST = "digest.json"  # {"sha256": {relative path: hex}} of a finished step's files
MODEL_KEYS = ("params", "stats")
TRAIN_KEYS = ("opt", "step", "total")


def _ocp():
    import orbax.checkpoint as ocp  # a slow import: only when a checkpoint is touched

    return ocp


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_config(run_dir: Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json); pass the --output of a pretrain run")
    return TrainConfig.load(run_dir / "config.json")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def saved_steps(run_dir: Path) -> list[int]:
    """Steps with a finished checkpoint, ascending (Orbax's temporary folders are not numbers)."""
    try:
        return sorted(int(p.name) for p in checkpoint_dir(run_dir).iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def manager(run_dir: Path, keep: int = 2):
    """The CheckpointManager that saves a run's steps (two items each) and keeps the last `keep`."""
    ocp = _ocp()
    return ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=(MODEL_ITEM, TRAIN_ITEM, CENTRE_ITEM),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr, step: int, state: dict, centre=None, whitening=None) -> None:
    """Start saving `state` at `step` (asynchronous; `finish(mngr)` to block), with the feature
    `centre` ([G*G*F] array) and `whitening` ((mean, matrix) arrays) when given. A failure of this
    or of the previous save (they surface here) is a CheckpointError."""
    ocp = _ocp()
    model = {k: state[k] for k in MODEL_KEYS}
    train = {k: state[k] for k in TRAIN_KEYS}
    items = {MODEL_ITEM: ocp.args.StandardSave(model), TRAIN_ITEM: ocp.args.StandardSave(train)}
    if centre is not None:
        import numpy as np

        readout = {"mean": np.asarray(centre, np.float32)}
        if whitening is not None:
            readout["white_mean"], readout["white_matrix"] = (np.asarray(w, np.float32) for w in whitening)
        items[CENTRE_ITEM] = ocp.args.StandardSave(readout)
    try:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
        raise _save_error(mngr, e) from None
    _write_digests(Path(mngr.directory), but=step)  # Orbax finished the previous saves before this one


def finish(mngr) -> None:
    """Block until the saves in flight are on disk; a failed one is a CheckpointError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_error(mngr, e) from None
    _write_digests(Path(mngr.directory))


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_digests(directory: Path, but: int | None = None) -> None:
    """digest.json in every finished step folder that lacks one (process 0 only: one writer)."""
    from .files import sha256_file, write_json_atomic
    from .mesh import is_primary

    if not is_primary():
        return
    try:
        steps = [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir() and int(p.name) != but]
    except OSError:
        return
    for where in steps:
        if (where / DIGEST).exists():
            continue
        try:
            digest = {rel: sha256_file(p) for rel, p in _files(where).items()}
            write_json_atomic(where / DIGEST, {"sha256": digest})
        except OSError as e:
            if not where.is_dir():
                continue  # deleted meanwhile (Orbax keeps the last `keep`)
            # disk full now: the step stays readable, unchecked, and the run stops here as for any save
            raise CheckpointError(f"could not save a checkpoint in {directory}: {e.strerror or e}") from None


def _check_digest(where: Path, item: str) -> None:
    """The files of `item` in the step folder `where` are those its digest.json lists, byte for
    byte; no digest.json: nothing to check."""
    from .files import sha256_file

    try:
        digest = json.loads((where / DIGEST).read_text())["sha256"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {where} cannot be read: its {DIGEST} is damaged ({e})") from None
    listed = {rel for rel in digest if rel.split("/", 1)[0] == item}
    present = _files(where / item)
    for rel in sorted(listed):
        sub = rel.split("/", 1)[1]
        if sub not in present:
            raise CheckpointError(f"checkpoint {where} cannot be read: {item}/{sub} is missing")
        if sha256_file(present[sub]) != digest[rel]:
            raise CheckpointError(f"checkpoint {where} cannot be read: {item}/{sub} changed since it was "
                                  "saved (its sha256 differs from digest.json)")


def _save_error(mngr, e: Exception) -> Exception:
    if isinstance(e, (MemoryError, CheckpointError)):
        return e
    return CheckpointError(f"could not save a checkpoint in {mngr.directory}: {reason(e)}")


_PARTIAL = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # Orbax's folder for a step being written


def discard_partial_saves(run_dir: Path) -> None:
    """Remove the temporary folders of saves that failed (a full disk leaves one per step): only
    Orbax's own `<step>.orbax-checkpoint-tmp*` folders under RUN/checkpoints, never a finished step.
    Call it once no save is in flight (after the manager is closed)."""
    import shutil

    try:
        partial = [p for p in checkpoint_dir(run_dir).iterdir() if _PARTIAL.match(p.name) and p.is_dir()]
    except OSError:
        return
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def quiet_orbax() -> Iterator[None]:
    """Hold back the log records (each with a traceback, one per thread) that Orbax's background
    threads emit through the `absl` logger when a save fails, and asyncio's "Task exception was
    never retrieved" for its abandoned tasks: the failure reaches the caller as one CheckpointError
    instead. Every `absl` record is held back meanwhile: absl's findCaller names its own module, not
    Orbax's, so Orbax's records cannot be told apart by their path (and nothing else here logs
    through absl). The loggers are as they were after the block; threads of a failed save that log
    after it are the CLI's to silence (cli._heavy_command)."""
    loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addFilter(_drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_drop)


_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")  # how TensorStore appends errno to its status
_STATUS = re.compile(r"^[A-Z_]{4,}: ")  # TensorStore's status codes: DATA_LOSS, OUT_OF_RANGE, ...


def reason(e: BaseException) -> str:
    """One line for an Orbax/TensorStore failure: the innermost TensorStore status in the chain
    of causes when there is one (the outer messages dump whole specs), else the outermost."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:  # a file-system error deep inside TensorStore: the OS's words say it all
        code = _OS_ERROR.search(str(x))
        if code:
            return f"{os.strerror(int(code.group(1)))} [errno {code.group(1)}]"
    status = [x for x in chain if _STATUS.match(str(x))]
    pick = status[-1] if status else chain[0]
    text = " ".join(str(pick).split()) or type(pick).__name__
    text = text.split(" [tensorstore_spec", 1)[0]
    if not status:
        text = f"{type(pick).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def _steps_to_try(run_dir: Path, step: int | None) -> list[int]:
    """The given step, or every saved step, newest first."""
    steps = saved_steps(run_dir)
    if step is None:
        if not steps:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (was its pretrain interrupted before the first save?)")
        return steps[::-1]
    if step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (saved: {', '.join(map(str, steps)) or 'none'})")
    return [step]


def _newest_that_restores(run_dir: Path, step: int | None, restore: Callable[[Path], dict],
                          warn: Callable[[str], None] | None) -> tuple[int, dict]:
    """restore(step folder) of the given step, or of the newest step that restores; when newer
    steps were passed over, `warn` says which and why. None restores: a CheckpointError with the
    newest step's reason."""
    failed = []
    for s in _steps_to_try(run_dir, step):
        where = checkpoint_dir(run_dir) / str(s)
        try:
            restored = restore(where)
        except MemoryError:
            raise
        except Exception as e:  # Orbax and TensorStore raise Exception, ValueError, OSError, ...
            failed.append((s, str(e) if isinstance(e, CheckpointError) else f"checkpoint {where} cannot be read: {reason(e)}"))
            continue
        if failed and warn is not None:
            warn(f"{failed[0][1]}; using step {s} instead"
                 + (f" (steps {', '.join(str(f) for f, _ in failed)} unreadable)" if len(failed) > 1 else ""))
        return s, restored
    older = f" (older steps {', '.join(str(f) for f, _ in failed[1:])} cannot be read either)" if len(failed) > 1 else ""
    raise CheckpointError(failed[0][1] + older)


def _restore_model_at(where: Path, abstract_model: dict) -> dict:
    ocp = _ocp()
    if (where / MODEL_ITEM).is_dir():
        _check_digest(where, MODEL_ITEM)
        return ocp.StandardCheckpointer().restore(where / MODEL_ITEM, abstract_model)
    if (where / LEGACY_ITEM).is_dir():
        args = ocp.args.PyTreeRestore(item=abstract_model, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_model))
        return ocp.PyTreeCheckpointer().restore(where / LEGACY_ITEM, args=args)
    raise CheckpointError(f"checkpoint {where} holds no model (no {MODEL_ITEM}/ folder)")


def _restore_state_at(where: Path, abstract_state: dict) -> dict:
    ocp = _ocp()
    if (where / LEGACY_ITEM).is_dir():
        return ocp.StandardCheckpointer().restore(where / LEGACY_ITEM, abstract_state)
    if not (where / TRAIN_ITEM).is_dir():
        raise CheckpointError(f"checkpoint {where} holds no training state (no {TRAIN_ITEM}/ folder): "
                              "it can embed, not resume")
    model = _restore_model_at(where, {k: abstract_state[k] for k in MODEL_KEYS})
    _check_digest(where, TRAIN_ITEM)
    train = ocp.StandardCheckpointer().restore(where / TRAIN_ITEM, {k: abstract_state[k] for k in TRAIN_KEYS})
    return {**model, **train}


def restore_model(run_dir: Path, abstract_model: dict, step: int | None = None, *,
                  warn: Callable[[str], None] | None = None) -> tuple[int, dict]:
    """(step, {"params", "stats", "centre", "whitening"}) of the latest (or given) checkpoint, into
    `abstract_model`'s structure, shapes and shardings; "centre" is a float32 [F] numpy array, or
    None for a step saved without one; "whitening" (mean, matrix) float32 numpy arrays, or None
    (steps saved before 0.4.0). Reads no optimizer state.

    Without `step`, a newest checkpoint that cannot be read is passed over for the next older one
    that can, and `warn` (when given) gets one line saying so. Nothing restores: CheckpointError.
    """
    return _newest_that_restores(
        run_dir, step, lambda where: {**_restore_model_at(where, abstract_model), **_restore_readout_at(where)}, warn)


def _restore_readout_at(where: Path) -> dict:
    """{"centre": float32 [F] numpy array or None, "whitening": (mean, matrix) or None}: what the
    step folder `where` saved of them."""
    import numpy as np

    if not (where / CENTRE_ITEM).is_dir():
        return {"centre": None, "whitening": None}
    _check_digest(where, CENTRE_ITEM)
    try:
        saved = _ocp().StandardCheckpointer().restore(where / CENTRE_ITEM)
    except Exception as e:
        raise CheckpointError(f"checkpoint {where} cannot be read: {reason(e)}") from None
    whitening = None
    if "white_matrix" in saved:
        whitening = (np.asarray(saved["white_mean"], np.float32), np.asarray(saved["white_matrix"], np.float32))
    return {"centre": np.asarray(saved["mean"], np.float32), "whitening": whitening}


def restore_state(run_dir: Path, abstract_state: dict, step: int | None = None, *,
                  warn: Callable[[str], None] | None = None) -> tuple[int, dict]:
    """(step, the whole train state) of the latest (or given) checkpoint, for resuming; unreadable
    newest checkpoints are passed over as in `restore_model`."""
    return _newest_that_restores(run_dir, step, lambda where: _restore_state_at(where, abstract_state), warn)
