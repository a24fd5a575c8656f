"""data/batches.py: the seeded batch order, a pure function of (n, batch, step, seed)."""
import numpy as np

from contrastive_cli.data.batches import batch_indices, epoch_permutation


def test_golden_shuffle_order():
    # Changing these breaks resumed runs and published results: change them only on purpose.
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert epoch_permutation(10, seed=0, epoch=1).tolist() == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]
    assert epoch_permutation(10, seed=1, epoch=0).tolist() == [8, 4, 7, 0, 1, 2, 5, 9, 6, 3]
    assert [batch_indices(10, 4, s, seed=0).tolist() for s in range(4)] == [
        [4, 6, 2, 7], [3, 5, 9, 0], [9, 1, 3, 8], [7, 6, 0, 4]]


def test_epochs_cover_each_image_once_and_drop_the_partial_batch():
    n, b = 23, 5
    for epoch in range(3):
        seen = np.concatenate([batch_indices(n, b, epoch * (n // b) + i, seed=3) for i in range(n // b)])
        assert len(seen) == (n // b) * b and len(set(seen.tolist())) == len(seen)
        assert set(seen.tolist()) <= set(range(n))


def test_batch_order_is_a_pure_function_of_step():
    # A resumed run recomputes step s's batch from (n, batch, s, seed) alone: same call, same batch.
    for s in (0, 3, 7, 11):
        np.testing.assert_array_equal(batch_indices(12, 4, s, seed=7), batch_indices(12, 4, s, seed=7))
    # epoch e's batches are consecutive slices of epoch_permutation(seed, e); the next epoch reshuffles.
    for s in range(6):
        epoch, i = divmod(s, 3)
        np.testing.assert_array_equal(batch_indices(12, 4, s, seed=7),
                                      epoch_permutation(12, seed=7, epoch=epoch)[4 * i:4 * i + 4])
    assert batch_indices(12, 4, 0, seed=7).tolist() != batch_indices(12, 4, 3, seed=7).tolist()
    assert batch_indices(12, 4, 0, seed=7).tolist() != batch_indices(12, 4, 0, seed=8).tolist()
