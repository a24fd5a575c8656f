"""SimCLR augmentations as pure JAX functions, run on device inside the jitted train step.

Each view follows Chen et al. 2020 (appendix A) and lightly's `SimCLRTransform`, in this order:
random resized crop -> horizontal flip -> colour jitter -> grayscale -> Gaussian blur -> normalise.
`sample_view` draws one view's parameters from one key; `apply_view` is a deterministic function of
the image and those parameters. No Python control flow touches traced values, so `augment_one`
vmaps, and `augment_views` is exactly its vmap over a [2, B] grid of keys.

Where this differs from torchvision, for jit-friendliness and speed (details at each op):
crop boxes are continuous (sub-pixel); hue is a rotation around the gray axis in YIQ space, not an
HSV shift; the blur is separable matmuls with reflect padding folded into the matrix.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import AugmentConfig
from ..errors import InputError

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)
# NTSC RGB -> YIQ. Y is luma; hue is the angle in the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
_HIGHEST = jax.lax.Precision.HIGHEST  # keep fp32 blur maths off TF32/bf16 matmul passes on GPU/TPU


class ViewParams(NamedTuple):
    """One view's random draws (float32 / bool scalars unless noted)."""

    box: jax.Array  # [4] crop (top, left, height, width) in input pixels
    flip: jax.Array
    jitter: jax.Array  # [4] brightness, contrast, saturation factors; hue shift in turns
    order: jax.Array  # [4] int32, a permutation of the four jitter ops
    gray: jax.Array
    blur_sigma: jax.Array  # output pixels; 0 means no blur


