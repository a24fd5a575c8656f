"""Augmentations: jit == eager, vmap == per-sample loop, keys decide everything, each op's contract.

Compile time dominates here, so: the default config is jitted twice (augment_views, augment_one),
and every other config runs `augment_one` eagerly, one image at a time. Eager mode compiles each
primitive once per shape and reuses it for every config, where jit would compile the whole
pipeline again per config (augment_one's pixel pipeline is jitted on its own, once per shape).
The un-jitted reference for "jit == eager" runs under jax.disable_jit(), op by op (~5 s of
one-off primitive compiles).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_cli.nn.augment import (
    LUMA,
    ViewParams,
    apply_view,
    augment_one,
    augment_views,
    blur_matrix,
    hue_matrix,
    normalize,
    sample_view,
)
from contrastive_cli.config import AugmentConfig
from contrastive_cli.errors import InputError

B, R, SIZE = 4, 32, 16
CFG = AugmentConfig()
# Everything off and the crop forced to the whole image: a view is just normalize(image).
PLAIN = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0, blur_p=0)
KEY = jax.random.fold_in(jax.random.key(0), 0)
KEYS = jax.random.split(KEY, (2, B))  # augment_views' documented split: view v of sample i

views_jit = jax.jit(augment_views, static_argnames=("cfg", "size"))
one_jit = jax.jit(augment_one, static_argnames=("cfg", "size"))


def _images(n=B, side=R, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))


def _views(images, cfg, size=SIZE):
    """Eager augment_views, as a loop of augment_one over the documented [2, B] key grid."""
    return [jnp.stack([augment_one(im, key=KEYS[v, i], cfg=cfg, size=size) for i, im in enumerate(images)])
            for v in range(2)]


def _unnormalize(x, cfg=CFG):
    return np.asarray(x) * np.array(cfg.std) + np.array(cfg.mean)


def _identity_params(side, **changes):
    base = dict(
        box=jnp.array([0.0, 0.0, side, side]),
        flip=jnp.array(False),
        jitter=jnp.array([1.0, 1.0, 1.0, 0.0]),
        order=jnp.arange(4, dtype=jnp.int32),
        gray=jnp.array(False),
        blur_sigma=jnp.array(0.0),
    )
    # the same dtypes (not weak types) as sample_view's, so apply_view's jit cache is shared
    base.update({k: jnp.asarray(v, base[k].dtype) for k, v in changes.items()})
    return ViewParams(**base)


@pytest.fixture(scope="module")
def default_views():
    return views_jit(_images(), key=KEY, cfg=CFG, size=SIZE)


# ---- determinism and batching -----------------------------------------------------------------
def test_jit_matches_eager():
    # augment_one jits its pixel pipeline internally (_view_pixels), so calling it plainly would
    # compare a compiled program with a compiled program. Under jax.disable_jit() every primitive,
    # the pixel pipeline's included, runs one by one: XLA's fusions and reassociations are what is tested.
    image = _images()[1]
    for v, i in ((0, 1), (1, 3)):
        jitted = one_jit(image, key=KEYS[v, i], cfg=CFG, size=SIZE)
        with jax.disable_jit():
            eager = augment_one(image, key=KEYS[v, i], cfg=CFG, size=SIZE)
        np.testing.assert_allclose(jitted, eager, atol=1e-4)  # measured: up to 3e-5 apart, reassociation
        assert not np.allclose(jitted, normalize(image[:SIZE, :SIZE], CFG), atol=1e-2)  # a real augmentation


def test_vmap_matches_per_sample_loop(default_views):
    images = _images()
    for v in range(2):
        looped = jnp.stack([one_jit(images[i], key=KEYS[v, i], cfg=CFG, size=SIZE) for i in range(B)])
        np.testing.assert_allclose(default_views[v], looped, atol=1e-5)


def test_same_key_same_views_other_step_other_views(default_views):
    again = views_jit(_images(), key=KEY, cfg=CFG, size=SIZE)
    for a, b in zip(default_views, again):
        np.testing.assert_array_equal(a, b)
    next_step = views_jit(_images(), key=jax.random.fold_in(jax.random.key(0), 1), cfg=CFG, size=SIZE)
    assert not np.allclose(default_views[0], next_step[0])


def test_two_views_of_each_sample_differ(default_views):
    first, second = default_views
    for i in range(B):
        assert not np.allclose(first[i], second[i]), f"sample {i} got two identical views"


def test_shapes_dtype_finite_and_range(default_views):
    for view in default_views:
        assert view.shape == (B, SIZE, SIZE, 3) and view.dtype == jnp.float32
        assert np.isfinite(view).all()
        # crop and blur are convex combinations and jitter clips: pixels stay in [0, 1].
        pixels = _unnormalize(view)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_r_equal_to_size_works():
    view = augment_one(_images(side=SIZE)[0], key=KEY, cfg=CFG, size=SIZE)
    assert view.shape == (SIZE, SIZE, 3) and np.isfinite(view).all()


def test_rejects_float_or_wrong_shape():
    with pytest.raises(InputError, match="uint8"):
        augment_views(_images().astype(jnp.float32), key=KEY, cfg=CFG, size=SIZE)
    with pytest.raises(InputError, match=r"\(32, 32, 3\)"):
        augment_views(_images()[0], key=KEY, cfg=CFG, size=SIZE)


# ---- what each op does ----------------------------------------------------------------------
def test_everything_off_is_normalize():
    images = _images(side=SIZE)
    a, b = _views(images, PLAIN)
    np.testing.assert_allclose(a, normalize(images, PLAIN), atol=1e-6)
    np.testing.assert_allclose(b, normalize(images, PLAIN), atol=1e-6)


def test_normalize_values():
    pixel = jnp.array([[0, 255, 128]], jnp.uint8)
    expected = (np.array([0, 1, 128 / 255]) - np.array(CFG.mean)) / np.array(CFG.std)
    np.testing.assert_allclose(normalize(pixel, CFG)[0], expected, rtol=1e-6)


def test_flip_mirrors_width():
    images = _images(side=SIZE)
    cfg = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=1, jitter_p=0, gray_p=0, blur_p=0)
    a, _ = _views(images, cfg)
    np.testing.assert_allclose(a, normalize(images[:, :, ::-1], cfg), atol=1e-6)


def test_gray_gives_equal_channels():
    pixels = _unnormalize(jnp.concatenate(_views(_images(), AugmentConfig(gray_p=1))))
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_strongest_jitter_stays_in_range():
    cfg = AugmentConfig(jitter_p=1, brightness=1, contrast=1, saturation=1, hue=0.5)
    a, b = _views(_images(), cfg)
    pixels = _unnormalize(jnp.concatenate([a, b]))
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_hue_matrix_keeps_luma_and_turns_red_to_yellow():
    for h in (-0.3, 0.1, 0.5):
        np.testing.assert_allclose(np.array(LUMA) @ np.asarray(hue_matrix(h)), LUMA, atol=1e-6)
    np.testing.assert_array_equal(hue_matrix(0.0), np.eye(3))
    red = np.asarray(hue_matrix(0.05)) @ np.array([1.0, 0.0, 0.0])
    assert red[1] > 0.05 and red[2] < red[1], red  # green rises first: towards yellow


def test_crop_of_constant_image_is_constant():
    image = jnp.full((R, R, 3), 77, jnp.uint8)
    boxes = [sample_view(key=k, cfg=CFG, height=R, width=R).box for k in jax.random.split(KEY, 6)]
    boxes += [jnp.array(b) for b in ([0.0, 0.0, R, R], [3.3, 20.1, 2.5, 4.0], [0.5, 0.25, 31.0, 17.7])]
    for box in boxes:  # through apply_view: its jitted pixel pipeline is already compiled for this shape
        view = apply_view(image, _identity_params(R, box=box), cfg=CFG, size=SIZE)
        np.testing.assert_allclose(view, normalize(image[:SIZE, :SIZE], CFG), atol=1e-5, err_msg=str(box))


def test_blur_matrix_rows_sum_to_one_and_blur_of_constant_is_constant():
    for n, sigma in ((16, 0.1), (16, 2.0), (32, 1.3)):
        np.testing.assert_allclose(blur_matrix(jnp.float32(sigma), n).sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(blur_matrix(jnp.float32(0.1), 16), np.eye(16), atol=1e-6)  # tiny sigma
    np.testing.assert_array_equal(blur_matrix(jnp.float32(0.0), 16), np.eye(16))  # "no blur"
    image = jnp.full((SIZE, SIZE, 3), 200, jnp.uint8)
    view = apply_view(image, _identity_params(SIZE, blur_sigma=2.0), cfg=CFG, size=SIZE)
    np.testing.assert_allclose(view, normalize(image, CFG), atol=1e-5)


def test_blur_spreads_an_impulse():
    image = jnp.zeros((SIZE, SIZE, 3), jnp.uint8).at[8, 8].set(255)
    view = _unnormalize(apply_view(image, _identity_params(SIZE, blur_sigma=2.0), cfg=CFG, size=SIZE))
    assert view[8, 8, 0] < 0.2 and view[8, 9, 0] > 0 and view[7, 8, 0] > 0
    np.testing.assert_allclose(view[..., 0].sum(), 1.0, atol=1e-4)  # mass kept away from edges


# ---- the random draws ---------------------------------------------------------------------------
def test_sampled_parameters_follow_the_config():
    keys = jax.random.split(KEY, 4000)
    p = jax.jit(jax.vmap(lambda k: sample_view(key=k, cfg=CFG, height=48, width=R)))(keys)
    top, left, h, w = np.asarray(p.box).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48 + 1e-4).all() and (left + w <= R + 1e-4).all()
    area = h * w / (48 * R)
    assert area.min() >= CFG.crop_scale[0] - 1e-5 and area.max() <= 1 + 1e-5
    ratio = w / h
    assert ratio.min() >= CFG.crop_ratio[0] - 1e-4 and ratio.max() <= CFG.crop_ratio[1] + 1e-4
    rates = {
        "flip": (np.mean(p.flip), CFG.flip_p),
        "jitter": (np.mean(np.asarray(p.jitter)[:, 3] != 0), CFG.jitter_p),
        "gray": (np.mean(p.gray), CFG.gray_p),
        "blur": (np.mean(np.asarray(p.blur_sigma) > 0), CFG.blur_p),
    }
    for name, (rate, expected) in rates.items():
        assert abs(rate - expected) < 0.03, f"{name} rate {rate:.3f}, expected {expected}"
    jittered = np.asarray(p.jitter)[np.asarray(p.jitter)[:, 3] != 0]
    for column, amount in zip(jittered[:, :3].T, (CFG.brightness, CFG.contrast, CFG.saturation)):
        assert column.min() >= 1 - amount and column.max() <= 1 + amount
    assert np.abs(jittered[:, 3]).max() <= CFG.hue
    np.testing.assert_array_equal(np.sort(np.asarray(p.order), axis=1), np.tile(np.arange(4), (4000, 1)))
    # independent draws: gray and flip should not be correlated
    assert abs(np.mean(p.flip & p.gray) - CFG.flip_p * CFG.gray_p) < 0.03
