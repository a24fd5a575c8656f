"""nn/models.py and nn/conv.py: output shapes, grid pooling, seeded init, and every named
convolution against lax.conv_general_dilated (value and gradients)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.nn import conv as nnconv
from contrastive_cli.nn.models import SimCLRModel, build_model, feature_dim, grid_pool
from contrastive_cli.perf import fastconv, winograd

B = 2


def _x(side=32, n=B, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, side, side, 3)), jnp.float32)


def _abstract(cfg):
    """The model with abstract parameters (nnx.eval_shape): no eager initialiser compiles per shape."""
    return nnx.eval_shape(lambda: SimCLRModel(cfg, rngs=nnx.Rngs(0)))


# ---- shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder, features", [("small", 256), ("resnet18", 512)])
@pytest.mark.parametrize("train", [True, False])
def test_model_outputs_h_and_z(encoder, features, train):
    cfg = ModelConfig(encoder=encoder, image_size=32, proj_dim=64)
    model = _abstract(cfg)
    graphdef, state = nnx.split(model)
    h, z = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=train), state, _x())
    assert (h.shape, h.dtype) == ((B, features), jnp.float32)
    assert (z.shape, z.dtype) == ((B, 64), jnp.float32)
    assert model.encoder.features == features and feature_dim(cfg) == 16 * features  # the default 4 x 4 grid at 32 px
    assert feature_dim(dataclasses.replace(cfg, embed_grid=1)) == features
    # The head's hidden layer: the encoder's width by default, proj_hidden when given.
    assert model.head.fc1.kernel.shape == (features, features)
    wider = _abstract(ModelConfig(encoder=encoder, proj_hidden=32, proj_dim=8))
    assert wider.head.fc1.kernel.shape == (features, 32) and wider.head.fc2.kernel.shape == (32, 8)


def test_small_model_runs_for_real_and_h_is_the_grid_1_embedding():
    cfg = TrainConfig.tiny()
    model = build_model(cfg)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        h, z = m(x, train=False)
        return h, z, m.embed(x), m.embed(x, 2)

    h, z, e1, e2 = run(state, _x())
    assert h.shape == (B, 256) and z.shape == (B, cfg.model.proj_dim) and e2.shape == (B, 4 * 256)
    assert np.isfinite(np.asarray(z)).all() and np.abs(np.asarray(h)).max() > 0
    np.testing.assert_allclose(e1, h, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(e2).reshape(B, 4, 256).mean(1), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["small", "resnet18"])
@pytest.mark.parametrize("grid", [1, 2, 4])
def test_embed_has_feature_dim_columns(encoder, grid):
    cfg = ModelConfig(encoder=encoder, image_size=32, embed_grid=grid)
    model = _abstract(cfg)
    graphdef, state = nnx.split(model)
    e = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).embed(x, grid), state, _x())
    assert e.shape == (B, feature_dim(cfg)) and e.dtype == jnp.float32
    assert feature_dim(cfg) == model.encoder.features * grid * grid


# ---- grid pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(4, 4), (2, 6), (8, 4)])
def test_grid_1_is_the_mean_of_the_2x2_cells_when_the_map_divides_evenly(h, w):
    fmap = jnp.asarray(np.random.default_rng(h * w).standard_normal((3, h, w, 5)), jnp.float32)
    cells = np.asarray(grid_pool(fmap, 2)).reshape(3, 4, 5)
    np.testing.assert_allclose(cells.mean(1), grid_pool(fmap, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grid_pool(fmap, 1), np.asarray(fmap).mean((1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cells[:, 0], np.asarray(fmap)[:, : h // 2, : w // 2].mean((1, 2)), rtol=1e-5)


def test_grid_cells_overlap_when_the_map_does_not_divide():
    # 5 x 5 into 2 x 2: rows 0-2 and 2-4 share row 2, so the cells' mean is not the global mean.
    fmap = jnp.asarray(np.random.default_rng(5).standard_normal((3, 5, 5, 4)), jnp.float32)
    cells = np.asarray(grid_pool(fmap, 2)).reshape(3, 4, 4)
    np.testing.assert_allclose(cells[:, 3], np.asarray(fmap)[:, 2:, 2:].mean((1, 2)), rtol=1e-5)
    assert not np.allclose(cells.mean(1), grid_pool(fmap, 1), atol=1e-4)


def test_grid_larger_than_the_map_is_refused():
    with pytest.raises(ValueError, match="3 x 3 grid needs a feature map of at least that size, not 2 x 2"):
        grid_pool(jnp.zeros((1, 2, 2, 1)), 3)


# ---- seeded init -------------------------------------------------------------------------------------
def _params(cfg):
    return jax.tree.leaves(nnx.state(build_model(cfg), nnx.Param))


def test_build_model_is_seeded_by_cfg_seed():
    a, again, other = (_params(TrainConfig.tiny(seed=s)) for s in (3, 3, 4))
    assert len(a) == len(again) == len(other) > 0
    for x, y in zip(a, again):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    kernels = [(np.asarray(x), np.asarray(y)) for x, y in zip(a, other) if x.ndim > 1]
    assert kernels and all(not np.array_equal(x, y) for x, y in kernels)  # every weight matrix is redrawn


def test_build_model_takes_the_configs_convolution_and_the_losses_scalars():
    cfg = TrainConfig.tiny(model=ModelConfig(conv="winograd"))
    first = build_model(cfg).encoder.layers[0].conv
    assert first.conv is fastconv.conv2d
    assert build_model(cfg, conv="im2col").encoder.layers[0].conv.conv is fastconv.conv2d_im2col
    assert build_model(TrainConfig.tiny()).encoder.layers[0].conv.conv is nnconv.xla_conv
    assert build_model(TrainConfig.tiny()).logit_scalars is None
    sigmoid = build_model(TrainConfig.tiny(loss="sigmoid"))
    assert sigmoid.logit_scalars is not None and sigmoid.logit_scalars.logit_scale[...].ndim == 0
    # The convolution changes nothing about the parameters: the same seed draws the same ones.
    for x, y in zip(_params(cfg), _params(TrainConfig.tiny())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- convolutions ------------------------------------------------------------------------------------
def _reference(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _operands(n, h, w, c, o, k, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), dtype)
    return x, kernel


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_xla_convolution_is_lax_conv_general_dilated():
    assert nnconv.convolution("xla") is nnconv.xla_conv
    for stride, padding, k in ((1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 0, 3)):
        x, kernel = _operands(2, 7, 6, 3, 5, k, seed=stride + k)
        y = nnconv.convolution("xla")(x, kernel, stride=stride, padding=padding)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(_reference(x, kernel, stride, padding)))
    # bfloat16: accumulated in float32, returned in bfloat16.
    x, kernel = _operands(2, 6, 6, 8, 4, 3, dtype=jnp.bfloat16)
    y = nnconv.xla_conv(x, kernel, stride=1, padding=1)
    assert y.dtype == jnp.bfloat16
    _close(y.astype(jnp.float32), _reference(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, 1), 1e-2)


def test_named_convolutions_are_the_speed_wings():
    assert nnconv.convolution("winograd") is fastconv.conv2d
    assert nnconv.convolution("im2col") is fastconv.conv2d_im2col
    assert nnconv.resolve("xla") == "xla" and nnconv.resolve("im2col", "gpu") == "im2col"
    assert nnconv.resolve("auto", "cpu") == "winograd" and nnconv.resolve("auto", "gpu") == "xla"


# (N, H, W, C, O, k, stride, padding): a Winograd layer (3x3/1, 128 channels, even side), the stem,
# a strided layer, a 1x1 shortcut, and resnet50's ImageNet stem (7x7/2) and bottleneck 1x1/1.
CONV_CASES = [
    (2, 4, 4, 128, 16, 3, 1, 1),
    (2, 8, 8, 3, 8, 3, 1, 1),
    (2, 7, 7, 8, 16, 3, 2, 1),
    (2, 8, 8, 16, 8, 1, 2, 0),
    (2, 11, 11, 3, 8, 7, 2, 3),
    (2, 5, 5, 16, 32, 1, 1, 0),
]


@pytest.fixture(params=["ynnpack", "eigen"])
def conv_plan(request, monkeypatch):
    """Both of fastconv's plans: with Eigen convolutions (the tests' XLA flags) it leaves the forward
    to XLA; with YNNPACK it computes every part itself."""
    monkeypatch.setattr(fastconv, "_ynnpack_convs", lambda: request.param == "ynnpack")
    return request.param


@pytest.mark.parametrize("name", ["winograd", "im2col"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}_{}x{}_c{}_o{}_k{}_s{}_p{}".format(*c))
def test_named_convolution_matches_xla_in_value_and_gradients(name, case, conv_plan):
    n, h, w, c, o, k, stride, padding = case
    x, kernel = _operands(n, h, w, c, o, k, seed=sum(case))
    out_shape = jax.eval_shape(lambda x, k: _reference(x, k, stride, padding), x, kernel).shape
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)
    fast = nnconv.convolution(name)

    def value_and_grads(conv, x, kernel):
        def loss(x, kernel):
            return jnp.sum(weights * conv(x, kernel, stride=stride, padding=padding))

        return conv(x, kernel, stride=stride, padding=padding), jax.grad(loss, argnums=(0, 1))(x, kernel)

    @jax.jit
    def both(x, kernel):
        return value_and_grads(fast, x, kernel), value_and_grads(nnconv.xla_conv, x, kernel)

    (y, (dx, dk)), (y_ref, (dx_ref, dk_ref)) = both(x, kernel)
    _close(y, y_ref, 1e-4)
    _close(dx, dx_ref, 1e-4)
    _close(dk, dk_ref, 1e-4)
    # The first case is the one Winograd takes over (for "winograd" only): the comparison covers it.
    uses_winograd = winograd.applies(x.shape, kernel.shape, stride, padding, x.dtype)
    assert uses_winograd == (case == CONV_CASES[0])


def test_winograd_is_what_runs_where_it_applies(monkeypatch):
    x, kernel = _operands(*CONV_CASES[0][:6])
    calls, conv3x3 = [], winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k: calls.append(x.shape) or conv3x3(x, k))
    nnconv.convolution("winograd")(x, kernel, stride=1, padding=1)
    nnconv.convolution("im2col")(x, kernel, stride=1, padding=1)
    nnconv.convolution("xla")(x, kernel, stride=1, padding=1)
    assert calls == [x.shape]


def test_auto_resolves_to_the_backends_convolution():
    from contrastive_cli.nn import conv
    from contrastive_cli.perf import fastconv

    assert conv.resolve("auto", "cpu") == "winograd" and conv.resolve("auto", "gpu") == "xla"
    assert conv.resolve("im2col", "gpu") == "im2col"  # a named one is kept
    assert conv.convolution("auto") is fastconv.conv2d  # tests run on CPU


def test_auto_precision_is_bf16_on_accelerators_and_float32_on_cpu():
    from contrastive_cli.nn.models import compute_dtype, resolve_precision

    assert [resolve_precision("auto", b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bf16", "bf16"]
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("float32", "gpu") == "float32"
    assert TrainConfig().precision == "auto" and compute_dtype(TrainConfig()) == jnp.float32  # this machine: CPU
    assert compute_dtype(TrainConfig(precision="bf16")) == jnp.bfloat16
