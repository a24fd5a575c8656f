"""winograd.conv3x3 equals lax.conv_general_dilated in value and both gradients, under jit; where
it applies; and a whole ResNet-18 train step on the CPU path equals the plain-XLA step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fastconv import close, normal, operands, reference

from contrastive_cli.perf import fastconv
from contrastive_cli.train import optim, state as train_state, step as train_step
from contrastive_cli.perf import winograd
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.mesh import batch_sharding, data_mesh, replicated

# (N, H, W, C, O, k, stride, padding): square and not, C != O, batch 1 and 3, tiles 1 x 3 and more.
SHAPES = [
    (3, 8, 8, 16, 8, 3, 1, 1),
    (1, 2, 6, 8, 16, 3, 1, 1),
    (3, 6, 4, 5, 7, 3, 1, 1),
    (2, 4, 4, 128, 128, 3, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_{}x{}_c{}_o{}".format(*s))
def test_value_and_gradients_match_lax(shape):
    x, kernel, _, _ = operands(shape)
    weights = normal(jax.eval_shape(lambda x, k: reference(x, k, 1, 1), x, kernel).shape, 11)

    def value_and_grads(conv, x, kernel):
        return conv(x, kernel), jax.grad(lambda x, k: jnp.sum(weights * conv(x, k)), argnums=(0, 1))(x, kernel)

    @jax.jit
    def both(x, kernel):
        return (value_and_grads(winograd.conv3x3, x, kernel),
                value_and_grads(lambda x, k: reference(x, k, 1, 1), x, kernel))

    (y, (dx, dk)), (y_ref, (dx_ref, dk_ref)) = both(x, kernel)
    close(y, y_ref, 1e-5)
    close(dx, dx_ref, 1e-5)
    close(dk, dk_ref, 1e-5)


def test_conv2d_uses_it_where_it_applies(monkeypatch):
    x, kernel, _, _ = operands((2, 4, 4, 128, 16, 3, 1, 1))
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k: calls.append(x.shape) or reference(x, k, 1, 1))
    fastconv.conv2d(x, kernel, stride=1, padding=1)
    fastconv.conv2d(x, kernel, stride=2, padding=1)
    fastconv.conv2d(x[:, :3, :3], kernel, stride=1, padding=1)  # odd size
    fastconv.conv2d(x[..., :64], kernel[:, :, :64], stride=1, padding=1)  # too few channels
    fastconv.conv2d_im2col(x, kernel, stride=1, padding=1)  # the "im2col" convolution: never Winograd
    assert calls == [(2, 4, 4, 128)]


@pytest.mark.parametrize("case, expected", [
    (((2, 8, 8, 128), (3, 3, 128, 64), 1, 1, jnp.float32), True),
    (((2, 8, 8, 512), (3, 3, 512, 512), 1, 1, jnp.float32), True),
    (((2, 8, 8, 128), (3, 3, 128, 64), 1, 1, jnp.bfloat16), False),
    (((2, 8, 8, 128), (1, 1, 128, 64), 1, 0, jnp.float32), False),
    (((2, 8, 8, 128), (3, 3, 128, 64), 1, 0, jnp.float32), False),
    (((2, 8, 7, 128), (3, 3, 128, 64), 1, 1, jnp.float32), False),
    (((2, 8, 8, 64), (3, 3, 64, 64), 1, 1, jnp.float32), False),
    (((128, 16, 16, 128), (3, 3, 128, 128), 1, 1, jnp.float32), True),  # 64 MiB of tiles
    (((512, 16, 16, 128), (3, 3, 128, 128), 1, 1, jnp.float32), False),  # 256 MiB
])
def test_applies_to_same_padded_stride_1_float32_3x3_of_128_channels_up(case, expected):
    assert winograd.applies(*case) is expected


def _one_step(monkeypatch, fast: bool):
    conv = "winograd" if fast else "xla"
    cfg = TrainConfig(model=ModelConfig(encoder="resnet18", image_size=16, conv=conv), batch_size=4, optimizer="sgd",
                      lr=0.5)
    mesh = data_mesh()
    tx = optim.make_optimizer(cfg)
    graphdef, state = train_state.init_state(cfg, tx, replicated(mesh))
    before = jax.tree.map(np.asarray, state["params"])
    step = train_step.make_step(cfg, graphdef, tx, mesh)
    r = train_step.working_size(16)
    images = np.random.default_rng(0).integers(0, 256, (4, r, r, 3), dtype=np.uint8)
    state, out = step(state, jax.device_put(images, batch_sharding(mesh)))
    return float(out["loss"]), before, jax.tree.map(np.asarray, state["params"])


@pytest.mark.slow
def test_resnet18_train_step_equals_the_plain_xla_step(monkeypatch):
    """ResNet-18 at 16 px runs Winograd in layers 2-4 (and fastconv's other parts) on the CPU path."""
    calls, conv3x3 = [], winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k: calls.append(x.shape) or conv3x3(x, k))
    loss, before, fast = _one_step(monkeypatch, fast=True)
    assert len(calls) == 9  # the stride-1 3x3 convolutions of 128, 256 and 512 channels
    loss_ref, before_ref, plain = _one_step(monkeypatch, fast=False)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    leaves = jax.tree.leaves_with_path(before)
    for (path, p0), p0_ref, p1, p1_ref in zip(leaves, jax.tree.leaves(before_ref), jax.tree.leaves(fast),
                                              jax.tree.leaves(plain)):
        np.testing.assert_array_equal(p0, p0_ref)
        update, update_ref = p1 - p0, p1_ref - p0_ref
        assert np.abs(update_ref).max() > 0, path  # every parameter moves: the comparison is not vacuous
        np.testing.assert_allclose(update, update_ref, atol=1e-3 * np.abs(update_ref).max(), err_msg=str(path))
