"""Rich output on stderr: progress, warnings, summary tables. stdout is left for results.

No JAX import: the CLI's help and errors stay instant.
"""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

err = Console(stderr=True, highlight=False)


# Messages are plain text: escaped, so a file name like "[/]x.jpg" prints as itself, not as markup.
def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    err.print(escape(message), soft_wrap=True)


def _progress(*extra) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=err, transient=False)


class DecodeProgress:
    """A bar for decoding a folder: `on_progress(done, total)`."""

    def __init__(self, description: str = "decoding"):
        self.description = description
        self._progress = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            self._progress = _progress(TaskProgressColumn())
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        self._progress.update(self._task, completed=done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TrainDisplay:
    """pretrain()'s monitor: a progress bar with loss, pairs/s and data wait; a final table."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.loading = DecodeProgress("decoding images") if not quiet else (lambda done, total: None)
        self._progress = None
        self._task = None
        self._knn = None  # the latest kNN probe accuracy: shown until the next one

    def start(self, info: dict) -> None:
        if isinstance(self.loading, DecodeProgress):
            self.loading.close()
        if self.quiet:
            return
        resumed = f", resuming at step {info['start']}" if info["start"] else ""
        # With a time budget the step count is not known until the compiled step's speed is measured.
        length = (f"{info['steps']} steps" if info.get("steps") is not None
                  else f"{info['time_budget']:g} minutes of steps")
        err.print(f"training on {info['images']} images ({info['skipped']} skipped) in {info['load_s']:.1f} s decode; "
                  f"{length} of {info['batch_size']} pairs on {info['devices']} "
                  f"{info['backend']} device(s){resumed} -> {info['output']}", soft_wrap=True)
        self._progress = _progress(TextColumn("{task.fields[stats]}"))
        self._progress.start()
        self._task = self._progress.add_task("training", total=info["steps"], completed=info["start"],
                                             stats="compiling...")

    def step(self, step: int, total: int, record: dict | None) -> None:
        if self._progress is None:
            return
        fields = {}
        if record is not None:
            rate = record.get("pairs_per_s")
            self._knn = record.get("knn", self._knn)
            first = record.get("first_step_s")
            fields["stats"] = (f"loss {record['loss']:.4f}"
                               + (f"  {rate:,.0f} pairs/s" if rate else "")
                               + (f"  compiled + first step {first:.1f} s" if first is not None else "")
                               + f"  data wait {100 * record['data_wait']:.0f}%"
                               + f"  pos/neg cos {record.get('pos_cos', 0):.2f}/{record.get('neg_cos', 0):.2f}"
                               + (f"  kNN {self._knn:.3f}" if self._knn is not None else ""))
        self._progress.update(self._task, completed=step, total=total, **fields)

    def warn(self, message: str) -> None:
        warn(message)

    def end(self, summary: dict) -> None:
        self.close()
        if self.quiet:
            return
        table = Table(title="pretrain summary", show_header=False)
        for key in ("output", "encoder", "loss", "steps", "batch_size", "images", "skipped", "final_loss",
                    "compile_s", "load_s", "wall_s", "devices"):
            value = summary.get(key)
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        err.print(table)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
