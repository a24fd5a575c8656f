"""fastconv.conv2d and conv2d_im2col equal lax.conv_general_dilated in value and in both gradients,
under jax.jit; conv2d hands Winograd's layers to winograd.conv3x3, conv2d_im2col never does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from contrastive_cli.perf import fastconv, winograd

# (N, H, W, C, O, k, stride, padding): stem, downsampling, 1x1 shortcuts, odd sizes, batch 1 and 5,
# 'valid' and wider-than-kernel padding.
SHAPES = [
    (5, 8, 8, 3, 8, 3, 1, 1),
    (1, 9, 7, 8, 16, 3, 1, 1),
    (5, 8, 8, 8, 16, 3, 2, 1),
    (1, 9, 11, 16, 8, 3, 2, 1),
    (5, 8, 8, 16, 16, 1, 1, 0),
    (5, 9, 7, 8, 16, 1, 2, 0),
    (1, 6, 6, 16, 3, 1, 2, 0),
    (5, 7, 9, 3, 8, 5, 2, 2),
    (5, 8, 8, 8, 8, 3, 1, 0),
    (1, 6, 6, 8, 8, 3, 1, 3),
]


def reference(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def operands(shape, dtype=jnp.float32):
    # NumPy data: eager jax.random would compile a sampler per shape and dominate the run time.
    n, h, w, c, o, k, stride, padding = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), dtype)
    return x, kernel, stride, padding


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def close(actual, expected, rtol):
    """Elementwise within rtol of the largest |expected| (sums of many terms: relative to scale)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture(params=["ynnpack", "eigen"])
def conv_backend(request, monkeypatch):
    """Both plans: which parts conv2d computes itself depends on XLA's conv library (XLA_FLAGS)."""
    monkeypatch.setattr(fastconv, "_ynnpack_convs", lambda: request.param == "ynnpack")
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_{}x{}_c{}_o{}_k{}_s{}_p{}".format(*s))
def test_value_and_gradients_match_lax(shape, conv_backend):
    x, kernel, stride, padding = operands(shape)
    weights = normal(jax.eval_shape(lambda x, k: reference(x, k, stride, padding), x, kernel).shape, 7)

    def fast(x, kernel):
        return fastconv.conv2d(x, kernel, stride=stride, padding=padding)

    def value_and_grads(conv, x, kernel, weights):
        y = conv(x, kernel)
        return y, jax.grad(lambda x, kernel: jnp.sum(weights * conv(x, kernel)), argnums=(0, 1))(x, kernel)

    @jax.jit  # one program per shape: compiles dominate this file's run time
    def both(x, kernel, weights):
        expected = value_and_grads(lambda x, k: reference(x, k, stride, padding), x, kernel, weights)
        return value_and_grads(fast, x, kernel, weights), expected

    got, expected = both(x, kernel, weights)
    (y, (dx, dk)), (y_ref, (dx_ref, dk_ref)) = got, expected
    close(y, y_ref, 1e-4)
    close(dx, dx_ref, 1e-4)
    close(dk, dk_ref, 1e-4)


@pytest.mark.parametrize("shape", SHAPES[2:4])
def test_vjp_matches_lax(shape):
    x, kernel, stride, padding = operands(shape)

    @jax.jit
    def vjps(x, kernel, dy):
        fast = jax.vjp(lambda x, k: fastconv.conv2d(x, k, stride=stride, padding=padding), x, kernel)[1](dy)
        ref = jax.vjp(lambda x, k: reference(x, k, stride, padding), x, kernel)[1](dy)
        return fast, ref

    dy = normal(jax.eval_shape(lambda x, k: reference(x, k, stride, padding), x, kernel).shape, 3)
    fast, ref = vjps(x, kernel, dy)
    close(fast[0], ref[0], 1e-4)
    close(fast[1], ref[1], 1e-4)


def test_chunks_of_images_match_whole_batch(monkeypatch):
    """Chunks of interleaved images (0, 2, 4 and 1, 3, 5) give the whole batch's value and gradients."""
    x, kernel, stride, padding = operands((6, 8, 8, 8, 16, 3, 2, 1))
    dy = normal(jax.eval_shape(lambda x, k: reference(x, k, stride, padding), x, kernel).shape, 4)
    monkeypatch.setattr(fastconv, "_CHUNK_BYTES", 3 * 4 * 4 * 9 * 8 * 4)  # 3 images' patches: 2 chunks
    assert fastconv._n_chunks(6, 4 * 4 * 9 * 8 * 4) == 2

    @jax.jit
    def both(x, kernel, dy):
        fast = jax.vjp(lambda x, k: fastconv.conv2d(x, k, stride=stride, padding=padding), x, kernel)
        ref = jax.vjp(lambda x, k: reference(x, k, stride, padding), x, kernel)
        return (fast[0], *fast[1](dy)), (ref[0], *ref[1](dy))

    for got, expected in zip(*both(x, kernel, dy)):
        close(got, expected, 1e-4)


