"""What keeps a run safe and on time: the finite-state check, stop signals, the time budget."""
from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax

from ..config import TrainConfig
from ..errors import TrainingDiverged
from .optim import learning_rate


class FiniteCheck:
    """Finds the first step whose loss or new state is not finite.

    Per-step flags stay on the device until a step is logged or saved, then come back in one
    transfer, so the check costs no synchronisation between those steps.
    """

    def __init__(self, start: int):
        self.last_good = start
        self._pending: list[tuple[int, Any, Any]] = []
        self._bad: tuple[int, float] | None = None

    def add(self, step: int, out: dict) -> None:
        self._pending.append((step, out["finite"], out["loss"]))
        if len(self._pending) >= 256:  # bounded, however rarely steps are logged
            self._bad = self._bad or self._first_bad()

    def _first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite step among the pending ones, or None."""
        flags = jax.device_get([(ok, loss) for _, ok, loss in self._pending])
        steps = [s for s, _, _ in self._pending]
        self._pending.clear()
        for step, (ok, loss) in zip(steps, flags):
            if not ok:
                return step, float(loss)
            self.last_good = step
        return None

    def raise_if_diverged(self, *, mngr, output: Path, cfg: TrainConfig) -> None:
        bad = self._bad or self._first_bad()
        if bad is None:
            return
        step, loss = bad
        what = f"loss became {loss}" if not math.isfinite(loss) else f"parameters became non-finite (loss {loss:.4g})"
        since = f"finite up to step {self.last_good}" if self.last_good else "the first step"
        kept = mngr.latest_step()
        where = (f"the last good checkpoint, step {kept}, is kept in {output}" if kept is not None
                 else f"no checkpoint was saved in {output}")
        raise TrainingDiverged(f"training diverged: {what} at step {step} ({since}); {where} (nothing "
                               f"non-finite is saved); try a lower --lr (was {learning_rate(cfg):g})")


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Budget:
    """Turns a wall-clock budget into a step count, from throughput measured after compilation.

    The first estimate comes from steps 2-4 (step 1 includes the compile); it is refined at every
    fifth of the time left after it, from the speed since the previous estimate, so a machine that
    gets busier or quieter mid-run still ends on time. (Fifths of the whole budget failed when
    loading and compiling took most of a short budget: all re-estimates fell on the next steps.)
    It is also refined halfway to the total it last set: steps 2-4 can be slow (the first log
    compiles the health metrics), and a total set from them was reached at a quarter of a 4-minute
    budget at batch 32, before the first fifth. The learning-rate schedule follows the total it
    sets (a late change moves the cosine's end).
    """

    CHECKPOINTS = 5  # re-estimates at 1/5, 2/5, ... of the time left after the first estimate
    MIN_GAP = 16  # steps between halfway re-estimates (each waits for the step)

    def __init__(self, seconds: float, t0: float):
        self.seconds, self.t0 = seconds, t0
        self.mark = None  # (step, time) of the last estimate (first: after the compiled first step)
        self.next_check = 1  # the next fifth of the time left after the first estimate
        self.first_at = None  # seconds into the budget of the first estimate
        self.planned = None  # the total last returned

    def update(self, step: int, start: int, out) -> int | None:
        """Called after each step: a new total step count, or None to keep the current one."""
        done, elapsed = step - start, self._elapsed()
        if elapsed > self.seconds:
            return step  # over budget (a slow save, a busy machine): stop here
        first = done == 1
        estimate = done == 4 or (done > 4 and self.first_at is not None and self.next_check < self.CHECKPOINTS
                                 and elapsed > self.first_at + (self.seconds - self.first_at) * self.next_check
                                 / self.CHECKPOINTS)
        halfway = (self.planned is not None and done > 4
                   and step - self.mark[0] >= max(self.MIN_GAP, (self.planned - self.mark[0]) // 2))
        if not (first or estimate or halfway):
            return None
        jax.block_until_ready(out["loss"])
        now = time.perf_counter()
        if first:
            self.mark = (step, now)
            return None
        if done == 4:
            self.first_at = now - self.t0
        elif estimate:
            self.next_check += 1
        per_step = (now - self.mark[1]) / max(1, step - self.mark[0])
        self.mark = (step, now)
        left = self.seconds - (now - self.t0) - 2 * per_step - 1.0  # keep time for the final save
        self.planned = step + max(0, int(left / per_step))
        return self.planned

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0
