"""A run directory's checkpoints and config: the layout, saving, restoring (Orbax).

    RUN/config.json                  TrainConfig: everything needed to rebuild the model
    RUN/checkpoints/<step>/model/    {"params", "stats"}: all an encoder needs
    RUN/checkpoints/<step>/train/    {"opt", "step", "total"}: what resuming needs besides

Loading an encoder reads `model` alone, so inference never builds an optimizer. Runs written
before this layout hold one item, `default`, with both; they still load (`model` is read from it
with a partial restore). Orbax writes each step to a temporary folder and renames it when whole.
"""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .errors import CheckpointError

MODEL_ITEM, TRAIN_ITEM = "model", "train"
LEGACY_ITEM = "default"  # one item holding model and training state (runs before 0.2)
MODEL_KEYS = ("params", "stats")
TRAIN_KEYS = ("opt", "step", "total")


def _ocp():
    import orbax.checkpoint as ocp  # ~1 s import: only when a checkpoint is touched

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
    """Start saving `state` at `step` (asynchronous; `mngr.wait_until_finished()` to block)."""
    ocp = _ocp()
    model = {k: state[k] for k in MODEL_KEYS}
    train = {k: state[k] for k in TRAIN_KEYS}
    mngr.save(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(model),
                                                 TRAIN_ITEM: ocp.args.StandardSave(train)}), force=True)


def _step_dir(run_dir: Path, step: int | None) -> tuple[int, Path]:
    steps = saved_steps(run_dir)
    if step is None:
        if not steps:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (was its pretrain interrupted before the first save?)")
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (saved: {', '.join(map(str, steps)) or 'none'})")
    return step, checkpoint_dir(run_dir) / str(step)


def restore_model(run_dir: Path, abstract_model: dict, step: int | None = None) -> tuple[int, dict]:
    """(step, {"params", "stats"}) of the latest (or given) checkpoint, into `abstract_model`'s
    structure, shapes and shardings. Reads no optimizer state."""
    ocp = _ocp()
    step, where = _step_dir(run_dir, step)
    if (where / MODEL_ITEM).is_dir():
        return step, ocp.StandardCheckpointer().restore(where / MODEL_ITEM, abstract_model)
    if (where / LEGACY_ITEM).is_dir():
        args = ocp.args.PyTreeRestore(item=abstract_model, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_model))
        return step, ocp.PyTreeCheckpointer().restore(where / LEGACY_ITEM, args=args)
    raise CheckpointError(f"checkpoint {where} holds no model (no {MODEL_ITEM}/ folder)")


def restore_state(run_dir: Path, abstract_state: dict, step: int | None = None) -> tuple[int, dict]:
    """(step, the whole train state) of the latest (or given) checkpoint, for resuming."""
    ocp = _ocp()
    step, where = _step_dir(run_dir, step)
    if (where / LEGACY_ITEM).is_dir():
        return step, ocp.StandardCheckpointer().restore(where / LEGACY_ITEM, abstract_state)
    if not (where / TRAIN_ITEM).is_dir():
        raise CheckpointError(f"checkpoint {where} holds no training state (no {TRAIN_ITEM}/ folder): "
                              "it can embed, not resume")
    _, model = restore_model(run_dir, {k: abstract_state[k] for k in MODEL_KEYS}, step)
    train = ocp.StandardCheckpointer().restore(where / TRAIN_ITEM, {k: abstract_state[k] for k in TRAIN_KEYS})
    return step, {**model, **train}
