"""The train state: one pytree {params, stats, opt, step, total}, built straight onto the devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import TrainConfig
from ..nn.models import build_model

# The first state's program runs once: on CPU, LLVM's -O1 compiles it about twice as fast as XLA's
# default -O3, and it computes the same state bit for bit (tests/test_state.py; -O0 draws other last
# bits). Figures: benchmarks/compile_time.py `init_s`, BENCHMARKS.md ("Figures moved from the code").
INIT_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation, sharding=None) -> tuple[nnx.GraphDef, dict]:
    """Model graph (static) and the state pytree {params, stats, opt, step, total}, seeded by cfg.seed.

    With `sharding`, the state is built by one jitted program straight into it: one compile instead
    of an eager op per layer, and no host-to-device copy (checked equal across processes per leaf).
    """
    holder = {}

    def build():
        holder["graphdef"], params, stats = nnx.split(build_model(cfg), nnx.Param, ...)
        return {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.int32(0), "total": jnp.int32(1)}

    if sharding is None:
        state = build()
        return holder["graphdef"], state
    lowered = jax.jit(build, out_shardings=sharding).lower()
    options = INIT_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return holder["graphdef"], lowered.compile(compiler_options=options)()
