"""config.py: validation errors that name the bad values, config.json round trips (old files
included), the step count, and the choice lists the CLI offers."""
import dataclasses
import json

import pytest

from contrastive_cli.config import (CONV_CHOICES, CONVS, ENCODERS, LOSSES, OPTIMIZERS, PRECISION_CHOICES, PRECISIONS, VIEWS,
                                    AugmentConfig, ModelConfig, TrainConfig)
from contrastive_cli.errors import ConfigError, ContrastiveError


# ---- validation: one ConfigError, naming the value that is wrong -------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: ModelConfig(encoder="vit"), "unknown encoder 'vit'; choose one of small, resnet18, resnet50"),
    (lambda: ModelConfig(conv="fft"), "unknown convolution 'fft'; choose one of auto, xla, im2col, winograd"),
    (lambda: ModelConfig(image_size=8), "image size 8 is too small"),
    (lambda: ModelConfig(proj_dim=0), "hidden=0 dim=0 must be positive"),
    (lambda: ModelConfig(proj_hidden=-3), "hidden=-3 dim=128"),
    (lambda: ModelConfig(image_size=32, embed_grid=5), "embedding grid 5 must be between 1 and 4"),
    (lambda: AugmentConfig(crop_scale=(0.5, 0.2)), r"crop scale \(0.5, 0.2\)"),
    (lambda: AugmentConfig(crop_ratio=(0, 1)), r"crop ratio \(0, 1\)"),
    (lambda: AugmentConfig(flip_p=1.5), r"flip probability 1.5 is not in \[0, 1\]"),
    (lambda: AugmentConfig(blur_p=-0.1), r"blur probability -0.1"),
    (lambda: AugmentConfig(saturation=2), r"saturation 2 is not in \[0, 1\]"),
    (lambda: AugmentConfig(hue=0.7), r"hue 0.7 is not in \[0, 0.5\]"),
    (lambda: AugmentConfig(blur_sigma=(2.0, 1.0)), r"blur sigma \(2.0, 1.0\)"),
    (lambda: TrainConfig(batch_size=1), "batch size 1 is too small"),
    (lambda: TrainConfig(steps=-2), r"steps \(-2\) and epochs \(0\) cannot be negative"),
    (lambda: TrainConfig(steps=5, epochs=2), r"--steps \(5\), --epochs \(2\) or --time-budget \(0\)"),
    (lambda: TrainConfig(epochs=2, time_budget=1.5), r"--epochs \(2\) or --time-budget \(1.5\)"),
    (lambda: TrainConfig(time_budget=-1), "time budget -1 minutes"),
    (lambda: TrainConfig(loss="triplet"), "unknown loss 'triplet'; choose one of ntxent, cosine, dcl, sigmoid"),
    (lambda: TrainConfig(optimizer="adam"), "unknown optimizer 'adam'; choose one of adamw, sgd, lars"),
    (lambda: TrainConfig(precision="fp16"), "unknown precision 'fp16'"),
    (lambda: TrainConfig(views="both"), "unknown views 'both'"),
    (lambda: TrainConfig(temperature=0), "temperature 0 must be positive"),
    (lambda: TrainConfig(lr=-1e-3), "learning rate -0.001"),
    (lambda: TrainConfig(weight_decay=-1), "weight decay -1 cannot be negative"),
    (lambda: TrainConfig(warmup_fraction=1.0), r"warm-up fraction 1.0 is not in \[0, 1\)"),
    (lambda: TrainConfig(keep_checkpoints=0), "keep_checkpoints must be >= 1"),
    (lambda: TrainConfig(eval_every=-1), r"eval_every \(-1\)"),
    (lambda: TrainConfig(eval_every=5), "--eval-every 5 needs --eval-folder"),
])
def test_validation_errors_name_the_bad_values(make, message):
    with pytest.raises(ConfigError, match=message) as e:
        make()
    assert isinstance(e.value, ContrastiveError) and "\n" not in str(e.value)  # one line for the user


