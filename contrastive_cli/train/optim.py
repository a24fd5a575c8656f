"""The optimizer and its learning-rate schedule (warm-up, then cosine decay to zero)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ..config import TrainConfig


def learning_rate(cfg: TrainConfig) -> float:
    """The peak learning rate: cfg.lr, or the optimizer's usual default scaled with batch size.

    sgd: 0.06 x B/128 (lightly's SimCLR example); lars: 0.3 x B/256 (SimCLR, section B.9);
    adamw: 2e-3 x sqrt(B/256), the square-root rule for adaptive optimizers.
    """
    if cfg.lr:
        return cfg.lr
    b = cfg.batch_size
    return {"sgd": 0.06 * b / 128, "lars": 0.3 * b / 256, "adamw": 2e-3 * math.sqrt(b / 256)}[cfg.optimizer]


def _decay_mask(params):
    # Biases and BatchNorm scales/offsets (all 1-D leaves) get no weight decay (SimCLR, LARS paper).
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lr_at(step, total, *, peak: float, warmup_fraction: float):
    """Linear warm-up over the first `warmup_fraction` of `total` steps, then cosine decay to 0.

    A function of traced (step, total): the total lives in the train state, so a time budget can
    set it after measuring throughput without recompiling, and a resumed run keeps its schedule.
    """
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)
    warmup = jnp.floor(warmup_fraction * total)
    warm = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return jnp.where(step < warmup, warm, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer with its learning rate as an injected hyperparameter (set every step)."""

    def factory(learning_rate):
        if cfg.optimizer == "adamw":
            return optax.adamw(learning_rate, weight_decay=cfg.weight_decay, mask=_decay_mask)
        if cfg.optimizer == "sgd":
            return optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                               optax.sgd(learning_rate, momentum=0.9))
        return optax.lars(learning_rate, weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
                          trust_ratio_mask=_decay_mask, momentum=0.9)

    return optax.inject_hyperparams(factory)(learning_rate=learning_rate(cfg))
