"""2-D convolution with fast gradients on XLA:CPU.

jaxlib 0.10.2 hands CPU convolutions to YNNPACK, whose weight gradient (the "backward filter"
conv) runs far below the machine's matmul speed. `conv2d` computes the weight gradient as im2col +
matmul instead, and the forward (im2col) and the input gradient (col2im, or im2col of dy at stride
1) too, where they beat YNNPACK's. Every im2col works on a chunk of a few images, so its patches
stay in cache until the matmul reads them. With
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution XLA runs convolutions on
Eigen, which is fast for most parts; `_plan` then keeps only the parts that still win. The CLI sets
that flag for training (perf/xla.py). `benchmarks/conv_speed.py` measures each part against XLA's
own; the figures are in BENCHMARKS.md ("Figures moved from the code").

3x3 stride-1 convolutions of 128+ channels (ResNet-18's layers 2-4) go to `winograd.conv3x3`
instead (see `winograd.applies`): fewer multiplies than any direct convolution.

Models run these when their config names them (ModelConfig.conv "winograd": `conv2d`; "im2col":
`conv2d_im2col`); the CLI picks "winograd" on CPU and "xla" elsewhere (nn/conv.py).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from . import winograd

_DIMS = ("NHWC", "HWIO", "NHWC")
# Patch bytes of one chunk of images: a few MiB measured faster than a whole-batch matrix (see
# BENCHMARKS.md, "Figures moved from the code").
_CHUNK_BYTES = 4 * 2**20


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
      dimension_numbers=("NHWC", "HWIO", "NHWC"))`, and so are its gradients, to float rounding:
      the matmuls accumulate in float32 whatever the input dtype.
    """
    _check(x, kernel, stride, padding)
    if winograd.applies(x.shape, kernel.shape, stride, padding, x.dtype):
        return winograd.conv3x3(x, kernel)
    return _conv(x, kernel, stride, padding)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 1) -> jax.Array:
    """`conv2d` without Winograd: every layer by im2col/col2im and matmuls (or XLA, per `_plan`)."""
    _check(x, kernel, stride, padding)
    return _conv(x, kernel, stride, padding)


def _check(x, kernel, stride, padding) -> None:
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride {stride!r} must be an int >= 1")
    if not (isinstance(padding, int) and padding >= 0):
        raise ValueError(f"padding {padding!r} must be an int >= 0")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
        raise ValueError(f"x {x.shape} (NHWC) and kernel {kernel.shape} (HWIO) do not match")

def _native(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DIMS)


def _ynnpack_convs() -> bool:
    """Whether XLA hands convolutions to YNNPACK: jaxlib 0.10.2 does by default (its ynn fusion
    types default to individual_dot,individual_convolution), unless XLA_FLAGS drops
    individual_convolution from --xla_cpu_experimental_ynn_fusion_type; then Eigen runs them."""
    value = None
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, v = flag.lstrip("-").partition("=")
        if name == "xla_cpu_experimental_ynn_fusion_type":
            value = v
    if value is None:
        return True
    items = [t.strip().lower() for t in value.split(",") if t.strip()]
    if items and all(t[0] in "+-" for t in items):  # edits of the default list
        return "-individual_convolution" not in items
    return "individual_convolution" in items  # a list of its own


def _plan(kernel_shape, stride: int) -> tuple[bool, bool, bool]:
    """(forward, input gradient, weight gradient): which parts to compute here, not by XLA's conv.

    From benchmarks/conv_speed.py (figures: BENCHMARKS.md, "Figures moved from the code"). With
    YNNPACK every kxk part and every weight gradient is ours. With Eigen: its weight gradient wins
    for stride-1 kxk kernels of 32+ channels, ours elsewhere; col2im wins the strided input
    gradient; Eigen's forward wins. 1x1 kernels: XLA's forward and input gradient are a matmul.
    """
    kh, kw, c, _ = kernel_shape
    kxk = (kh, kw) != (1, 1)
    if _ynnpack_convs():
        return kxk, kxk, True
    return False, kxk and stride > 1, not (kxk and stride == 1 and c >= 32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, stride, padding):
    return _conv_fwd(x, kernel, stride, padding)[0]


def _conv_fwd(x, kernel, stride, padding):
    if _plan(kernel.shape, stride)[0]:
        y = forward(x, kernel, stride=stride, padding=padding)
    else:
        y = _native(x, kernel, stride, padding)
    return y, (x, kernel)


