"""Run directories: a new one per run, never overwritten without --force; metrics kept consistent."""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from . import checkpoint
from .config import TrainConfig
from .errors import CheckpointError, ContrastiveError
from .mesh import agree, is_primary


def default_run_dir(cfg: TrainConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = root / f"{stamp}-{cfg.model.encoder}", 1
    while path.exists():
        i += 1
        path = root / f"{stamp}-{cfg.model.encoder}-{i}"
    return path


def prepare_run_dir(output: Path, cfg: TrainConfig, *, force: bool) -> None:
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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the restored step, so a resumed run does not log steps twice.

    A line cut short by a kill (no closing newline, or not JSON) is dropped too.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(keep))
