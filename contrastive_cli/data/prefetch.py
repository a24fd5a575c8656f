"""Host batches prepared and sent to the devices on a thread while the current step runs.

Not Grain: after the decoded-image cache, a batch is one fancy-indexed gather from a uint8 array,
and this thread keeps the step's data wait near zero (pipeline_speed.py; see BENCHMARKS.md,
"Figures moved from the code" and "Input pipeline"); Grain's
worker processes and record formats would add a dependency for no measured gain here.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..mesh import global_batch, local_rows
from .batches import batch_indices


@dataclass
class Prefetcher:
    """Gathers and transfers the next batches on a thread while the current step runs.

    Each process gathers only the rows of the global batch that its own devices hold.
    """

    images: np.ndarray
    cfg: TrainConfig
    start: int
    sharding: Any
    depth: int = 2
    _q: queue.Queue = field(init=False)

    def __post_init__(self):
        self._q = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            b = self.cfg.batch_size
            rows = local_rows(self.sharding, b)
            for s in itertools.count(self.start):
                idx = batch_indices(len(self.images), b, s, seed=self.cfg.seed)[rows]
                if not self._put(global_batch(self.images[idx], self.sharding, b)):
                    return
        except BaseException as e:  # surface loader failures in the training thread
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)  # no JAX call left running on a thread at interpreter exit
