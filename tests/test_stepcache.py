"""The exported train step on disk: the same step as a traced one, loaded without tracing, keyed by
what shapes it, and traced again when its file is bad."""
import dataclasses

import jax
import numpy as np
import pytest

from contrastive_cli.nn import augment
from contrastive_cli.perf import stepcache
from contrastive_cli.train import optim, state as train_state, step as train_step
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.mesh import batch_sharding, data_mesh, replicated

pytestmark = pytest.mark.slow  # real training runs or subprocesses

CFG = TrainConfig.tiny(model=ModelConfig(image_size=16), optimizer="sgd")


def _setup(cfg=CFG):
    mesh = data_mesh()  # 4 host devices (conftest): the exported step is sharded
    tx = optim.make_optimizer(cfg)
    graphdef, state = train_state.init_state(cfg, tx, replicated(mesh))
    r = train_step.working_size(cfg.model.image_size)
    host = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, r, r, 3), dtype=np.uint8)
    return mesh, tx, graphdef, state, jax.device_put(host, batch_sharding(mesh))


def _run(step, state, images, steps=2):
    losses = []
    for _ in range(steps):
        state, out = step(state, images)
        losses.append(float(out["loss"]))
    assert sorted(out) == ["finite", "loss", "lr", "z1", "z2"]
    return losses, jax.tree.map(np.asarray, state)


@pytest.fixture
def traces(monkeypatch):
    """How many times the step was traced (augmentation is the step's first piece)."""
    calls = []
    views = augment.augment_views
    monkeypatch.setattr(augment, "augment_views", lambda *a, **k: calls.append(1) or views(*a, **k))
    return calls


def test_loaded_step_equals_the_traced_step_and_skips_tracing(tmp_path, traces):
    mesh, tx, graphdef, state, images = _setup()
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    ref_losses, ref_state = _run(train_step.make_step(CFG, graphdef, tx, mesh), state, images)
    assert len(traces) == 1

    for expect_traces in (2, 2):  # first: traced and written; then: loaded, not traced
        _, state = train_state.init_state(CFG, tx, replicated(mesh))
        step = stepcache.make_cached_step(CFG, graphdef, tx, mesh, state, spec, folder=tmp_path)
        assert len(traces) == expect_traces
        losses, new_state = _run(step, state, images)
        assert losses == ref_losses
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
            np.testing.assert_array_equal(a, b)
        assert jax.tree.structure(new_state) == jax.tree.structure(ref_state)
    assert len(list(tmp_path.glob("*.bin"))) == 1


def test_key_follows_what_shapes_the_step(monkeypatch):
    mesh, _, _, state, images = _setup()
    treedef = jax.tree.structure(state)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves(state)]
    batch = jax.ShapeDtypeStruct(images.shape, images.dtype)

    def key(cfg=CFG, batch=batch, mesh=mesh):
        return stepcache.step_key(cfg, treedef, specs, batch, mesh)

    base = key()
    assert key() == base
    # fields the step never reads: the same program
    assert key(dataclasses.replace(CFG, steps=99, log_every=7, eval_every=3, eval_folder="labeled", keep_checkpoints=5)) == base
    # what it does read, the batch, the devices, the environment read while tracing: another
    assert key(dataclasses.replace(CFG, temperature=0.3)) != base
    assert key(dataclasses.replace(CFG, augment=dataclasses.replace(CFG.augment, blur_p=0.3))) != base
    assert key(batch=jax.ShapeDtypeStruct((16, *images.shape[1:]), images.dtype)) != base
    assert key(mesh=data_mesh(jax.devices()[:1])) != base
    assert key(dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, conv="winograd"))) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # fastconv's plan reads it
    assert key() != base


def test_fields_left_out_of_the_key_do_not_change_the_program():
    """The key ignores stepcache._NOT_TRACED: the step must not read them, or a run would get a
    program traced for other values."""
    mesh, tx, graphdef, state, images = _setup()
    other = dict(steps=99, epochs=0, time_budget=0.0, log_every=7, checkpoint_every=5, keep_checkpoints=5,
                 eval_folder="labeled", eval_every=3)
    assert set(other) == set(stepcache._NOT_TRACED)

    def program(cfg):
        step = train_step.make_step(cfg, graphdef, tx, mesh)
        return step.lower(state, images).as_text()

    assert program(dataclasses.replace(CFG, **other)) == program(CFG)
    assert program(dataclasses.replace(CFG, temperature=0.3)) != program(CFG)  # the check can fail


def test_a_bad_file_is_traced_again_and_replaced(tmp_path, traces):
    mesh, tx, graphdef, state, images = _setup()
    spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
    stepcache.make_cached_step(CFG, graphdef, tx, mesh, state, spec, folder=tmp_path)
    (path,) = tmp_path.glob("*.bin")
    good = path.read_bytes()
    for bad in (b"", b"not a step", good[: len(good) // 2], good[:-1] + b"x"):
        path.write_bytes(bad)
        before = len(traces)
        stepcache.make_cached_step(CFG, graphdef, tx, mesh, state, spec, folder=tmp_path)
        assert len(traces) == before + 1
        assert path.read_bytes() != bad  # written again...
        before = len(traces)
        step = stepcache.make_cached_step(CFG, graphdef, tx, mesh, state, spec, folder=tmp_path)
        assert len(traces) == before  # ...and good: loaded, not traced
    losses, _ = _run(step, state, images, steps=1)
    assert np.isfinite(losses[0])


def test_the_cli_switches_it_off_by_environment(monkeypatch):
    from contrastive_cli import cli

    assert cli._step_cache() == stepcache.directory()
    monkeypatch.setenv("CONTRASTIVE_STEP_CACHE", "0")
    assert cli._step_cache() is None
