"""--time-budget (train/guards.py Budget): the step count follows the measured speed, and follows it
when the speed changes; all on fake clocks."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from contrastive_cli.train import guards
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.train.loop import pretrain


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def drive(budget, clock, step_seconds):
    """Run steps until the budget's total is reached; step i takes step_seconds(i)."""
    total, step = 10**6, 0
    while step < total:
        clock.now += step_seconds(step)
        step += 1
        new = budget.update(step, 0, {"loss": np.float32(0)})
        if new is not None:
            total = new
    return step


def test_budget_ends_on_time_at_a_steady_speed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(guards.time, "perf_counter", clock)
    budget = guards.Budget(100.0, t0=0.0)
    steps = drive(budget, clock, lambda i: 10.0 if i == 0 else 1.0)  # a 10 s compile, then 1 s steps
    assert 85 <= steps <= 90 and clock.now <= 100.0


def test_budget_follows_a_machine_that_gets_faster(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(guards.time, "perf_counter", clock)
    budget = guards.Budget(100.0, t0=0.0)
    # Slow (2 s/step) for the first 30 s, then 0.5 s/step: re-estimates use the recent speed.
    steps = drive(budget, clock, lambda i: 2.0 if clock.now < 30 else 0.5)
    assert clock.now > 90.0, "stopped far too early"
    assert clock.now <= 100.0 and steps > 100


def test_budget_ends_on_time_when_the_compile_takes_most_of_it(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(guards.time, "perf_counter", clock)
    budget = guards.Budget(18.0, t0=0.0)
    # A 15 s compile, fast steps, then a machine 5x slower for the rest: the re-estimates are spread
    # over the 3 s left, so the total follows the slowdown and the schedule still reaches its end.
    steps = drive(budget, clock, lambda i: 15.0 if i == 0 else 0.001 if clock.now < 15.5 else 0.005)
    assert 16.5 <= clock.now <= 18.0
    assert budget.next_check >= 3  # re-estimates spread over the steps, not spent on the first few
    assert steps > 300


def test_budget_uses_its_time_when_the_first_steps_are_slow(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(guards.time, "perf_counter", clock)
    budget = guards.Budget(240.0, t0=0.0)
    # Steps 2-4 slowed by a compile (the first log's health metrics), then 0.1 s steps: the first
    # estimate is 5x too low; it used to end the run at ~60 s, before the first re-estimate.
    steps = drive(budget, clock, lambda i: 10.0 if i == 0 else 0.5 if i < 4 else 0.1)
    assert 230.0 <= clock.now <= 240.0, clock.now
    assert steps > 2200
    assert budget.first_at == 11.5  # the halfway re-estimates leave the fifths' origin alone


def test_budget_stops_a_run_that_overruns(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(guards.time, "perf_counter", clock)
    budget = guards.Budget(20.0, t0=0.0)
    steps = drive(budget, clock, lambda i: 0.1 if i < 10 else 5.0)  # the machine gets much busier
    assert clock.now <= 25.0 and steps < 20


class TickingClock:
    """Every reading moves the clock on by `tick` seconds: a run's time is its count of readings,
    the same on a busy machine as on a quiet one."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


@pytest.mark.slow
def test_time_budget_run_ends_near_its_budget(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = TrainConfig(model=ModelConfig(image_size=16), batch_size=8, time_budget=0.3, log_every=1)
    monkeypatch.setattr(time, "perf_counter", TickingClock(0.05))  # pretrain's clock and the budget's
    summary = pretrain(folder, cfg, tmp_path / "run", cache=False)
    assert 0.3 * 60 * 0.8 <= summary["wall_s"] <= 0.3 * 60 + 1.0  # the budget's seconds, used and kept
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == records[-1]["step"] >= 4
    assert records[-1]["lr"] < 0.2 * max(r["lr"] for r in records)  # the schedule reached its end
