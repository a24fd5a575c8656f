"""A run directory's checkpoints and config: the layout, saving, restoring (Orbax).

    RUN/config.json                  TrainConfig: everything needed to rebuild the model
    RUN/checkpoints/<step>/model/    {"params", "stats"}: all an encoder needs
    RUN/checkpoints/<step>/train/    {"opt", "step", "total"}: what resuming needs besides

Loading an encoder reads `model` alone, so inference never builds an optimizer. Runs written
before this layout hold one item, `default`, with both; they still load (`model` is read from it
with a partial restore). Orbax writes each step to a temporary folder and renames it when whole.

A step that cannot be read (a file truncated, deleted or corrupted after it was saved) is passed
over for the next older one that restores, and the caller is told through `warn`. Orbax's and
TensorStore's failures, while restoring or saving (disk full), come back as one-line
CheckpointErrors; the tracebacks Orbax's threads log meanwhile are held back (`quiet_orbax`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import TrainConfig
from .errors import CheckpointError

MODEL_ITEM, TRAIN_ITEM = "model", "train"
LEGACY_ITEM = "default"  # one item holding model and training state (runs before 0.2)
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
    return ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=(MODEL_ITEM, TRAIN_ITEM),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr, step: int, state: dict) -> None:
    """Start saving `state` at `step` (asynchronous; `finish(mngr)` to block). A failure of this or
    of the previous save (they surface here) is a CheckpointError."""
    ocp = _ocp()
    model = {k: state[k] for k in MODEL_KEYS}
    train = {k: state[k] for k in TRAIN_KEYS}
    try:
        mngr.save(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(model),
                                                     TRAIN_ITEM: ocp.args.StandardSave(train)}), force=True)
    except Exception as e:
        raise _save_error(mngr, e) from None


def finish(mngr) -> None:
    """Block until the saves in flight are on disk; a failed one is a CheckpointError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_error(mngr, e) from None


def _save_error(mngr, e: Exception) -> Exception:
    if isinstance(e, (MemoryError, CheckpointError)):
        return e
    return CheckpointError(f"could not save a checkpoint in {mngr.directory}: {reason(e)}")


class _DropOrbaxRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "orbax" not in record.pathname


@contextmanager
def quiet_orbax() -> Iterator[None]:
    """Hold back the log records (each with a traceback, one per thread) that Orbax's background
    threads emit through the `absl` logger when a save fails: the failure reaches the caller as one
    CheckpointError instead. The logger is as it was after the block."""
    drop = _DropOrbaxRecords()
    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_STATUS = re.compile(r"^[A-Z_]{4,}: ")  # TensorStore's status codes: DATA_LOSS, OUT_OF_RANGE, ...


def reason(e: BaseException) -> str:
    """One line for an Orbax/TensorStore failure: the innermost TensorStore status in the chain
    of causes when there is one (the outer messages dump whole specs), else the outermost."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
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
    train = ocp.StandardCheckpointer().restore(where / TRAIN_ITEM, {k: abstract_state[k] for k in TRAIN_KEYS})
    return {**model, **train}


def restore_model(run_dir: Path, abstract_model: dict, step: int | None = None, *,
                  warn: Callable[[str], None] | None = None) -> tuple[int, dict]:
    """(step, {"params", "stats"}) of the latest (or given) checkpoint, into `abstract_model`'s
    structure, shapes and shardings. Reads no optimizer state.

    Without `step`, a newest checkpoint that cannot be read is passed over for the next older one
    that can, and `warn` (when given) gets one line saying so. Nothing restores: CheckpointError.
    """
    return _newest_that_restores(run_dir, step, lambda where: _restore_model_at(where, abstract_model), warn)


def restore_state(run_dir: Path, abstract_state: dict, step: int | None = None, *,
                  warn: Callable[[str], None] | None = None) -> tuple[int, dict]:
    """(step, the whole train state) of the latest (or given) checkpoint, for resuming; unreadable
    newest checkpoints are passed over as in `restore_model`."""
    return _newest_that_restores(run_dir, step, lambda where: _restore_state_at(where, abstract_state), warn)
