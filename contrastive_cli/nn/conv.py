"""The convolution a model runs, by the name its config records (ModelConfig.conv).

Models take the convolution as an argument (`conv(x, kernel, *, stride, padding)`); nothing here
reads the environment. "xla" is XLA's own convolution; "im2col" and "winograd" are the CPU speed
wing's (contrastive_cli.perf.fastconv: im2col/matmul parts, plus Winograd for 3x3 stride-1 layers
of 128+ channels). Without that wing the same maths runs on XLA's convolution.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Conv = Callable[..., jax.Array]


def xla_conv(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel` (zero padding on every side), in x.dtype;
    bfloat16 inputs accumulate in float32."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32 if x.dtype == jnp.bfloat16 else None,
    ).astype(x.dtype)


def convolution(name: str) -> Conv:
    """The convolution named `name` (config.CONV_CHOICES; "auto" resolved for JAX's backend): the same
    result whichever, to float rounding."""
    name = resolve(name)
    if name == "xla":
        return xla_conv
    try:
        from ..perf import fastconv
    except ImportError:  # the speed wing is not installed: XLA's convolution computes the same
        return xla_conv
    return fastconv.conv2d if name == "winograd" else fastconv.conv2d_im2col


def resolve(name: str, backend: str | None = None) -> str:
    """`name`, or for "auto" the fastest convolution for `backend` (default: JAX's): the speed
    wing's "winograd" on CPU when it is installed, else "xla". Call after JAX may start devices."""
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    try:
        from ..perf import fastconv  # noqa: F401
    except ImportError:
        return "xla"
    return "winograd"
