"""The train state and the one jitted train step.

All mutable state (parameters, BatchNorm statistics, optimizer state, step, schedule total) is one
pytree that goes through one `jax.jit` step donating its input (Flax NNX in the functional style:
split once, merge inside the step). Augmentation runs inside the same step, on the device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import TrainConfig
from ..mesh import batch_sharding, replicated
from ..nn import augment, losses
from .optim import learning_rate, lr_at


def working_size(image_size: int) -> int:
    """Side of the decoded-image cache: 1.5x the crop size, so small crops keep their detail."""
    return int(math.ceil(image_size * 1.5))


def make_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh):
    """The jitted step: (state, uint8 images [B, R, R, 3]) -> (state, outputs), donating the state.

    `step_function`'s step with the state replicated over `mesh` and the batch split over it.
    """
    repl, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step_function(cfg, graphdef, tx), in_shardings=(repl, batch), out_shardings=(repl, repl),
                   donate_argnums=0)


def step_function(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """The train step, not yet jitted: (state, uint8 images [B, R, R, 3]) -> (state, outputs).

    Outputs: loss and lr of this step, the projections z1, z2 [B, D], and `finite`: the loss and
    the new state are all finite (a state that is not is never saved); with a loss that learns its
    logit scale and bias (losses.LEARNED_SCALARS), also `logit_scale` and `logit_bias` as used.
    """
    loss_fn = losses.LOSSES[cfg.loss]
    size = cfg.model.image_size
    peak = learning_rate(cfg)

    def step(state, images):
        base_key = jax.random.key(cfg.seed + 1)
        key = jax.random.fold_in(base_key, state["step"])  # a resumed run replays the same stream
        v1, v2 = augment.augment_views(images, key=key, cfg=cfg.augment, size=size)
        # concat: [2B, S, S, 3], one encoder pass, BN statistics over both views; separate: a pass
        # (and BN statistics, and a BN running-average update) per view.
        inputs = [jnp.concatenate([v1, v2])] if cfg.views == "concat" else [v1, v2]

        def objective(params):
            # Fresh Variable objects at this trace level: BatchNorm updates its statistics in place.
            model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state["stats"]))
            z = jnp.concatenate([model(x, train=True)[1] for x in inputs])
            z1, z2 = jnp.split(z.astype(jnp.float32), 2)  # [B, D] each
            new_stats = nnx.state(model, nnx.BatchStat)
            scalars = {}
            if model.logit_scalars is not None:  # learned: their gradients come from this loss
                scalars = {"logit_scale": model.logit_scalars.logit_scale[...],
                           "logit_bias": model.logit_scalars.logit_bias[...]}
            return loss_fn(z1, z2, temperature=cfg.temperature, **scalars), (new_stats, z1, z2, scalars)

        (loss, (stats, z1, z2, scalars)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        lr = lr_at(state["step"], state["total"], peak=peak, warmup_fraction=cfg.warmup_fraction)
        opt = state["opt"]
        opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lr})
        updates, opt = tx.update(grads, opt, state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "stats": stats, "opt": opt, "step": state["step"] + 1, "total": state["total"]}
        finite = jnp.isfinite(loss)
        for leaf in jax.tree.leaves((params, stats, opt)):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                finite &= jnp.all(jnp.isfinite(leaf))
        return new, {"loss": loss, "lr": lr, "z1": z1, "z2": z2, "finite": finite, **scalars}

    return step
