"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3), for XLA:CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): each 2x2 tile of the
output is A^T [(G g G^T) * (B^T d B)] A, with d the 4x4 input tile around it and g the 3x3 kernel.
Summed over input channels, the 16 elementwise products become 16 matmuls of [tiles, C] x [C, O]:
16 multiplies per 4 outputs instead of 36, so the matmuls do 4/9 of a direct convolution's work.
The gradients are the transposes of the same linear maps, written out (a custom VJP): the
weight gradient is 16 matmuls of the transformed input with the transformed output
gradient, the input gradient 16 matmuls with the transformed kernel. Errors stay at float32
rounding (the transforms add, subtract and halve).

`benchmarks/winograd_speed.py` times it against XLA's Eigen convolution: it wins from 128 channels
up and loses at 64 (the transforms move 4x the input through memory, and small weight-gradient
matmuls run slowly), so `applies` keeps it to 128 channels and up (figures: BENCHMARKS.md,
"Figures moved from the code").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Least input channels for which the transforms pay for themselves (see the module docstring).
MIN_CHANNELS = 128
# Most bytes of transformed input (16 x tiles x C float32): past it, Winograd measured slower than
# XLA's convolution (BENCHMARKS.md, "Figures moved from the code").
MAX_TILE_BYTES = 128 * 2**20
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def applies(x_shape, kernel_shape, stride: int, padding: int, dtype) -> bool:
    """Whether `conv3x3` should replace the convolution: 3x3, stride 1, 'same' padding, even H and
    W, float32, at least MIN_CHANNELS input channels, at most MAX_TILE_BYTES of transformed input."""
    n, h, w, c = x_shape
    return (tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and padding == 1 and h % 2 == 0 and w % 2 == 0
            and c >= MIN_CHANNELS and 16 * n * (h // 2) * (w // 2) * c * 4 <= MAX_TILE_BYTES
            and jnp.dtype(dtype) == jnp.float32)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)])` for NHWC x [N, H, W, C]
    (H, W even) and an HWIO kernel [3, 3, C, O], to float32 rounding; differentiable."""
    return _forward(x, kernel)[0]


def _forward(x, kernel):
    n, h, w, c = x.shape
    o = kernel.shape[-1]
    g = jnp.asarray(_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, c, o)  # G g G^T
    v = _apply(_BB, _tiles(x)).reshape(16, -1, c)  # B^T d B: [16, tiles, C]
    m = jnp.einsum("kmc,kco->kmo", v, u, preferred_element_type=jnp.float32)
    y = _apply(_AA, m).reshape(2, 2, n, h // 2, w // 2, o)  # A^T m A: [p, q, N, H/2, W/2, O]
    # Saved: x, not v (4x its size); recomputing v measured no slower. XLA's peak temp memory still
    # grows more per layer than with its own convolution (BENCHMARKS.md, "Figures moved from the code").
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, h, w, o).astype(x.dtype), (x, u)


def _backward(residuals, dy):
    """The transposes: dm = A dy A^T per tile; dkernel = G^T (v^T dm) G; dx = B (dm u^T) B^T, added
    back where each (overlapping) input tile came from."""
    x, u = residuals
    v = _apply(_BB, _tiles(x)).reshape(16, -1, x.shape[-1])
    n, h, w, o = dy.shape
    dy_tiles = dy.reshape(n, h // 2, 2, w // 2, 2, o).transpose(2, 4, 0, 1, 3, 5)  # [p, q, N, H/2, W/2, O]
    dm = _apply(_AA.T, dy_tiles.reshape(4, -1)).reshape(16, -1, o)
    du = jnp.einsum("kmc,kmo->kco", v, dm, preferred_element_type=jnp.float32).reshape(4, 4, *u.shape[1:])
    g = jnp.asarray(_G, du.dtype)
    dkernel = jnp.einsum("ai,abco,bj->ijco", g, du, g).astype(u.dtype)
    dv = jnp.einsum("kmo,kco->kmc", dm, u, preferred_element_type=jnp.float32)
    dtiles = _apply(_BB.T, dv).reshape(16, n, h // 2, w // 2, -1)
    dx = jax.linear_transpose(_tiles, jax.ShapeDtypeStruct(x.shape, dy.dtype))(dtiles.astype(dy.dtype))[0]
    return dx, dkernel


conv3x3.defvjp(_forward, _backward)

# The transforms as [16, 16] and [4, 16] matrices over the tile elements (i, j) row-major:
# B^T d B is kron(B^T, B^T) @ d, A^T m A is kron(A^T, A^T) @ m. One small matmul each compiles
# faster than the same sums written out element by element, and runs as fast.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_BB, _AA = np.kron(_BT, _BT), np.kron(_AT, _AT)  # [16, 16], [4, 16]


def _apply(matrix, t):
    """matrix [K, L] applied along t's first axis (length L)."""
    return jnp.einsum("kl,l...->k...", jnp.asarray(matrix), t, preferred_element_type=jnp.float32)


def _tiles(x):
    """Every 4x4 tile of the zero-padded input, 2 pixels apart: [16, N, H/2, W/2, C], tile element
    (i, j) row-major. Element (i, j) of all tiles is one shifted slice of a stride-2 phase of the input."""
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2
    phases = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, th + 1, 2, tw + 1, 2, c)
    return jnp.stack([phases[:, i // 2:i // 2 + th, i % 2, j // 2:j // 2 + tw, j % 2]
                      for i in range(4) for j in range(4)])
