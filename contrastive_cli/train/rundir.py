"""The run directory: one owner for everything a run writes.

    RUN/config.json       TrainConfig (checkpoint.read_config reads it back)
    RUN/checkpoints/      Orbax checkpoints, model apart from training state (checkpoint.py)
    RUN/metrics.jsonl     one JSON object per logged step (logbook.py)
    RUN/skipped.txt       files that could not be used, with the reason
    RUN/summary.json      written when a run ends
    RUN/metrics.png       the metrics drawn (plot.py)

A new run gets a new folder, never a user's folder overwritten without --force. Only process 0
writes files other than checkpoints; creating the folder is a collective.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from .. import checkpoint
from ..config import TrainConfig
from ..errors import CheckpointError, ContrastiveError
from ..files import write_json_atomic, write_text_atomic
from ..mesh import agree, is_primary


class RunDir:
    """The files of one run under `path`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def new(cls, cfg: TrainConfig, root: Path = Path("runs")) -> RunDir:
        """A folder under `root` named for the time and encoder, not yet created."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path, i = root / f"{stamp}-{cfg.model.encoder}", 1
        while path.exists():
            i += 1
            path = root / f"{stamp}-{cfg.model.encoder}-{i}"
        return cls(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def exists(self) -> bool:
        return checkpoint.is_run_dir(self.path)

    def read_config(self) -> TrainConfig:
        return checkpoint.read_config(self.path)

    def create(self, cfg: TrainConfig, *, force: bool) -> None:
        """Make the folder for a new run and write its config (process 0); a collective: every
        process raises when process 0 could not."""
        error = None
        if is_primary():
            try:
                self._create(cfg, force=force)
            except ContrastiveError as e:
                error = e
        failed = agree([error is not None])[0, 0]  # also the barrier: the folder is ready after it
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"process 0 could not prepare {self.path}; see its messages")

    def _create(self, cfg: TrainConfig, *, force: bool) -> None:
        out = self.path
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not force:
                raise CheckpointError(f"{out} already exists; pass --resume to continue that run or --force to replace it")
            if out.is_dir() and not checkpoint.is_run_dir(out):
                raise CheckpointError(f"{out} exists and is not a run directory; --force only replaces runs")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.save_config(cfg)

    def save_config(self, cfg: TrainConfig) -> None:
        if is_primary():
            cfg.save(self.path / "config.json")

    def write_skipped(self, skipped: list[tuple[str, str]]) -> Path:
        path = self.path / "skipped.txt"
        if is_primary():
            write_text_atomic(path, "".join(f"{p}\t{r}\n" for p, r in skipped))
        return path

    def write_summary(self, summary: dict) -> None:
        if is_primary():
            write_json_atomic(self.path / "summary.json", summary)

    def checkpoints(self, keep: int):
        """The Orbax manager that saves this run's checkpoints (checkpoint.save)."""
        return checkpoint.manager(self.path, keep)

    def restore_state(self, abstract_state: dict) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint, or None when the run saved none yet."""
        if not checkpoint.saved_steps(self.path):
            return None
        return checkpoint.restore_state(self.path, abstract_state)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past `step`, so a resumed run does not log steps twice.

        A line cut short by a kill (no closing newline, or not JSON) is dropped too.
        """
        if not is_primary() or not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines(keepends=True):
            try:
                if line.endswith("\n") and json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        write_text_atomic(self.metrics, "".join(keep))