def normalize(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """uint8 [..., 3] in 0..255 -> float32 [..., 3], `(x / 255 - cfg.mean) / cfg.std`.

    The deterministic input transform for embedding, and the last step of every augmented view.
    """
    return _standardize(jnp.asarray(images).astype(jnp.float32) / 255.0, cfg)


def augment_views(images: jax.Array, *, key: jax.Array, cfg: AugmentConfig, size: int) -> tuple[jax.Array, jax.Array]:
    """Two independently augmented views of a batch: uint8 [B, R, R, 3] -> 2 x float32 [B, size, size, 3].

    `key` is split into a [2, B] grid, `keys = jax.random.split(key, (2, B))`, and
    `augment_views(...)[v][i] == augment_one(images[i], key=keys[v, i], ...)`.
    R is the cache's working resolution. R >= size keeps small crops sharp (at R = 2 * size a crop
    of area below 25% is upsampled, as SimCLR's 224 px crops of ~450 px ImageNet photos are);
    R == size works too. `cfg` and `size` are static under jit.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
        raise InputError(f"augment_views expects uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    keys = jax.random.split(key, (2, images.shape[0]))  # [2, B]
    one = functools.partial(augment_one, cfg=cfg, size=size)
    per_sample = jax.vmap(lambda image, k: one(image, key=k))
    # Both views in one batched computation: XLA sees 2B samples, not two B-sized passes.
    views = jax.vmap(per_sample, in_axes=(None, 0))(images, keys)  # [2, B, size, size, 3]
    return views[0], views[1]


def augment_one(image: jax.Array, *, key: jax.Array, cfg: AugmentConfig, size: int) -> jax.Array:
    """One SimCLR view of one image: uint8 [H, W, 3] -> float32 [size, size, 3], normalised."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != jnp.uint8:
        raise InputError(f"augment_one expects a uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if size < 1:
        raise InputError(f"output size {size} must be positive")
    params = sample_view(key=key, cfg=cfg, height=image.shape[0], width=image.shape[1])
    return apply_view(image, params, cfg=cfg, size=size)


def sample_view(*, key: jax.Array, cfg: AugmentConfig, height: int, width: int) -> ViewParams:
    """Draw one view's parameters from `key` (one uniform draw: XLA compiles a single threefry).

    Crop: torchvision's `RandomResizedCrop.get_params`, vectorised. Draw 10 candidates (area
    fraction uniform in `crop_scale`, aspect ratio log-uniform in `crop_ratio`), keep the first that
    fits in the image, else the centred fallback (whole image, aspect clamped into the ratio range).
    The box is not rounded to whole pixels: position is uniform in [0, H - h] x [0, W - w].
    Jitter (with probability `jitter_p`, else identity factors): brightness, contrast, saturation
    uniform in [1 - x, 1 + x]; hue uniform in [-hue, hue] turns; a uniformly random op order.
    Blur (with probability `blur_p`): sigma uniform in `blur_sigma`.
    """
    t = _CROP_TRIES
    u = jax.random.uniform(key, (2 * t + 2 + 1 + 1 + 4 + 4 + 1 + 2,))
    u_scale, u_ratio, u_pos = u[:t], u[t : 2 * t], u[2 * t : 2 * t + 2]
    u_flip, u_jit, u_factors, u_order, u_gray, u_blur = jnp.split(u[2 * t + 2 :], [1, 2, 6, 10, 11])

    def between(lo, hi, v):
        return lo + (hi - lo) * v

    area = height * width * between(*cfg.crop_scale, u_scale)
    ratio = jnp.exp(between(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), u_ratio))
    ws, hs = jnp.sqrt(area * ratio), jnp.sqrt(area / ratio)
    fits = (ws <= width) & (hs <= height)
    first = jnp.argmax(fits)  # the first candidate that fits (0 when none does)
    fh, fw = _fallback_crop(height, width, cfg.crop_ratio)
    found = fits.any()
    h, w = jnp.where(found, hs[first], fh), jnp.where(found, ws[first], fw)
    top, left = jnp.where(found, u_pos, 0.5) * jnp.stack([height - h, width - w])  # fallback: centred

    apply = u_jit[0] < cfg.jitter_p
    amounts = jnp.array([cfg.brightness, cfg.contrast, cfg.saturation, 0.0])
    factors = between(1 - amounts, 1 + amounts, u_factors)
    hue = between(-cfg.hue, cfg.hue, u_factors[3])
    jitter = jnp.where(apply, factors.at[3].set(hue), jnp.array([1.0, 1.0, 1.0, 0.0]))

    sigma = between(*cfg.blur_sigma, u_blur[1])
    return ViewParams(
        box=jnp.stack([top, left, h, w]),
        flip=u_flip[0] < cfg.flip_p,
        jitter=jitter,
        order=jnp.argsort(u_order).astype(jnp.int32),  # ranks of iid uniforms: a uniform permutation
        gray=u_gray[0] < cfg.gray_p,
        blur_sigma=jnp.where(u_blur[0] < cfg.blur_p, sigma, 0.0),
    )


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    # torchvision's fallback after 10 misses: the whole image, cropped to the nearest allowed aspect.
    if width / height < ratio[0]:
        return width / ratio[0], width
    if width / height > ratio[1]:
        return height, height * ratio[1]
    return height, width


def apply_view(image: jax.Array, params: ViewParams, *, cfg: AugmentConfig, size: int) -> jax.Array:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: crop, flip, jitter, gray, blur, normalise.

    After the crop the view is planar, [3, size, size]: per-pixel colour maths on contiguous
    channel planes runs faster on XLA:CPU than on an interleaved minor axis of 3 (see
    BENCHMARKS.md, "Figures moved from the code").
    """
    return _standardize(_view_pixels(image, params, size=size), cfg)


# Jitted on its own: it does not depend on the config, so eager callers (tests, notebooks) compile
# it once per shape for every config instead of dispatching its ~350 primitives one by one. Inside
# the train step's jit it is inlined like any other call.
@functools.partial(jax.jit, static_argnames="size")
def _view_pixels(image: jax.Array, params: ViewParams, *, size: int) -> jax.Array:
    x = resized_crop(image, params.box, size=size) / 255.0  # [size, size, 3] in [0, 1]
    x = jnp.moveaxis(x, -1, 0)  # [3, size, size]
    x = jnp.where(params.flip, x[:, :, ::-1], x)
    x = _color_jitter(x, params.jitter, params.order)
    x = jnp.where(params.gray, jnp.broadcast_to(_luma(x), x.shape), x)
    return _blur(x, params.blur_sigma)  # back to [size, size, 3]


# ---- 1. crop ---------------------------------------------------------------------------------
def resized_crop(image: jax.Array, box: jax.Array, *, size: int) -> jax.Array:
    """[H, W, C] (any dtype) -> float32 [size, size, C]: the sub-pixel box (top, left, h, w)
    resampled with an antialiased bilinear (triangle) filter, value range unchanged.

    `jax.image.scale_and_translate` with traced scale/translation builds one [in, out] weight
    matrix per axis (the triangle widened by 1/scale when shrinking, normalised to sum 1), so the
    crop is two matmuls and a constant image stays that constant.
    """
    top, left, h, w = box
    # output coordinate = input coordinate * scale + translation: maps [top, top + h] onto [0, size]
    scale = jnp.stack([size / h, size / w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, image.shape[2]), (0, 1), scale, translation,
        method="linear", antialias=True,
    )


# ---- 3. colour jitter ------------------------------------------------------------------------
def _color_jitter(x: jax.Array, jitter: jax.Array, order: jax.Array) -> jax.Array:
    """torchvision `ColorJitter` on planar float [3, H, W] in [0, 1], ops in `order`, clip after each.

    `jitter` = (brightness b, contrast c, saturation s, hue h in turns). Each op is a 3x3 colour
    matrix M plus, for contrast, a pull towards the image's mean luma, so a random order costs four
    small per-pixel products instead of four traced branches:
      brightness: b x                          contrast:   c x + (1 - c) mean(luma(x))
      saturation: s x + (1 - s) luma(x)        hue:        rotate (I, Q) by -2 pi h in YIQ space
    The hue rotation (as NVIDIA DALI's hue op) keeps luma and approximates torchvision's HSV shift
    in the same direction (h > 0 turns red towards yellow); colours pushed out of gamut are clipped.
    (1, 1, 1, 0) is exactly the identity.
    """
    b, c, s, h = jitter
    eye = jnp.eye(3)
    matrices = jnp.stack([b * eye, c * eye, s * eye + (1 - s) * jnp.array([LUMA] * 3), hue_matrix(h)])  # [4, 3, 3]
    pull = jnp.stack([0.0, 1.0 - c, 0.0, 0.0])  # only contrast pulls towards the mean luma
    matrices, pull = matrices[order][:, :, :, None, None], pull[order]  # [4, 3, 3, 1, 1], [4]: slot order
    for m, p in zip(matrices, pull):
        # M x per pixel, written out: fused multiply-adds beat a K=3 batched matmul on XLA:CPU.
        y = m[:, 0] * x[0] + m[:, 1] * x[1] + m[:, 2] * x[2]
        x = jnp.clip(y + p * jnp.mean(_luma(x)), 0.0, 1.0)
    return x


def _yiq_hue_basis() -> tuple[np.ndarray, np.ndarray]:
    to_rgb = np.linalg.inv(_RGB_TO_YIQ)
    chroma = to_rgb @ np.diag([0.0, 1.0, 1.0]) @ _RGB_TO_YIQ  # projection onto the (I, Q) plane
    quarter = to_rgb @ np.array([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]]) @ _RGB_TO_YIQ  # +90 degrees in (I, Q)
    return chroma.astype(np.float32), quarter.astype(np.float32)


_HUE_CHROMA, _HUE_QUARTER = _yiq_hue_basis()


def hue_matrix(h: jax.Array) -> jax.Array:
    """RGB 3x3 matrix shifting hue by `h` turns: T^-1 R(-2 pi h) T with T = RGB -> YIQ, written as
    I + (cos - 1) chroma + sin quarter so that h = 0 is exactly the identity."""
    theta = -2 * jnp.pi * h  # in (I, Q), red -> yellow -> green runs clockwise
    return jnp.eye(3) + (jnp.cos(theta) - 1) * _HUE_CHROMA + jnp.sin(theta) * _HUE_QUARTER


# ---- 4. grayscale ----------------------------------------------------------------------------
def _luma(x: jax.Array) -> jax.Array:
    """Planar [3, ...] -> [...]: ITU-R 601-2 luma (torchvision's rgb_to_grayscale)."""
    return x[0] * LUMA[0] + x[1] * LUMA[1] + x[2] * LUMA[2]


# ---- 5. Gaussian blur ------------------------------------------------------------------------
def blur_radius(size: int) -> int:
    """Half the kernel width: SimCLR's kernel is 10% of the side, made odd, at least 3 taps."""
    k = max(3, int(0.1 * size))
    return (k | 1) // 2  # k | 1: the odd number k or k + 1


@functools.lru_cache(maxsize=16)
def _reflect_taps(n: int, radius: int) -> np.ndarray:
    """[2r + 1, n, n] one-hot: [d, i, j] = 1 where tap d of output i reads input j under reflect
    padding (torchvision's `gaussian_blur`: ... 2 1 | 0 1 2 ... n-1 | n-2 ...)."""
    source = np.pad(np.arange(n), radius, mode="reflect")  # [n + 2r]
    window = np.lib.stride_tricks.sliding_window_view(source, 2 * radius + 1)  # [n, 2r + 1]
    return (window.T[:, :, None] == np.arange(n)).astype(np.float32)


def blur_matrix(sigma: jax.Array, n: int) -> jax.Array:
    """[n, n] banded B with `B @ column` = the column blurred; sigma <= 0 gives the identity.

    Taps exp(-d^2 / 2 sigma^2) for |d| <= blur_radius(n), normalised to sum 1; reflect padding is
    folded in (a tap falling off the edge adds to its mirror pixel), so every row sums to 1.
    """
    radius = blur_radius(n)
    d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    taps = jnp.exp(-0.5 * (d / jnp.maximum(sigma, 1e-6)) ** 2)
    blur = jnp.tensordot(taps / taps.sum(), _reflect_taps(n, radius), axes=1)
    return jnp.where(sigma > 0, blur, jnp.eye(n))


def _blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur, planar float [C, n, n] -> interleaved [n, n, C]; sigma <= 0: unchanged.

    `B x B^T` per channel: two [n, n] matmuls, several times faster on XLA:CPU than a depthwise
    conv (see BENCHMARKS.md, "Figures moved from the code"); the einsum also puts channels back
    last for free.
    """
    blur = blur_matrix(sigma, x.shape[1])
    return jnp.einsum("ij,cjk,lk->ilc", blur, x, blur, precision=_HIGHEST)


# ---- 6. normalise ----------------------------------------------------------------------------
def _standardize(x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)