def test_chunk_count_is_a_divisor_of_the_batch(monkeypatch):
    monkeypatch.setattr(fastconv, "_CHUNK_BYTES", 100)
    assert fastconv._n_chunks(512, 10) == 64  # 8 images per chunk
    assert fastconv._n_chunks(12, 10) == 2  # 10 fit: 6, the largest divisor of 12 below
    assert fastconv._n_chunks(7, 10) == 1  # all 7 fit
    assert fastconv._n_chunks(13, 10) == 13  # prime: one image per chunk
    assert fastconv._n_chunks(4, 1000) == 4  # an image larger than a chunk: one per chunk


@pytest.mark.parametrize("stride", [1, 2])
def test_bfloat16_accumulates_in_float32(stride):
    x, kernel, _, padding = operands((5, 8, 8, 16, 16, 3, 1, 1), jnp.bfloat16)

    @jax.jit
    def run(x, kernel):
        y, vjp = jax.vjp(lambda x, k: fastconv.conv2d(x, k, stride=stride, padding=padding), x, kernel)
        # float32 maths on the same bfloat16 values: only the final rounding to bfloat16 differs.
        f32 = jax.vjp(lambda x, k: reference(x, k, stride, padding), x.astype(jnp.float32), kernel.astype(jnp.float32))
        return (y, *vjp(jnp.ones_like(y))), (f32[0], *f32[1](jnp.ones(y.shape)))

    got, expected = run(x, kernel)
    assert [a.dtype for a in got] == [jnp.bfloat16] * 3
    for a, b in zip(got, expected):
        close(a.astype(jnp.float32), b, 1e-2)


@pytest.mark.parametrize("flags, ynnpack", [
    ("", True),
    ("--xla_cpu_enable_fast_math=false", True),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", False),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot", True),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce", False),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution", True),
])
def test_reads_which_library_runs_xla_convs_from_xla_flags(monkeypatch, flags, ynnpack):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert fastconv._ynnpack_convs() == ynnpack


@pytest.mark.parametrize("conv", ["conv2d", "conv2d_im2col"])
def test_both_entry_points_match_lax_where_winograd_applies(conv, conv_backend):
    """A 3x3/1 layer of 128 channels: conv2d runs Winograd there, conv2d_im2col its im2col parts."""
    x, kernel, stride, padding = operands((2, 4, 4, 128, 16, 3, 1, 1))
    dy = normal((2, 4, 4, 16), 5)
    fast_conv = getattr(fastconv, conv)

    @jax.jit
    def both(x, kernel, dy):
        fast = jax.vjp(lambda x, k: fast_conv(x, k, stride=stride, padding=padding), x, kernel)
        ref = jax.vjp(lambda x, k: reference(x, k, stride, padding), x, kernel)
        return (fast[0], *fast[1](dy)), (ref[0], *ref[1](dy))

    for got, expected in zip(*both(x, kernel, dy)):
        close(got, expected, 1e-4)


@pytest.mark.parametrize("name", ["CONTRASTIVE_WINOGRAD", "CONTRASTIVE_FAST_CONV"])
def test_no_environment_variable_switches_winograd(monkeypatch, name):
    # The model's config names the convolution (nn/conv.py); the environment no longer does.
    case = ((2, 8, 8, 128), (3, 3, 128, 64), 1, 1, jnp.float32)
    for value in ("0", "1"):
        monkeypatch.setenv(name, value)
        assert winograd.applies(*case) is True
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k: calls.append(x.shape) or reference(x, k, 1, 1))
    monkeypatch.setenv(name, "0")
    x, kernel, _, _ = operands((2, 4, 4, 128, 16, 3, 1, 1))
    fastconv.conv2d(x, kernel, stride=1, padding=1)
    assert calls == [(2, 4, 4, 128)]


@pytest.mark.parametrize("bad", [dict(stride=0), dict(padding=-1), dict(stride=1.5)])
def test_rejects_bad_stride_or_padding_with_values(bad):
    x, kernel, _, _ = operands(SHAPES[0])
    for conv in (fastconv.conv2d, fastconv.conv2d_im2col):
        with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
            conv(x, kernel, **bad)
