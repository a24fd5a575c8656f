"""pretrain() scaled and interrupted: 1 device == 4 devices, SIGTERM + --resume == one run, bf16,
LARS and SGD train, a diverging run stops without saving a non-finite state."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from contrastive_cli import checkpoint
from contrastive_cli.cli import app
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.data.decode import load_folder
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.errors import ConfigError
from contrastive_cli.train.loop import pretrain
from contrastive_cli.train.optim import make_optimizer
from contrastive_cli.train.step import working_size
from test_cli import write_images

pytestmark = pytest.mark.slow  # real training runs or subprocesses

runner = CliRunner()
STEPS = 8
# What the CLI builds from ARGS, its --conv auto included: Winograd's sums round differently from
# XLA's convolution in the last bit (step 2's loss, seen on an AVX2 machine).
CFG = TrainConfig.tiny(model=ModelConfig(image_size=16, conv="auto"), steps=STEPS)
ARGS = ["--steps", str(STEPS), "-b", "8", "--image-size", "16", "--log-every", "1", "--quiet", "--no-cache"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "images"
    write_images(path)
    return path


@pytest.fixture(scope="module")
def images(folder):
    return load_folder(folder, working_size(16))


@pytest.fixture(scope="module")
def full_run(folder, images, tmp_path_factory):
    """STEPS uninterrupted steps on all 4 (forced) host devices: the reference."""
    run = tmp_path_factory.mktemp("full") / "run"
    summary = pretrain(folder, CFG, run, images=images)
    assert summary["devices"] == 4 and summary["steps"] == STEPS
    records = metrics(run)
    # The first record says how long compiling (or loading from the cache) and one step took.
    assert records[0]["first_step_s"] == pytest.approx(summary["compile_s"]) and records[0]["first_step_s"] > 0
    assert not any("first_step_s" in r for r in records[1:])
    return records


def test_one_device_matches_four(full_run, folder, images, tmp_path):
    # BatchNorm statistics and the negatives span the global batch, so sharding it changes nothing.
    pretrain(folder, CFG, tmp_path / "one", images=images, devices=jax.devices()[:1])
    one = metrics(tmp_path / "one")
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in full_run], rtol=0, atol=1e-5)
    assert [r["lr"] for r in one] == [r["lr"] for r in full_run]
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["devices"] == 1


def test_sigterm_then_resume_replays_the_uninterrupted_run(full_run, folder, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    cmd = [sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o", str(run), *ARGS,
           "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no third metrics line within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    stopped = len(metrics(run))
    assert 3 <= stopped < STEPS, "the run finished before SIGTERM arrived"
    assert f"stopped by SIGTERM after step {stopped}" in err and "--resume" in err
    assert checkpoint.manager(run).latest_step() == stopped  # the step in flight finished and was saved
    assert not (run / "summary.json").exists()

    result = runner.invoke(app, ["pretrain", str(folder), "-o", str(run), "--resume", "--quiet", "--no-cache"])
    assert result.exit_code == 0, result.output
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    # Bit-exact: same learning rates (the schedule's total is in the state), same data order and
    # augmentation (functions of the step), same parameters and optimizer state from the checkpoint.
    for got, want in zip(resumed, full_run):
        assert (got["step"], got["loss"], got["lr"]) == (want["step"], want["loss"], want["lr"])
        # The health metrics come from a separate small jit whose compiled form (fresh or from the
        # persistent cache, in another process) may reduce in another order: last-bit differences.
        assert got["pos_cos"] == pytest.approx(want["pos_cos"], abs=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == stopped and summary["steps"] == STEPS


def test_batch_must_divide_the_devices(folder, tmp_path):
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by 4 devices; use 4 or 8"):
        pretrain(folder, TrainConfig.tiny(batch_size=6), tmp_path / "run")
    with pytest.raises(ConfigError, match="batch size 2 is not divisible by 4 devices; use 4$"):
        pretrain(folder, TrainConfig.tiny(batch_size=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_weight_decay_and_trust_ratio_skip_biases_and_norms(optimizer):
    # With zero gradients only weight decay moves a parameter: matrices shrink, 1-D leaves stay.
    tx = make_optimizer(TrainConfig.tiny(optimizer=optimizer, lr=0.1, weight_decay=0.5))
    params = {"kernel": np.ones((3, 3), np.float32), "bias": np.ones(3, np.float32)}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) < 0)
    assert np.all(np.asarray(updates["bias"]) == 0)


@pytest.mark.parametrize("precision, optimizer", [("bf16", "lars"), ("float32", "sgd")])
def test_precisions_and_optimizers_train(folder, images, tmp_path, precision, optimizer):
    cfg = TrainConfig.tiny(model=ModelConfig(image_size=16), steps=2, precision=precision, optimizer=optimizer)
    summary = pretrain(folder, cfg, tmp_path / "run", images=images)
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    params = load_encoder(tmp_path / "run").params
    assert all(np.isfinite(np.asarray(p)).all() and p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    # lr 1e30: step 1 leaves huge but finite parameters, step 2's loss is NaN. The divergence is found
    # before step 2 is saved (checkpoints every step) although its log step (3) is not reached.
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(folder), "-o", str(run), *ARGS, "--lr", "1e30",
                                 "--log-every", "3", "--checkpoint-every", "1"])
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert "training diverged: loss became nan at step 2 (finite up to step 1)" in message
    assert "the last good checkpoint, step 1, is kept" in message and "--lr" in message
    assert checkpoint.manager(run).all_steps() == [1]
    encoder = load_encoder(run)
    assert encoder.step == 1
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(encoder.params))
    assert [r["step"] for r in metrics(run)] == [1]


def test_separate_views_take_one_encoder_pass_and_batchnorm_per_view(images):
    """--views separate: the loss is NT-Xent of z1 = f(v1) and z2 = f(v2), two train-mode passes
    with BatchNorm statistics of their own; concat (the default) normalises over both views."""
    import jax.numpy as jnp
    from flax import nnx

    from contrastive_cli.nn import augment
    from contrastive_cli.nn import losses
    from contrastive_cli.mesh import batch_sharding, data_mesh, replicated
    from contrastive_cli.train.state import init_state
    from contrastive_cli.train.step import make_step

    mesh = data_mesh(jax.devices()[:1])
    batch = jax.device_put(images.images[:8], batch_sharding(mesh))
    got = {}
    for views in ("separate", "concat"):
        cfg = TrainConfig.tiny(model=ModelConfig(image_size=16), views=views)
        tx = make_optimizer(cfg)
        graphdef, state = init_state(cfg, tx, replicated(mesh))
        params, stats = jax.tree.map(jnp.copy, (state["params"], state["stats"]))  # the step donates state
        new, out = make_step(cfg, graphdef, tx, mesh)(state, batch)
        got[views] = float(out["loss"])
        key = jax.random.fold_in(jax.random.key(cfg.seed + 1), 0)
        v1, v2 = augment.augment_views(batch, key=key, cfg=cfg.augment, size=16)
        model = nnx.merge(graphdef, params, stats)
        if views == "separate":
            z1, z2 = model(v1, train=True)[1], model(v2, train=True)[1]
        else:
            z1, z2 = jnp.split(model(jnp.concatenate([v1, v2]), train=True)[1], 2)
        assert got[views] == pytest.approx(float(losses.nt_xent(z1, z2, cfg.temperature)), rel=1e-5)
        # Each pass moves BatchNorm's running averages: the state holds the model's after both passes.
        def mean(s):
            return np.concatenate([np.ravel(x) for p, x in jax.tree_util.tree_leaves_with_path(s)
                                   if "mean" in jax.tree_util.keystr(p)])

        np.testing.assert_allclose(mean(new["stats"]), mean(nnx.state(model, nnx.BatchStat)), rtol=1e-5, atol=1e-6)
    assert abs(got["separate"] - got["concat"]) > 1e-4  # the option changes what BatchNorm sees


def test_views_must_be_concat_or_separate():
    with pytest.raises(ConfigError, match="unknown views 'both'"):
        TrainConfig.tiny(views="both")
