"""The run directory: one owner for everything a run writes.

    RUN/config.json       TrainConfig (checkpoint.read_config reads it back)
    RUN/checkpoints/      Orbax checkpoints, model apart from training state (checkpoint.py)
    RUN/metrics.jsonl     one JSON object per logged step (logbook.py)
    RUN/skipped.txt       files that could not be used, with the reason
    RUN/summary.json      written when a run ends
    RUN/metrics.png       the metrics drawn (plot.py)
    RUN/.lock             "PID HOST" of the process writing the run, while it runs

config.json carries the top-level key "contrastive_run" (data/scan.py's RUN_MARKER): that is how
`--force` knows a folder is one of our runs, and how a scan of an image folder knows to leave a
run inside it out.

A new run gets a new folder, never a user's folder overwritten without --force; and --force
replaces only a provable run: a folder whose config.json carries the marker (or, for runs written
before it, a config.json beside checkpoints/) and that holds nothing a run does not write. It is
never the image folder or a folder above it, the current directory or the home directory, and
what it removes is the run's own entries, one by one, never a whole unknown tree.

One process at a time writes a run: `lock()` holds RUN/.lock, made atomically (a hard link of a
complete file, so a reader never sees it half written), for the run's life. A lock whose process
is gone (the same host, a pid no longer alive: a SIGKILLed run) is taken over. Only process 0
writes files other than checkpoints and holds the lock; creating the folder and taking the lock
are collectives.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .. import checkpoint
from ..config import TrainConfig
from ..data.scan import LOCK_NAME, RUN_MARKER, is_marked_run
from ..errors import CheckpointError, ContrastiveError
from ..files import write_json_atomic, write_text_atomic
from ..mesh import agree, is_primary

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.png", "summary.json", "skipped.txt")
CHECKPOINTS = "checkpoints"
# files.write_temp's names for a write cut short: ".metrics.png.k3j2_x.tmp"
_TEMP = re.compile(r"\.(" + "|".join(re.escape(n) for n in RUN_FILES) + r")\..+\.tmp")
_LOCK_TEMP = re.compile(re.escape(LOCK_NAME) + r"\.\d+\.tmp")  # lock() writing its file
# Orbax: a step, or one being written; or a step that could not be read, set aside on resume
_STEP = re.compile(r"\d+(\.orbax-checkpoint-tmp.*|\.unreadable(-\d+)?)?")


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

    @contextmanager
    def lock(self, *, fresh: bool, force: bool = False, images: Path | None = None) -> Iterator[None]:
        """Hold RUN/.lock while the block runs (process 0; a collective). `fresh`: a new run is
        to be written here, so first check, before anything is written, that the folder may be
        used (`check_replaceable`). The folder is made if missing, and removed again at the end
        when the block left it empty."""
        made = held = False
        try:
            if is_primary():
                made = not self.path.exists()
            def take():
                nonlocal held
                if fresh:
                    self.check_replaceable(force=force, images=images)
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise CheckpointError(f"cannot create {self.path}: {e.strerror}") from None
                held = self._acquire()
            _on_primary(take, f"process 0 could not lock {self.path}; see its messages")
            yield
        finally:
            if held:
                self._release()
            if made:
                try:
                    self.path.rmdir()  # only when empty: a run that wrote nothing leaves no folder
                except OSError:
                    pass

    def _acquire(self) -> bool:
        lock, me = self.path / LOCK_NAME, _holder()
        tmp = self.path / f"{LOCK_NAME}.{os.getpid()}.tmp"
        try:
            tmp.write_text(me)
        except OSError as e:
            raise CheckpointError(f"cannot write in {self.path}: {e.strerror}") from None
        try:
            for _ in range(2):
                try:
                    os.link(tmp, lock)  # atomic, and fails when the lock exists: O_EXCL with the content
                    return True
                except FileExistsError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise CheckpointError(f"cannot lock {self.path}: {e.strerror}") from None
                    try:  # a file system without hard links
                        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        lock.write_text(me)
                        return True
                    except FileExistsError:
                        pass
                pid, host = _read_holder(lock)
                if host == socket.gethostname() and pid is not None and not _alive(pid):
                    if self._take_over(lock, tmp, (pid, host)):  # stale: its process is gone
                        return True
                    continue
                where = "" if host == socket.gethostname() else f" on {host or 'an unknown host'}"
                raise CheckpointError(
                    f"{self.path} is in use by process {pid if pid is not None else '(unknown)'}{where} "
                    f"({lock}); wait for it to finish or stop it"
                    + ("" if not where else f", or delete {lock} if no such process runs"))
            raise CheckpointError(f"could not lock {self.path}: another process took {lock} at the same time")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, lock: Path, tmp: Path, stale: tuple[int, str]) -> bool:
        """Replace the stale lock `stale` names with ours; False when another process got there
        first. Takers queue on a flock of the run folder itself (no file of its own to leave
        behind), so the check, the unlink and the link are one step: without it, two processes
        that both found the stale lock could each unlink the other's fresh one and both "hold" it."""
        try:
            guard = os.open(self.path, os.O_RDONLY)
        except OSError:
            guard = None
        try:
            if guard is not None:
                try:
                    fcntl.flock(guard, fcntl.LOCK_EX)
                except OSError:  # a file system without flock: unguarded, as before
                    pass
            if _read_holder(lock) != stale:
                return False  # taken over (or released) meanwhile: look again
            lock.unlink(missing_ok=True)
            try:
                os.link(tmp, lock)
            except FileExistsError:
                return False
            except OSError:  # no hard links here: the O_EXCL path of _acquire
                return False
            return True
        finally:
            if guard is not None:
                os.close(guard)

    def _release(self) -> None:
        lock = self.path / LOCK_NAME
        try:
            if lock.read_text() == _holder():  # ours: a lock taken over from us stays
                lock.unlink()
        except OSError:
            pass

    def check_replaceable(self, *, force: bool, images: Path | None = None) -> None:
        """Raise a one-line CheckpointError unless a new run may be written here: the folder is
        missing or empty, or (with `force`) it is provably a run and holds only what runs write."""
        out = self.path
        if out.is_symlink():
            raise CheckpointError(f"{out} is a symbolic link; give the run directory itself as --output")
        if not out.exists():
            return
        if not out.is_dir():
            raise CheckpointError(f"{out} is a file, not a run directory; choose another --output")
        entries = sorted(p.name for p in out.iterdir())
        if not entries or entries == [LOCK_NAME]:
            return
        if not force:
            raise CheckpointError(f"{out} already exists; pass --resume to continue that run or --force to replace it")
        here = out.resolve()
        if here == Path.cwd().resolve():
            raise CheckpointError(f"{out} is the current directory; --force never replaces it")
        if here == Path.home().resolve():
            raise CheckpointError(f"{out} is the home directory; --force never replaces it")
        if images is not None:
            folder = Path(images).resolve()
            if folder == here:
                raise CheckpointError(f"{out} is the image folder being trained on; --force never replaces it")
            if here in folder.parents:
                raise CheckpointError(f"{out} holds the image folder {images}; --force never replaces it")
        config = out / "config.json"
        if not config.is_file() or config.is_symlink():
            raise CheckpointError(f"{out} exists and is not a run directory (no config.json); --force only replaces runs")
        if not is_marked_run(config) and not (out / CHECKPOINTS).is_dir():
            raise CheckpointError(f"{out} exists and is not a run directory (its config.json was not written by "
                                  "contrastive); --force only replaces runs")
        foreign = [n for n in entries if not self._is_run_entry(n)]
        foreign += [f"{CHECKPOINTS}/{n}" for n in self._checkpoint_entries() if not self._is_step(n)]
        if foreign:
            raise CheckpointError(f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                                  "which a run does not write; --force only replaces runs (move it away first)")

    def _is_run_entry(self, name: str) -> bool:
        p = self.path / name
        if name == CHECKPOINTS:
            return p.is_dir() and not p.is_symlink()
        ours = name in RUN_FILES or name == LOCK_NAME or _TEMP.fullmatch(name) or _LOCK_TEMP.fullmatch(name)
        return bool(ours) and \
            (p.is_symlink() or p.is_file())

    def _checkpoint_entries(self) -> list[str]:
        ckpt = self.path / CHECKPOINTS
        return sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() and not ckpt.is_symlink() else []

    def _is_step(self, name: str) -> bool:
        p = self.path / CHECKPOINTS / name
        return bool(_STEP.fullmatch(name)) and p.is_dir() and not p.is_symlink()

    def create(self, cfg: TrainConfig, *, force: bool, images: Path | None = None) -> None:
        """Make the folder for a new run and write its config (process 0); a collective: every
        process raises when process 0 could not. An existing run is replaced only with `force`
        and only as `check_replaceable` allows; only its own entries are removed."""
        _on_primary(lambda: self._create(cfg, force=force, images=images),
                    f"process 0 could not prepare {self.path}; see its messages")

    def _create(self, cfg: TrainConfig, *, force: bool, images: Path | None) -> None:
        self.check_replaceable(force=force, images=images)
        if self.path.is_dir():
            for p in sorted(self.path.iterdir()):
                if p.name == LOCK_NAME:
                    continue  # ours (lock()), or the holder of a live one would have stopped us
                try:
                    shutil.rmtree(p) if p.name == CHECKPOINTS else p.unlink()
                except OSError as e:
                    raise CheckpointError(f"cannot remove {p} of the old run: {e.strerror}") from None
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_config(cfg)

    def save_config(self, cfg: TrainConfig) -> None:
        """config.json, with the marker that makes this folder provably a run."""
        if is_primary():
            write_json_atomic(self.path / "config.json", {**cfg.to_json(), RUN_MARKER: 1})

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

    def restore_state(self, abstract_state: dict, warn=None) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that restores (`warn` says when newer ones could
        not be read), or None when the run saved none yet."""
        if not checkpoint.saved_steps(self.path):
            return None
        return checkpoint.restore_state(self.path, abstract_state, warn=warn)

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename the checkpoints newer than `step` (restoring passed over them: they cannot be
        read) to <step>.unreadable, so the resumed run can save those steps again and nothing is
        deleted. Process 0 renames; a collective. The new names."""
        moved = []

        def rename():
            for s in checkpoint.saved_steps(self.path):
                if s > step:
                    src = checkpoint.checkpoint_dir(self.path) / str(s)
                    dst, i = src.with_name(f"{s}.unreadable"), 1
                    while dst.exists():
                        i += 1
                        dst = src.with_name(f"{s}.unreadable-{i}")
                    try:
                        src.rename(dst)
                    except OSError as e:
                        raise CheckpointError(f"cannot move the unreadable checkpoint {src} aside: {e.strerror}") from None
                    moved.append(dst)

        _on_primary(rename, f"process 0 could not move the unreadable checkpoints of {self.path} aside")
        return moved

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


def _on_primary(fn, failed_elsewhere: str = "") -> None:
    """Run `fn` on process 0; a collective: every process raises when process 0's call did."""
    error = None
    if is_primary():
        try:
            fn()
        except ContrastiveError as e:
            error = e
    failed = agree([error is not None])[0, 0]  # also the barrier: process 0's work is done after it
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(failed_elsewhere)


def _holder() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read_holder(lock: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file; (None, None) when it cannot be read."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
