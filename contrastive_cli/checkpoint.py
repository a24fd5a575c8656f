"""Run directories: Orbax checkpoints with config.json beside them.

    RUN/config.json       TrainConfig, everything needed to rebuild the model
    RUN/checkpoints/<step>/  Orbax (atomic: written to a temp dir, renamed when complete)
    RUN/metrics.jsonl     one JSON object per logged step
    RUN/skipped.txt       files that could not be used, with the reason
    RUN/summary.json      written when a run ends
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import CheckpointError

# Orbax reports every save through absl at INFO; the run's own display says what matters.
logging.getLogger("absl").setLevel(logging.ERROR)


def _ocp():
    import orbax.checkpoint as ocp  # ~1 s import: only when a checkpoint is touched

    return ocp


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def manager(run_dir: Path, keep: int = 2):
    ocp = _ocp()
    return ocp.CheckpointManager(
        Path(run_dir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save(mngr, step: int, state: Any) -> None:
    """Start saving `state` at `step` (asynchronous; `mngr.wait_until_finished()` to block)."""
    mngr.save(step, args=_ocp().args.StandardSave(state), force=True)


def restore(mngr, abstract_state: Any, step: int | None = None) -> tuple[int, Any]:
    """Restore the latest (or given) step into the structure/shardings of `abstract_state`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    return step, mngr.restore(step, args=_ocp().args.StandardRestore(abstract_state))


def read_config(run_dir: Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json); pass the --output of a pretrain run")
    return TrainConfig.load(run_dir / "config.json")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
