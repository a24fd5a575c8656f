"""--embed-grid: embeddings that average-pool the last feature map on a grid instead of globally."""
import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_cli import write_images
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.config import ENCODER_FEATURES, ConfigError, ModelConfig, TrainConfig
from contrastive_cli.nn.models import grid_pool
from contrastive_cli.train.optim import make_optimizer
from contrastive_cli.train.state import init_state

runner = CliRunner()


def adaptive_avg_pool(a, g):
    """NumPy reference: PyTorch's AdaptiveAvgPool2d cell bounds, cells row-major, channels last."""
    _, h, w, _ = a.shape
    cells = []
    for i in range(g):
        for j in range(g):
            r0, r1 = (i * h) // g, -(-((i + 1) * h) // g)
            c0, c1 = (j * w) // g, -(-((j + 1) * w) // g)
            cells.append(a[:, r0:r1, c0:c1].mean(axis=(1, 2)))
    return np.concatenate(cells, axis=1)


@pytest.mark.parametrize(("side", "grid"), [(4, 1), (4, 2), (5, 2), (4, 4), (7, 3)])
def test_grid_pool_is_adaptive_average_pooling(side, grid):
    a = np.random.default_rng(side * 10 + grid).normal(size=(3, side, side, 5)).astype(np.float32)
    got = np.asarray(jax.jit(grid_pool, static_argnums=1)(a, grid))
    assert got.shape == (3, grid * grid * 5)
    np.testing.assert_allclose(got, adaptive_avg_pool(a, grid), rtol=1e-5, atol=1e-6)
    if side == 4 and grid == 2:  # cell (0, 1) is the top-right 2 x 2 block, by hand
        np.testing.assert_allclose(got[:, 5:10], a[:, :2, 2:].mean(axis=(1, 2)), rtol=1e-5)


def test_grid_cells_average_to_the_features_the_head_is_trained_on():
    cfg = TrainConfig.tiny(model=ModelConfig(image_size=32, embed_grid=2))
    graphdef, state = init_state(cfg, make_optimizer(cfg))
    model = nnx.merge(graphdef, state["params"], state["stats"])
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    h, _ = model(x, train=False)
    cells = model.embed(x, 2)
    assert cells.shape == (4, 4 * 256) and cfg.model.feature_side == 4
    np.testing.assert_allclose(np.asarray(cells).reshape(4, 4, 256).mean(axis=1), np.asarray(h), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(cells[:, :256]), np.asarray(h), atol=1e-3)  # a cell is not the average
    np.testing.assert_allclose(np.asarray(model.embed(x)), np.asarray(h), rtol=1e-6)


@pytest.mark.parametrize(("size", "grid"), [(32, -1), (32, 5), (16, 3)])
def test_grid_must_fit_the_feature_map(size, grid):
    with pytest.raises(ConfigError, match=f"embedding grid {grid} must be between 1 and {-(-size // 8)}"):
        ModelConfig(image_size=size, embed_grid=grid)


@pytest.mark.parametrize(("encoder", "size", "grid"), [("small", 32, 4), ("small", 16, 2), ("small", 96, 4),
                                                       ("resnet18", 32, 4), ("resnet18", 224, 4), ("resnet50", 224, 2),
                                                       ("resnet50", 32, 2)])
def test_the_default_grid_is_the_finest_the_map_holds_within_8192_features(encoder, size, grid):
    model = ModelConfig(encoder=encoder, image_size=size)
    assert model.embed_grid == grid  # made explicit: config.json records the grid used
    assert grid <= model.feature_side and grid * grid * ENCODER_FEATURES[encoder] <= 8192
    assert ModelConfig(encoder=encoder, image_size=size, embed_grid=1).embed_grid == 1


def test_encoder_feature_widths_are_the_models():
    from contrastive_cli.nn.models import ENCODERS

    assert {name: cls.features for name, cls in ENCODERS.items()} == ENCODER_FEATURES


@pytest.mark.slow
def test_pretrain_embed_grid_reaches_embed_and_evaluate(tmp_path):
    images = tmp_path / "images"
    for c in ("a", "b"):
        write_images(images / c, n=8, size=20)
    run = tmp_path / "run"
    out = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--steps", "2", "-b", "8",
                              "--image-size", "16", "--embed-grid", "2", "--quiet"])
    assert out.exit_code == 0, out.output
    assert json.loads((run / "config.json").read_text())["model"]["embed_grid"] == 2
    emb = tmp_path / "emb.npy"
    out = runner.invoke(app, ["embed", str(images), "--model", str(run), "-o", str(emb)])
    assert out.exit_code == 0, out.output
    e = np.load(emb)
    assert e.shape == (16, 4 * 256)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    out = runner.invoke(app, ["evaluate", str(images), "--model", str(run), "--json", "-k", "3"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["dim"] == 1024 and json.loads(out.stdout)["embed_grid"] == 2
    out = runner.invoke(app, ["evaluate", str(images), "--model", str(run), "--json", "-k", "3", "--embed-grid", "1"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["dim"] == 256


@pytest.mark.slow
def test_grid_larger_than_the_feature_map_is_a_one_line_error(tmp_path):
    write_images(tmp_path / "images", n=4, size=20)
    out = runner.invoke(app, ["pretrain", str(tmp_path / "images"), "-o", str(tmp_path / "run"), "--steps", "1",
                              "-b", "4", "--image-size", "16", "--embed-grid", "3", "--quiet"])
    assert out.exit_code != 0 and "Traceback" not in out.output
    assert "embedding grid 3 must be between 1 and 2" in out.output
    assert not (tmp_path / "run").exists()