def test_defaults_and_tiny_are_valid():
    cfg = TrainConfig()
    assert cfg.model == ModelConfig() and cfg.augment == AugmentConfig()
    assert cfg.model.conv in CONV_CHOICES and cfg.loss in LOSSES and cfg.optimizer in OPTIMIZERS
    tiny = TrainConfig.tiny(batch_size=4, seed=3)
    assert (tiny.batch_size, tiny.steps, tiny.seed, tiny.model.encoder, tiny.model.image_size) == (4, 3, 3, "small", 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.batch_size = 8


@pytest.mark.parametrize("size, side", [(16, 2), (17, 3), (32, 4), (33, 5), (64, 8)])
def test_feature_side_is_three_ceil_halvings(size, side):
    assert ModelConfig(image_size=size).feature_side == side
    ModelConfig(image_size=size, embed_grid=side)  # the largest grid fits


# ---- config.json ----------------------------------------------------------------------------------
def _unusual():
    return TrainConfig(
        model=ModelConfig(encoder="resnet18", image_size=48, proj_hidden=64, proj_dim=32, embed_grid=3, conv="winograd"),
        augment=AugmentConfig(crop_scale=(0.2, 0.9), crop_ratio=(0.5, 2.0), flip_p=0.1, hue=0.1, blur_sigma=(0.5, 1.5)),
        batch_size=64, epochs=7, loss="dcl", temperature=0.2, optimizer="lars", lr=0.3, weight_decay=1e-6,
        warmup_fraction=0.1, seed=11, precision="bf16", views="separate", log_every=3, checkpoint_every=50,
        keep_checkpoints=4, eval_folder="labeled", eval_every=20,
    )


def test_json_round_trip_through_a_file(tmp_path):
    cfg = _unusual()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert text.endswith("\n") and json.loads(text)["model"]["conv"] == "winograd"
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded == cfg
    assert isinstance(loaded.augment.crop_scale, tuple)  # JSON lists become tuples again (hashable, equal)
    hash(loaded)


def test_from_json_ignores_unknown_keys_and_fills_defaults_of_an_old_config():
    data = _unusual().to_json()
    del data["model"]["conv"]  # config.json from before the conv option
    del data["eval_every"], data["augment"]["blur_p"]
    data["removed_option"] = 1
    cfg = TrainConfig.from_json(data)
    assert cfg.model.conv == ModelConfig().conv == "xla"
    # a key whose default 0.2.2 changed takes the old default: the run was trained with it
    assert cfg.eval_every == 0 and cfg.augment.blur_p == 0.5 != AugmentConfig().blur_p
    assert cfg.model.encoder == "resnet18" and cfg.seed == 11 and cfg.optimizer == "lars"
    old = TrainConfig.from_json({})
    assert (old.batch_size, old.temperature, old.model.embed_grid, old.augment.crop_scale) == (256, 0.5, 1, (0.08, 1.0))
    assert TrainConfig.from_json(TrainConfig().to_json()) == TrainConfig()


def test_from_json_validates_what_it_reads():
    data = TrainConfig().to_json()
    data["loss"] = "nope"
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        TrainConfig.from_json(data)


def test_load_turns_unreadable_files_into_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*missing.json"):
        TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*bad.json"):
        TrainConfig.load(tmp_path / "bad.json")


# ---- step count ------------------------------------------------------------------------------------
def test_total_steps_from_steps_or_epochs():
    assert TrainConfig(batch_size=8, steps=17).total_steps(1000) == 17  # steps win, whatever the folder
    assert TrainConfig(batch_size=8, epochs=3).total_steps(100) == 12 * 3  # 100 // 8 full batches per epoch
    assert TrainConfig(batch_size=8).total_steps(100) == 12 * TrainConfig.DEFAULT_EPOCHS
    assert TrainConfig(batch_size=8, epochs=2).total_steps(5) == 2  # fewer images than a batch: 1 per epoch
    assert TrainConfig(batch_size=8, time_budget=2.0).total_steps(16) == 2 * TrainConfig.DEFAULT_EPOCHS  # a first guess


# ---- the choices the CLI offers --------------------------------------------------------------------
def test_cli_enums_offer_exactly_the_config_choices():
    from contrastive_cli.cli import Conv, Encoder, Loss, Optimizer, Precision, Views

    for enum, choices in ((Encoder, ENCODERS), (Loss, LOSSES), (Optimizer, OPTIMIZERS), (Conv, CONV_CHOICES),
                          (Precision, PRECISION_CHOICES), (Views, VIEWS)):
        assert tuple(e.value for e in enum) == choices, enum
    assert CONV_CHOICES == ("auto", *CONVS) and PRECISION_CHOICES == ("auto", *PRECISIONS)


def test_the_choices_match_the_implementations():
    from contrastive_cli.nn import losses, models

    assert set(models.ENCODERS) == set(ENCODERS)
    assert set(losses.LOSSES) == set(LOSSES)
    for conv in CONVS:
        ModelConfig(conv=conv)