def _conv_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    _, own_dx, own_dw = _plan(kernel.shape, stride)
    if not (own_dx and own_dw):  # XLA's transposed convs; under jit the unused one is dropped
        dx, dw = jax.vjp(lambda x, k: _native(x, k, stride, padding), x, kernel)[1](dy)
    # Under jit, XLA also drops dx when x needs no gradient (the first layer's input is data).
    if own_dx and stride == 1 and kernel.shape[0] == kernel.shape[1] > padding:
        # Stride 1: dx is the conv of dy with the kernel turned 180 degrees, in and out swapped.
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # [kh, kw, O, C]
        dx = forward(dy, flipped, stride=1, padding=kernel.shape[0] - 1 - padding)
    elif own_dx:
        dx = input_grad(dy, kernel, x.shape, stride=stride, padding=padding)
    if own_dw:
        dw = weight_grad(x, dy, kernel.shape, stride=stride, padding=padding).astype(kernel.dtype)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def forward(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int) -> jax.Array:
    """`conv2d`'s value by im2col: per chunk of images, patches [n*Ho*Wo, kh*kw*C] @ kernel [kh*kw*C, O]."""
    kh, kw, c, o = kernel.shape
    n_img, h, w, _ = x.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    patches = functools.partial(_patches, kh=kh, kw=kw, ho=ho, wo=wo, stride=stride, padding=padding)
    w_mat = kernel.reshape(kh * kw * c, o)  # rows (ky, kx, c), as the patches' columns

    def chunk(xc):  # [n, H, W, C] -> [n, Ho, Wo, O]
        y = jnp.dot(patches(xc), w_mat, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(-1, ho, wo, o)

    return _map_chunks(chunk, _n_chunks(n_img, ho * wo * kh * kw * c * x.dtype.itemsize), x)


def input_grad(dy: jax.Array, kernel: jax.Array, x_shape, *, stride: int, padding: int) -> jax.Array:
    """Gradient of `conv2d` wrt x: per chunk, dpatches = dy @ kernel^T, then col2im.

    col2im adds each tap's [n, Ho, Wo, C] slice of dpatches back where im2col read it: spread by
    the stride (interior padding stride - 1) and shifted by (ky, kx) in the padded input.
    """
    kh, kw, c, o = kernel.shape
    n_img, h, w, _ = x_shape
    _, ho, wo, _ = dy.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    w_mat = kernel.reshape(kh * kw * c, o)
    zero = jnp.zeros((), jnp.float32)

    def chunk(dyc):  # [n, Ho, Wo, O] -> [n, H, W, C]
        dp = lax.dot_general(dyc.reshape(-1, o), w_mat, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dp = dp.reshape(-1, ho, wo, kh * kw, c)  # [n, Ho, Wo, taps, C]
        dxp = None
        for ky in range(kh):
            for kx in range(kw):
                spread = ((0, 0, 0), (ky, hp - ky - stride * (ho - 1) - 1, stride - 1),
                          (kx, wp - kx - stride * (wo - 1) - 1, stride - 1), (0, 0, 0))
                tap = lax.pad(dp[:, :, :, ky * kw + kx], zero, spread)  # [n, Hp, Wp, C]
                dxp = tap if dxp is None else dxp + tap
        return dxp[:, padding:padding + h, padding:padding + w].astype(dy.dtype)

    return _map_chunks(chunk, _n_chunks(n_img, ho * wo * kh * kw * c * 4), dy)


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
    patches = functools.partial(_patches, kh=kh, kw=kw, ho=ho, wo=wo, stride=stride, padding=padding)
    n_chunks = _n_chunks(n_img, ho * wo * kh * kw * c * x.dtype.itemsize)
    if n_chunks == 1:
        return _patch_dot(patches(x), dy.reshape(-1, o)).reshape(kernel_shape)
    xs, dys = _chunk_view(x, n_chunks), _chunk_view(dy, n_chunks)

    def add_chunk(acc, g):
        xc, dyc = _chunk(xs, g), _chunk(dys, g)
        return acc + _patch_dot(patches(xc), dyc.reshape(-1, o)), None

    dw, _ = lax.scan(add_chunk, jnp.zeros((kh * kw * c, o), jnp.float32), jnp.arange(n_chunks))
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


# ---- chunks of images --------------------------------------------------------------------------
# Chunk g of G holds images g, g + G, g + 2G, ...: split major-first, a batch sharded over d devices
# stays sharded when d divides the chunk size (else XLA gathers the batch: correct, but replicated).
def _n_chunks(n_img: int, patch_bytes_per_image: int) -> int:
    """G such that N/G images per chunk is the largest divisor of N within _CHUNK_BYTES (at least 1).

    A divisor, not a remainder chunk: uneven chunks measured slower (see BENCHMARKS.md, "Figures
    moved from the code").
    """
    target = max(1, min(n_img, _CHUNK_BYTES // patch_bytes_per_image))
    return n_img // next(d for d in range(target, 0, -1) if n_img % d == 0)


def _chunk_view(a, n_chunks):
    return a.reshape(-1, n_chunks, *a.shape[1:])  # [n, G, ...]: a bitcast, no copy


def _chunk(view, g):
    return lax.dynamic_index_in_dim(view, g, axis=1, keepdims=False)  # [n, ...]


def _map_chunks(f, n_chunks, a):
    """f over chunks of a's images, results back in image order (one chunk: f(a))."""
    if n_chunks == 1:
        return f(a)
    view = _chunk_view(a, n_chunks)
    shape = jax.eval_shape(f, _chunk(view, 0))

    def put(g, out):
        return lax.dynamic_update_index_in_dim(out, f(_chunk(view, g)), g, axis=1)

    out = lax.fori_loop(0, n_chunks, put, jnp.zeros((shape.shape[0], n_chunks, *shape.shape[1:]), shape.dtype))
    return out.reshape(-1, *shape.shape[1:])
