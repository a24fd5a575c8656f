"""The run's logbook: one record per logged step (loss, lr, speed, embedding health, kNN) written
to RUN/metrics.jsonl, and the watch for collapsed embeddings."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

from ..config import TrainConfig
from ..nn import health

COLLAPSE_PATIENCE = 3  # log records in a row that must signal collapse before the warning


class Logbook:
    """Builds, writes and watches the records of one run (process 0 writes; others pass path None).

    `warn(message)` is called once per run when COLLAPSE_PATIENCE records in a row signal collapse.
    """

    def __init__(self, path: Path | None, cfg: TrainConfig, start: int, warn):
        self.cfg, self.start, self.warn = cfg, start, warn
        self._file = open(path, "a") if path is not None else None
        self._metrics = jax.jit(health.batch_metrics)
        self._collapsed, self._warned = 0, False
        self.first_step_s = None
        self.loss = float("nan")
        self._window()

    def _window(self) -> None:
        self._t, self._wait, self._steps = time.perf_counter(), 0.0, 0

    def count(self, wait_s: float) -> None:
        """One more step in the window, which waited `wait_s` for its batch."""
        self._wait += wait_s
        self._steps += 1

    def record(self, step: int, out: dict, step_started: float, knn: float | None = None) -> dict:
        """The record of `step` from the step's outputs (waits for the step); written and watched."""
        self.loss = float(out["loss"])
        now = time.perf_counter()
        first = step == self.start + 1
        if first:  # compiling (or loading from the persistent cache) + one step
            self.first_step_s = now - step_started
        elapsed = now - self._t
        record = {"step": step, "loss": self.loss, "lr": float(out["lr"]),
                  "pairs_per_s": None if first else self._steps * self.cfg.batch_size / elapsed,
                  "data_wait": self._wait / elapsed,
                  **{k: float(v) for k, v in self._metrics(out["z1"], out["z2"]).items()}}
        if first:
            record["first_step_s"] = self.first_step_s
        if "logit_scale" in out:  # the sigmoid loss's learned t = exp(t') and b
            record["sigmoid_t"] = math.exp(float(out["logit_scale"]))
            record["sigmoid_b"] = float(out["logit_bias"])
        if knn is not None:
            record["knn"] = knn
        self._watch(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        self._window()
        return record

    def _watch(self, record: dict) -> None:
        signal_text = health.collapse_signal(record, self.cfg.model.proj_dim)
        self._collapsed = self._collapsed + 1 if signal_text else 0
        if self._collapsed >= COLLAPSE_PATIENCE and not self._warned:
            self._warned = True
            hint = ", a larger --temperature" if self.cfg.loss in ("ntxent", "dcl") else ""
            self.warn(f"the embeddings look collapsed (all images alike) for {COLLAPSE_PATIENCE} log steps up to "
                      f"step {record['step']}: {signal_text}; try a lower --lr{hint}, or check that the "
                      "augmentations leave the images recognisable")

    def close(self) -> None:
        if self._file:
            self._file.close()
