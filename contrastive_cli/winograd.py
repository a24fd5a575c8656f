"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3), for XLA:CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): each 2x2 tile of the
output is A^T [(G g G^T) * (B^T d B)] A, with d the 4x4 input tile around it and g the 3x3 kernel.
Summed over input channels, the 16 elementwise products become 16 matmuls of [tiles, C] x [C, O]:
16 multiplies per 4 outputs instead of 36, so the matmuls do 4/9 of a direct convolution's work.
The gradients are JAX's transposes of the same linear maps (strided slices, the 16 matmuls, the
tile sums): the weight gradient is 16 matmuls of the transformed input with the transformed output
gradient, the input gradient 16 matmuls with the transformed kernel. Errors stay at float32
rounding (the transforms add, subtract and halve).

`benchmarks/winograd_speed.py` times it against XLA's Eigen convolution (forward and both
gradients, batch 128, 2 vCPUs, float32, 2026-11-29): 1.15x at 128 channels (16x16), 1.51x at 256
(8x8), 1.42x at 512 (4x4); at 64 channels (32x32) it is slower (0.89x: the transforms move 4x the
input through memory, and the [64, 64] weight-gradient matmuls run at ~60 GFLOP/s), so `applies`
keeps it to 128 channels and up. The largest output difference is 1.8e-5 of the largest entry.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

# Least input channels for which the transforms pay for themselves (see the module docstring).
MIN_CHANNELS = 128
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def applies(x_shape, kernel_shape, stride: int, padding: int, dtype) -> bool:
    """Whether `conv3x3` should replace the convolution: 3x3, stride 1, 'same' padding, even H and
    W, float32, at least MIN_CHANNELS input channels, unless CONTRASTIVE_WINOGRAD=0."""
    if os.environ.get("CONTRASTIVE_WINOGRAD", "1") == "0":
        return False
    _, h, w, c = x_shape
    return (tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and padding == 1 and h % 2 == 0 and w % 2 == 0
            and c >= MIN_CHANNELS and jnp.dtype(dtype) == jnp.float32)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)])` for NHWC x [N, H, W, C]
    (H, W even) and an HWIO kernel [3, 3, C, O], to float32 rounding; differentiable."""
    return _forward(x, kernel)[0]


def _forward(x, kernel):
    n, h, w, c = x.shape
    g = jnp.asarray(_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, c, kernel.shape[-1])  # G g G^T
    v = _input_tiles(x)  # B^T d B: [16, tiles, C]
    m = jnp.einsum("kmc,kco->kmo", v, u, preferred_element_type=jnp.float32)
    return _output_tiles(m, n, h // 2, w // 2).astype(x.dtype), (v, u, x.shape)


def _backward(residuals, dy):
    """The transposes: dm = A dy A^T per tile; dkernel = G^T (v^T dm) G; dx = B (dm u^T) B^T, added
    back where each (overlapping) input tile came from."""
    v, u, x_shape = residuals
    dm = _output_tiles_transposed(dy)  # [16, tiles, O]
    du = jnp.einsum("kmc,kmo->kco", v, dm, preferred_element_type=jnp.float32).reshape(4, 4, *u.shape[1:])
    g = jnp.asarray(_G, du.dtype)
    dkernel = jnp.einsum("ai,abco,bj->ijco", g, du, g).astype(u.dtype)
    dv = jnp.einsum("kmo,kco->kmc", dm, u, preferred_element_type=jnp.float32)
    return _input_tiles_transposed(dv, x_shape).astype(dy.dtype), dkernel


conv3x3.defvjp(_forward, _backward)

# The 1-D transforms along one tile axis, on lists of arrays (one per tile position).
def _bt(t):  # B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    return [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]


def _b(t):  # its transpose
    return [t[0], t[1] - t[2] + t[3], t[1] + t[2] - t[0], -t[3]]


def _at(t):  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
    return [t[0] + t[1] + t[2], t[1] - t[2] - t[3]]


def _a(t):  # its transpose
    return [t[0], t[0] + t[1], t[0] - t[1], -t[1]]


def _phases(x):
    """[N, 2h, 2w, C] -> p[i][j] = x[:, i::2, j::2], each [N, h, w, C]."""
    n, h, w, c = x.shape
    xr = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return [[xr[:, :, i, :, j] for j in range(2)] for i in range(2)]


def _interleave(p):
    """The inverse of `_phases`: p[i][j] [N, h, w, C] -> [N, 2h, 2w, C]."""
    n, h, w, c = p[0][0].shape
    return jnp.stack([jnp.stack(p[0], axis=3), jnp.stack(p[1], axis=3)], axis=2).reshape(n, 2 * h, 2 * w, c)


def _input_tiles(x):
    """B^T d B for every 4x4 tile d of the padded input, tiles 2 apart: [16, N*H/2*W/2, C], rows
    (a, b) row-major. Tile element (i, j) of every tile is a shifted slice of one phase of it."""
    _, h, w, c = x.shape
    th, tw = h // 2, w // 2
    p = _phases(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    d = [[p[i % 2][j % 2][:, i // 2:i // 2 + th, j // 2:j // 2 + tw] for j in range(4)] for i in range(4)]
    cols = [_bt([d[i][j] for i in range(4)]) for j in range(4)]  # cols[j][a] = sum_i B^T[a, i] d[i][j]
    return jnp.stack([v for a in range(4) for v in _bt([cols[j][a] for j in range(4)])]).reshape(16, -1, c)


def _input_tiles_transposed(dv, x_shape):
    """The transpose of `_input_tiles`: [16, tiles, C] -> [N, H, W, C]."""
    n, h, w, c = x_shape
    th, tw = h // 2, w // 2
    dv = dv.reshape(4, 4, n, th, tw, c)
    rows = [_b([dv[a][b] for a in range(4)]) for b in range(4)]  # rows[b][i] = sum_a B[i, a] dv[a][b]
    dd = [_b([rows[b][i] for b in range(4)]) for i in range(4)]  # dd[i][j]: tile element (i, j)

    def shifted(t, di, dj):  # onto the padded input's phase grid [N, th + 1, tw + 1, C]
        return jnp.pad(t, ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))

    p = [[sum(shifted(dd[i][j], i // 2, j // 2) for i in (pi, pi + 2) for j in (pj, pj + 2)) for pj in range(2)]
         for pi in range(2)]
    return _interleave(p)[:, 1:h + 1, 1:w + 1]


def _output_tiles(m, n, th, tw):
    """A^T m A per tile: [16, tiles, O] -> [N, 2 th, 2 tw, O]."""
    m = m.reshape(4, 4, n, th, tw, m.shape[-1])
    rows = _at([m[i] for i in range(4)])
    return _interleave([_at([r[j] for j in range(4)]) for r in rows])


def _output_tiles_transposed(dy):
    """The transpose of `_output_tiles`: [N, H, W, O] -> [16, tiles, O]."""
    p = _phases(dy)
    rows = [_a([p[i][j] for i in range(2)]) for j in range(2)]  # rows[j][a] = sum_i A[a, i] p[i][j]
    return jnp.stack([v for a in range(4) for v in _a([rows[j][a] for j in range(2)])]).reshape(16, -1, dy.shape[-1])
