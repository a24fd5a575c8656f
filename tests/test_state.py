"""The first state: compiled with LLVM's -O1 on CPU (it runs once), equal bit for bit to XLA's default."""
import jax
import numpy as np
import pytest

from contrastive_cli.train import state as step
from contrastive_cli.train.optim import make_optimizer
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.mesh import data_mesh, replicated


@pytest.mark.parametrize("encoder", ["small", "resnet18"])
def test_first_state_equals_the_default_compile(encoder, monkeypatch):
    cfg = TrainConfig(model=ModelConfig(encoder=encoder, image_size=16), batch_size=8, seed=3)
    tx = make_optimizer(cfg)
    sharding = replicated(data_mesh())
    assert step.INIT_COMPILE_OPTIONS  # the tool's setting is what is compared
    _, fast = step.init_state(cfg, tx, sharding)
    monkeypatch.setattr(step, "INIT_COMPILE_OPTIONS", None)  # XLA's defaults (-O3)
    _, default = step.init_state(cfg, tx, sharding)
    assert jax.tree.structure(fast) == jax.tree.structure(default)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # not vacuous: the kernels are random draws, and -O0 would draw other last bits
    kernel = np.asarray(fast["params"]["encoder"]["layers" if encoder == "small" else "blocks"][0]
                        ["conv" if encoder == "small" else "conv1"]["kernel"][...])
    assert kernel.std() > 0
