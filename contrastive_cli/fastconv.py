"""2-D convolution whose weight gradient is fast on XLA:CPU.

XLA:CPU computes a convolution's weight gradient (the "backward filter" conv) at 2-16 GFLOP/s on a
2-vCPU machine, against 25-40 for oneDNN in PyTorch, while its forward and input-gradient convs run
at 20-50. `conv2d` keeps XLA's forward and input gradient and replaces the weight gradient with
im2col + one matmul per chunk of images (`benchmarks/conv_speed.py` measures each part).

Models call `conv2d` only when `enabled()`: GPU and TPU keep XLA's native convolution, and
`CONTRASTIVE_FAST_CONV=0` switches it off on CPU (for A/B timing).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")
# Patches of one chunk of images (im2col rows) stay in cache between being written and being read
# by the matmul; one ~8 MiB chunk at a time measured 1.5-3x faster than one whole-batch matrix.
_CHUNK_BYTES = 8 * 2**20


def enabled() -> bool:
    """True when models should call `conv2d`: the CPU backend, unless CONTRASTIVE_FAST_CONV=0."""
    return os.environ.get("CONTRASTIVE_FAST_CONV", "1") != "0" and jax.default_backend() == "cpu"


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 1) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel`, as `lax.conv_general_dilated` computes it.

    Args:
      x: [N, H, W, C] float32 or bfloat16.
      kernel: [kh, kw, C, O], same dtype as `x`.
      stride: the same stride along H and W.
      padding: zero pixels added on every side of H and W.

    Returns:
      [N, Ho, Wo, O] in `x.dtype`, Ho = (H + 2 * padding - kh) // stride + 1 (likewise Wo). Equal to
      `lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))`, and so are its gradients (to float rounding);
      the weight gradient accumulates in float32 whatever the input dtype.
    """
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride {stride!r} must be an int >= 1")
    if not (isinstance(padding, int) and padding >= 0):
        raise ValueError(f"padding {padding!r} must be an int >= 0")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
        raise ValueError(f"x {x.shape} (NHWC) and kernel {kernel.shape} (HWIO) do not match")
    return _conv(x, kernel, stride, padding)


def _native(x, kernel, stride, padding):
    if kernel.shape[:2] == (1, 1) and padding == 0:
        # A 1x1 conv is a matmul over channels (XLA's 1x1 conv measured ~2x slower on CPU).
        return jnp.dot(x[:, ::stride, ::stride, :], kernel[0, 0])
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, stride, padding):
    return _native(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
    return _native(x, kernel, stride, padding), (x, kernel)


def _conv_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    # XLA's own transposed conv; it is DCE'd under jit when x needs no gradient (the first layer).
    _, input_vjp = jax.vjp(lambda x: _native(x, kernel, stride, padding), x)
    (dx,) = input_vjp(dy)
    return dx, weight_grad(x, dy, kernel.shape, stride=stride, padding=padding).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_shape, *, stride: int, padding: int) -> jax.Array:
    """Gradient of `conv2d` wrt its kernel: [kh, kw, C, O] float32, by im2col and matmul.

    dW[ky, kx, c, o] = sum over n, i, j of xpad[n, stride*i + ky, stride*j + kx, c] * dy[n, i, j, o]:
    the kh*kw shifted strided slices of the padded input, concatenated on channels, are one
    [n*Ho*Wo, kh*kw*C] matrix per chunk of n images, contracted with dy as [n*Ho*Wo, O].
    """
    kh, kw, c, o = kernel_shape
    n_img, ho, wo, _ = dy.shape
    if (kh, kw, stride, padding) == (1, 1, 1, 0):  # patches are x itself: no copy to make
        return _patch_dot(x.reshape(-1, c), dy.reshape(-1, o)).reshape(kernel_shape)
    per_image = ho * wo * kh * kw * c * x.dtype.itemsize
    chunk = max(1, min(n_img, _CHUNK_BYTES // per_image))
    n_chunks, rest = divmod(n_img, chunk)
    patches = functools.partial(_patches, kh=kh, kw=kw, ho=ho, wo=wo, stride=stride, padding=padding)

    def add_chunk(acc, xy):
        xc, dyc = xy
        return acc + _patch_dot(patches(xc), dyc.reshape(-1, o)), None

    if n_chunks == 1:
        dw = _patch_dot(patches(x[:chunk]), dy[:chunk].reshape(-1, o))
    else:
        main = n_chunks * chunk
        xs = x[:main].reshape(n_chunks, chunk, *x.shape[1:])  # [G, n, H, W, C]
        dys = dy[:main].reshape(n_chunks, chunk, ho, wo, o)  # [G, n, Ho, Wo, O]
        dw, _ = lax.scan(add_chunk, jnp.zeros((kh * kw * c, o), jnp.float32), (xs, dys))
    if rest:
        dw = dw + _patch_dot(patches(x[-rest:]), dy[-rest:].reshape(-1, o))
    return dw.reshape(kernel_shape)


def _patches(x, *, kh, kw, ho, wo, stride, padding):
    """im2col: [n, H, W, C] -> [n*Ho*Wo, kh*kw*C], columns ordered (ky, kx, c) like HWIO rows."""
    n, _, _, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = [
        lax.slice(xp, (0, ky, kx, 0), (n, ky + stride * (ho - 1) + 1, kx + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
        for ky in range(kh)
        for kx in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1).reshape(n * ho * wo, kh * kw * c)  # [n*Ho*Wo, kh*kw*C]


def _patch_dot(patches, dy):
    """patches^T @ dy: [M, K] x [M, O] -> [K, O], accumulated in float32."""
    return lax.dot_general(patches, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
