"""train/optim.py: default peak learning rates, the warm-up + cosine schedule, the weight-decay
mask, and the injected learning rate each optimizer runs with."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_cli.config import TrainConfig
from contrastive_cli.train.optim import learning_rate, lr_at, make_optimizer


# ---- peak learning rate ----------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, at_256", [("adamw", 2e-3), ("sgd", 0.12), ("lars", 0.3)])
def test_default_learning_rate_per_optimizer(optimizer, at_256):
    assert learning_rate(TrainConfig(optimizer=optimizer, batch_size=256)) == pytest.approx(at_256)


def test_default_learning_rate_scales_with_batch_size():
    def lr(optimizer, b):
        return learning_rate(TrainConfig(optimizer=optimizer, batch_size=b))

    assert lr("sgd", 128) == pytest.approx(0.06) and lr("sgd", 512) == pytest.approx(4 * lr("sgd", 128))  # linear
    assert lr("lars", 64) == pytest.approx(0.3 / 4) and lr("lars", 1024) == pytest.approx(1.2)  # linear
    assert lr("adamw", 1024) == pytest.approx(2 * lr("adamw", 256))  # square root
    assert lr("adamw", 64) == pytest.approx(2e-3 / 2)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_an_explicit_lr_wins(optimizer):
    assert learning_rate(TrainConfig(optimizer=optimizer, batch_size=64, lr=0.0123)) == 0.0123


# ---- schedule --------------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_to_zero_at_total():
    peak, total, frac = 0.8, 100, 0.1  # 10 warm-up steps
    got = np.asarray(jax.jit(lambda s: lr_at(s, total, peak=peak, warmup_fraction=frac))(jnp.arange(total + 6)))
    np.testing.assert_allclose(got[:10], peak * np.arange(10) / 10, rtol=1e-6, atol=1e-7)  # 0, 0.08, ... 0.72
    assert got[10] == pytest.approx(peak)  # the peak right after the warm-up
    cosine = 0.5 * peak * (1 + np.cos(np.pi * (np.arange(10, total + 1) - 10) / 90))
    np.testing.assert_allclose(got[10:total + 1], cosine, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(got[:11]) > 0) and np.all(np.diff(got[10:total + 1]) < 0)
    assert got[total] == pytest.approx(0.0, abs=1e-7) and np.all(np.abs(got[total:]) < 1e-7)  # stays at 0 after
    assert got[55] == pytest.approx(peak / 2, rel=1e-5)  # half-way through the decay: half the peak


def test_schedule_without_warmup_and_degenerate_totals():
    assert float(lr_at(0, 50, peak=1.0, warmup_fraction=0.0)) == pytest.approx(1.0)
    assert float(lr_at(25, 50, peak=1.0, warmup_fraction=0.0)) == pytest.approx(0.5, rel=1e-5)
    # A warm-up shorter than one step is no warm-up; a total of 0 counts as 1: finite, no division by 0.
    assert float(lr_at(0, 10, peak=1.0, warmup_fraction=0.05)) == pytest.approx(1.0)
    for total in (0, 1):
        assert math.isfinite(float(lr_at(0, total, peak=1.0, warmup_fraction=0.5)))


def test_the_total_is_traced_so_one_program_serves_every_total():
    f = jax.jit(lambda s, t: lr_at(s, t, peak=1.0, warmup_fraction=0.0))
    a, b = float(f(50, 100)), float(f(50, 200))
    assert a == pytest.approx(0.5, rel=1e-5) and b == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
    assert f._cache_size() == 1


# ---- weight decay mask -----------------------------------------------------------------------------
def test_adamw_decays_matrices_not_biases_or_norm_scales():
    cfg = TrainConfig.tiny(optimizer="adamw", lr=0.1, weight_decay=0.5)
    tx = make_optimizer(cfg)
    params = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0), "scale": jnp.full((4,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: only weight decay moves a parameter
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)  # p - lr * wd * p: shrinks
    np.testing.assert_array_equal(new["bias"], params["bias"])
    np.testing.assert_array_equal(new["scale"], params["scale"])


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_the_other_optimizers_use_the_same_mask(optimizer):
    tx = make_optimizer(TrainConfig.tiny(optimizer=optimizer, lr=0.1, weight_decay=0.5))
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3), "logit_scale": jnp.asarray(1.0)}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) < 0)
    assert np.all(np.asarray(updates["bias"]) == 0) and float(updates["logit_scale"]) == 0


# ---- the injected learning rate --------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_injected_learning_rate_is_what_the_step_sets(optimizer):
    cfg = TrainConfig.tiny(optimizer=optimizer, batch_size=256, weight_decay=0.0)
    tx = make_optimizer(cfg)
    params = {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.zeros(3)}
    grads = {"kernel": jnp.full((2, 3), 0.1), "bias": jnp.full((3,), -0.2)}
    state = tx.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(learning_rate(cfg))  # the peak

    def update(lr):  # as train/step.py sets it: replace the hyperparameter, then update
        s = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(lr)})
        updates, s = tx.update(grads, s, params)
        return updates, s

    small, s_small = update(0.01)
    large, s_large = update(0.04)
    assert float(s_small.hyperparams["learning_rate"]) == pytest.approx(0.01)
    assert float(s_large.hyperparams["learning_rate"]) == pytest.approx(0.04)
    # The first update is -lr x (a direction that does not depend on lr): 4x the rate, 4x the step.
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large)):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(np.asarray(b), 4 * np.asarray(a), rtol=1e-5)
    assert np.all(np.asarray(small["kernel"]) < 0)  # against the gradient
    zero, _ = update(0.0)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(zero))
