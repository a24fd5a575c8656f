"""data/prefetch.py: the loader thread yields step s's batch, images[batch_indices(..., s)], on the
devices; a resumed prefetcher replays the order; loader failures surface in get(); close() is prompt."""
import threading
import time

import jax
import numpy as np
import pytest

from contrastive_cli.config import TrainConfig
from contrastive_cli.data.batches import batch_indices
from contrastive_cli.data.prefetch import Prefetcher
from contrastive_cli.mesh import batch_sharding, data_mesh

N, B = 12, 4
CFG = TrainConfig.tiny(batch_size=B, seed=7)


def _images():
    # Image i is filled with i (and its channels with i, i + 100, i + 200): a batch names its rows.
    idx = np.arange(N, dtype=np.uint8)[:, None, None, None]
    return (idx + np.array([0, 100, 200], np.uint8)) * np.ones((1, 2, 3, 1), np.uint8)


def _take(p, n):
    try:
        return [p.get() for _ in range(n)]
    finally:
        p.close()


@pytest.fixture(params=[1, 4], ids=["1dev", "4dev"])
def sharding(request):
    return batch_sharding(data_mesh(jax.devices()[: request.param]))


def test_batches_are_the_rows_of_batch_indices_on_the_devices(sharding):
    images = _images()
    start, steps = 2, 5  # 3 batches per epoch: crosses into the next epoch's shuffle
    got = _take(Prefetcher(images, CFG, start, sharding), steps)
    for s, batch in zip(range(start, start + steps), got):
        assert isinstance(batch, jax.Array) and batch.shape == (B, 2, 3, 3) and batch.dtype == np.uint8
        assert batch.sharding == sharding
        assert len(batch.addressable_shards) == sharding.mesh.devices.size
        np.testing.assert_array_equal(np.asarray(batch), images[batch_indices(N, B, s, seed=CFG.seed)])
    # Each device holds its own contiguous slice of the batch.
    for shard in got[0].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), images[batch_indices(N, B, start, seed=CFG.seed)][shard.index])


def test_a_resumed_prefetcher_replays_the_order(sharding):
    images = _images()
    straight = [np.asarray(b) for b in _take(Prefetcher(images, CFG, 0, sharding), 9)]
    resumed = [np.asarray(b) for b in _take(Prefetcher(images, CFG, 5, sharding), 4)]
    for a, b in zip(straight[5:], resumed):
        np.testing.assert_array_equal(a, b)
    # Not vacuous: the batches of one run are not all the same, and another seed orders them otherwise.
    assert len({a.tobytes() for a in straight}) > 3
    other = [np.asarray(b) for b in _take(Prefetcher(images, TrainConfig.tiny(batch_size=B, seed=8), 0, sharding), 3)]
    assert any(not np.array_equal(a, b) for a, b in zip(straight, other))


class _FailingImages:
    """An image array whose gathers work `ok` times, then raise (a cache file gone bad, say)."""

    def __init__(self, images, ok):
        self.images, self.ok = images, ok

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        if self.ok == 0:
            raise OSError("read error in the image cache")
        self.ok -= 1
        return self.images[idx]


def test_a_loader_failure_surfaces_from_get():
    sharding = batch_sharding(data_mesh(jax.devices()[:1]))
    images = _images()
    p = Prefetcher(_FailingImages(images, ok=2), CFG, 0, sharding)
    try:
        for s in range(2):  # the batches gathered before the failure still arrive, in order
            np.testing.assert_array_equal(np.asarray(p.get()), images[batch_indices(N, B, s, seed=CFG.seed)])
        with pytest.raises(OSError, match="read error in the image cache"):
            p.get()
    finally:
        p.close()
    assert not p._thread.is_alive()


def test_a_failure_on_the_first_batch_surfaces_too():
    sharding = batch_sharding(data_mesh(jax.devices()[:1]))
    p = Prefetcher(_FailingImages(_images(), ok=0), CFG, 0, sharding)
    try:
        with pytest.raises(OSError, match="read error"):
            p.get()
    finally:
        p.close()


def test_close_returns_promptly_with_the_queue_full():
    sharding = batch_sharding(data_mesh(jax.devices()[:4]))
    p = Prefetcher(_images(), CFG, 0, sharding, depth=2)
    deadline = time.monotonic() + 10
    while not p._q.full() and time.monotonic() < deadline:  # the thread now waits to put a third batch
        time.sleep(0.01)
    assert p._q.full()
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 2, "close() waited on the blocked loader thread"
    assert not p._thread.is_alive()


def test_close_while_get_is_not_called_leaves_no_thread():
    sharding = batch_sharding(data_mesh(jax.devices()[:1]))
    before = threading.active_count()
    ps = [Prefetcher(_images(), CFG, s, sharding) for s in range(3)]
    t0 = time.monotonic()
    for p in ps:
        p.close()
    assert time.monotonic() - t0 < 3
    assert not any(p._thread.is_alive() for p in ps)
    assert threading.active_count() <= before
