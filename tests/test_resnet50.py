"""resnet50 (and resnet18's stem): torchvision's ResNet layouts (their parameter counts, to the
weight), the stem chosen by image size (old configs keep theirs), and `pretrain` + `embed` end to end
at 224 px on the CPU."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.config import ConfigError, ModelConfig, TrainConfig
from contrastive_cli.nn.models import ENCODERS, SimCLRModel

runner = CliRunner()

# torchvision.models.resnet50().parameters() and resnet18's, less the ImageNet classifier (fc):
# 25,557,032 - 2,049,000 and 11,689,512 - 513,000. BatchNorm's running statistics are buffers there,
# BatchStat here: neither counts.
TORCHVISION_RESNET50 = 23_508_032
TORCHVISION_RESNET18 = 11_176_512
SMALL_STEM = 7 * 7 * 3 * 64 - 3 * 3 * 3 * 64  # the 3x3/1 first conv in place of the 7x7/2 one


def _params(encoder, **kw) -> int:
    model = nnx.eval_shape(lambda: ENCODERS[encoder](rngs=nnx.Rngs(0), **kw))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_resnet_parameters_match_torchvision():
    assert _params("resnet50", imagenet_stem=True) == TORCHVISION_RESNET50
    assert _params("resnet50") == TORCHVISION_RESNET50 - SMALL_STEM
    assert _params("resnet18", imagenet_stem=True) == TORCHVISION_RESNET18
    assert _params("resnet18") == TORCHVISION_RESNET18 - SMALL_STEM


@pytest.mark.parametrize("encoder, width", [("resnet50", 2048), ("resnet18", 512)])
@pytest.mark.parametrize("size, stem, side", [(32, False, 4), (64, False, 8), (95, False, 12), (96, True, 3),
                                              (224, True, 7), (225, True, 8)])
def test_the_stem_follows_the_image_size(encoder, width, size, stem, side):
    cfg = ModelConfig(encoder=encoder, image_size=size, embed_grid=1)
    assert cfg.imagenet_stem is stem and cfg.feature_side == side
    assert cfg.resolved().stem == ("imagenet" if stem else "small") and cfg.resolved().imagenet_stem is stem
    model = nnx.eval_shape(lambda: SimCLRModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    fmap = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encoder.feature_map(x, False), state, x)
    h, z = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, x)
    assert fmap.shape == (2, side, side, width) and h.shape == (2, width) and z.shape == (2, 128)


def test_a_stem_can_be_chosen_and_old_configs_keep_theirs():
    assert ModelConfig(encoder="resnet18", image_size=224, stem="small").feature_side == 28
    assert ModelConfig(encoder="resnet50", image_size=32, stem="imagenet", embed_grid=1).feature_side == 1
    assert ModelConfig(encoder="small", image_size=224).resolved().stem == "auto"  # no stem to choose
    with pytest.raises(ConfigError, match="the ImageNet stem is a ResNet's"):
        ModelConfig(encoder="small", stem="imagenet")
    with pytest.raises(ConfigError, match="unknown stem 'big'"):
        ModelConfig(encoder="resnet18", stem="big")
    # Before 0.3.1 (no "stem" key): resnet18 always had the small stem, resnet50 the ImageNet one from 96 px.
    old = lambda encoder, size: TrainConfig.from_json({"model": {"encoder": encoder, "image_size": size}}).model
    assert old("resnet18", 224).stem == "small" and old("resnet18", 224).feature_side == 28
    assert old("resnet50", 224).stem == "imagenet" and old("resnet50", 64).stem == "small"
    assert old("small", 32).stem == "auto" == ModelConfig().resolved().stem  # no stem: recorded alike


def test_a_grid_larger_than_resnet50s_map_is_refused():
    ModelConfig(encoder="resnet50", image_size=224, embed_grid=7)
    with pytest.raises(ConfigError, match="between 1 and 7, the side of the encoder's last feature map at image size 224"):
        ModelConfig(encoder="resnet50", image_size=224, embed_grid=8)


@pytest.mark.slow
def test_resnet50_pretrains_and_embeds_at_224_px(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--encoder", "resnet50", "--image-size", "224",
                                 "--steps", "1", "-b", "4", "--quiet", "--no-cache", "--conv", "xla"])  # the CPU kernels: test_models
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["encoder"] == "resnet50" and config["model"]["image_size"] == 224
    assert config["model"]["stem"] == "imagenet"  # "auto", recorded as what was built
    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", str(images), "-m", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    assert emb.shape == (4, 4 * 2048) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Exported to ONNX (the max-pool included: jax2onnx once dropped its padding), it embeds the same.
    onnx = tmp_path / "encoder.onnx"
    assert runner.invoke(app, ["export", str(run), "-o", str(onnx)]).exit_code == 0
    result = runner.invoke(app, ["embed", str(images), "-m", str(onnx), "-o", str(tmp_path / "onnx.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), emb, atol=1e-4)
