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

from . import augment, losses
from .config import TrainConfig
from .mesh import batch_sharding, replicated
from .models import SimCLRModel
from .optim import learning_rate, lr_at


def compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32


# The first state's program runs once: on CPU, LLVM's -O1 compiles it 2-2.3x faster than XLA's
# default -O3, and it computes the same state bit for bit (tests/test_step.py);
# benchmarks/compile_time.py, init_s with an empty cache: small CNN 4.7 -> 2.0 s, ResNet-18
# 10.2-10.6 -> 4.6 s; with the cache filled 1.1-1.4 s either way. (-O0: 4.6 s, but other last bits.)
INIT_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation, sharding=None) -> tuple[nnx.GraphDef, dict]:
    """Model graph (static) and the state pytree {params, stats, opt, step, total}, seeded by cfg.seed.

    With `sharding`, the state is built by one jitted program straight into it: one compile instead
    of an eager op per layer, and no host-to-device copy (checked equal across processes per leaf).
    """
    holder = {}

    def build():
        learned = cfg.loss in losses.LEARNED_SCALARS
        scalars = (losses.SIGMOID_LOGIT_SCALE, losses.SIGMOID_LOGIT_BIAS) if learned else None
        model = SimCLRModel(cfg.model, dtype=compute_dtype(cfg), rngs=nnx.Rngs(params=jax.random.key(cfg.seed)),
                            logit_scalars=scalars)
        holder["graphdef"], params, stats = nnx.split(model, nnx.Param, ...)
        return {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.int32(0), "total": jnp.int32(1)}

    if sharding is None:
        state = build()
        return holder["graphdef"], state
    lowered = jax.jit(build, out_shardings=sharding).lower()
    options = INIT_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return holder["graphdef"], lowered.compile(compiler_options=options)()


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
