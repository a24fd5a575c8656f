"""Frozen, validated configuration, saved as config.json beside every checkpoint.

No JAX import here: `contrastive --help` and config validation stay instant.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENCODERS = ("small", "resnet18", "resnet50")
ENCODER_FEATURES = {"small": 256, "resnet18": 512, "resnet50": 2048}  # each one's feature width (nn/models.py)
# The default embedding grid: the finest up to EMBED_GRID_MAX x EMBED_GRID_MAX that the last feature map
# holds, within EMBED_FEATURES_MAX features (the whitening is fitted on them). On the small CNN at 32 px
# a 4 x 4 grid whitened scored kNN 0.700 against 0.683 for 2 x 2 (BENCHMARKS.md, "Session 14").
EMBED_GRID_MAX, EMBED_FEATURES_MAX = 4, 8192
IMAGENET_STEM_FROM = 96  # ResNet images of this side or more get torchvision's ImageNet stem (nn/models.py)
STEMS = ("auto", "small", "imagenet")  # a ResNet's first layers; "auto": by image size, resolved when a run starts
LOSSES = ("ntxent", "cosine", "dcl", "sigmoid")
OPTIMIZERS = ("adamw", "sgd", "lars")
PRECISIONS = ("float32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # "auto": bf16 on GPU/TPU, float32 on CPU, resolved when a run starts
VIEWS = ("concat", "separate")
EMBEDDING_DTYPES = ("float32", "float16")  # what `embed` stores
# The convolution a model runs (nn/conv.py): XLA's own, or the CPU speed wing's (perf/fastconv.py).
CONVS = ("xla", "im2col", "winograd")
CONV_CHOICES = ("auto", *CONVS)  # "auto": the fastest for the backend, resolved when a run starts

# ImageNet statistics: the normalisation SimCLR and lightly use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's augmentation recipe (Chen et al. 2020, appendix A), lightly's defaults, except two
    chosen for the small images a CPU trains on (issue 19's harness, BENCHMARKS.md "Session 10"):
    crops of at least 20% of the area (SimCLR 8%) and no blur (SimCLR 0.5; its CIFAR runs drop it too).

    Each view is: random resized crop (area `crop_scale`, aspect `crop_ratio`) -> horizontal flip
    (`flip_p`) -> colour jitter with probability `jitter_p` (brightness, contrast, saturation in
    [1-x, 1+x], hue shift in [-hue, hue] of a full turn) -> grayscale (`gray_p`) -> Gaussian blur
    (`blur_p`, sigma in `blur_sigma` pixels at the output size) -> normalise by mean/std.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"crop ratio {self.crop_ratio} must satisfy 0 < min <= max")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ConfigError(f"{name.replace('_p', '')} probability {p} is not in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} {getattr(self, name)} is not in [0, 1]")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"hue {self.hue} is not in [0, 0.5]")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ConfigError(f"blur sigma {self.blur_sigma} must satisfy 0 < min <= max")


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild the network: encoder name, input size, projection head shape."""

    encoder: str = "small"
    image_size: int = 32
    proj_hidden: int = 0  # 0: the encoder's feature width, as lightly's SimCLR sets it
    proj_dim: int = 128
    # Embeddings pool the last feature map on an embed_grid x embed_grid grid (1: global average; 0:
    # the default for the encoder and image size, `default_grid`, made explicit when the config is made).
    # Training never sees it: the projection head always takes the global average.
    embed_grid: int = 0
    # Which convolution runs (CONVS): the same maths to float rounding, different speed.
    conv: str = "xla"
    # A ResNet's stem (STEMS): "small" (3x3/1 conv, no pool), "imagenet" (torchvision's 7x7/2 conv and
    # 3x3/2 max-pool) or "auto" (imagenet from IMAGENET_STEM_FROM px). Configs written before 0.3.1 have
    # no key: resnet50 took the ImageNet stem from 96 px, resnet18 never (TrainConfig.from_json).
    stem: str = "auto"

    def __post_init__(self) -> None:
        if self.conv not in CONV_CHOICES:
            raise ConfigError(f"unknown convolution {self.conv!r}; choose one of {', '.join(CONV_CHOICES)}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        if self.stem == "imagenet" and not self.encoder.startswith("resnet"):
            raise ConfigError(f"the ImageNet stem is a ResNet's; encoder {self.encoder!r} has none")
        if self.image_size < 16:
            raise ConfigError(f"image size {self.image_size} is too small; use at least 16 pixels")
        if self.proj_dim < 1 or self.proj_hidden < 0:
            raise ConfigError(f"projection sizes hidden={self.proj_hidden} dim={self.proj_dim} must be positive")
        if self.embed_grid == 0:
            object.__setattr__(self, "embed_grid", self.default_grid)  # recorded as the grid used
        if not 1 <= self.embed_grid <= self.feature_side:
            raise ConfigError(f"embedding grid {self.embed_grid} must be between 1 and {self.feature_side}, the side "
                              f"of the encoder's last feature map at image size {self.image_size}")

    @property
    def imagenet_stem(self) -> bool:
        """Whether the encoder starts with torchvision's ImageNet stem (7x7/2 conv, 3x3/2 max-pool):
        a ResNet whose stem is "imagenet", or "auto" at IMAGENET_STEM_FROM px and more. Otherwise the
        small-image stem (a 3x3/1 conv, no pool), as SimCLR's CIFAR variant and lightly use: at 224 px
        it would run ResNet-18's first stage on a 224 x 224 map, 16 times the ImageNet layout's work."""
        if self.stem == "auto":
            return self.encoder.startswith("resnet") and self.image_size >= IMAGENET_STEM_FROM
        return self.stem == "imagenet"

    def resolved(self) -> ModelConfig:
        """This config with an "auto" stem made explicit (what a run records)."""
        if self.stem != "auto" or not self.encoder.startswith("resnet"):
            return self
        return dataclasses.replace(self, stem="imagenet" if self.imagenet_stem else "small")

    @property
    def default_grid(self) -> int:
        """The finest grid up to EMBED_GRID_MAX the last feature map holds, within EMBED_FEATURES_MAX
        features: 4 for the small CNN and ResNet-18 from 32 px, 2 at 16 px; 2 for ResNet-50."""
        grid = min(EMBED_GRID_MAX, self.feature_side)
        while grid > 1 and grid * grid * ENCODER_FEATURES[self.encoder] > EMBED_FEATURES_MAX:
            grid -= 1
        return grid

    @property
    def feature_side(self) -> int:
        """Side of the encoder's last feature map: three stride-2 convs with padding 1, ceil(n / 2)
        each, after two more halvings (conv and max-pool, each ceil(n / 2)) with the ImageNet stem."""
        side = self.image_size
        for _ in range(5 if self.imagenet_stem else 3):
            side = -(-side // 2)
        return side


# The defaults 0.2.2 changed (issue 19's harness: BENCHMARKS.md, "Session 10"), as earlier versions had
# them: a config.json without one of these keys was trained (and is embedded) with these values.
_BEFORE_0_2_2 = {"model": {"embed_grid": 1}, "augment": {"crop_scale": (0.08, 1.0), "blur_p": 0.5},
                 "train": {"batch_size": 256, "temperature": 0.5}}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `pretrain` needs besides the folder; written to RUN/config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 64
    steps: int = 0  # 0: derived from epochs
    epochs: int = 0  # 0 with steps 0: DEFAULT_EPOCHS
    time_budget: float = 0.0  # minutes of wall-clock time; sets the step count from measured speed
    loss: str = "ntxent"
    temperature: float = 0.2
    optimizer: str = "adamw"
    lr: float = 0.0  # 0: the optimizer's default scaled with the batch size (see train/optim.py learning_rate)
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    seed: int = 0
    precision: str = "auto"  # PRECISION_CHOICES
    # concat: one encoder pass over both views, BatchNorm statistics over both (SimCLR's global BN);
    # separate: one pass per view, statistics per view (lightly's examples).
    views: str = "concat"
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (and on interruption)
    keep_checkpoints: int = 2
    eval_folder: str = ""  # labeled folder (class = subfolder) for a kNN probe during training
    eval_every: int = 0  # run the probe every N steps and at the last; 0: at the last step only

    DEFAULT_EPOCHS = 20

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"batch size {self.batch_size} is too small: a contrastive batch needs at least 2 images")
        if self.steps < 0 or self.epochs < 0:
            raise ConfigError(f"steps ({self.steps}) and epochs ({self.epochs}) cannot be negative")
        if self.time_budget < 0:
            raise ConfigError(f"time budget {self.time_budget} minutes cannot be negative")
        if sum(bool(x) for x in (self.steps, self.epochs, self.time_budget)) > 1:
            raise ConfigError(f"give one of --steps ({self.steps}), --epochs ({self.epochs}) "
                              f"or --time-budget ({self.time_budget:g}), not several")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
        if self.views not in VIEWS:
            raise ConfigError(f"unknown views {self.views!r}; choose one of {', '.join(VIEWS)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature {self.temperature} must be positive")
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError(f"learning rate {self.lr} and weight decay {self.weight_decay} cannot be negative")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warm-up fraction {self.warmup_fraction} is not in [0, 1)")
        if self.log_every < 1 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("log_every and keep_checkpoints must be >= 1, checkpoint_every >= 0")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every ({self.eval_every}) cannot be negative")
        if self.eval_every and not self.eval_folder:
            raise ConfigError(f"--eval-every {self.eval_every} needs --eval-folder: a labeled folder to probe")

    def total_steps(self, n_images: int) -> int:
        """Steps to run on a folder of `n_images` (epochs drop the last partial batch).

        With a time budget this is a first guess (the default epochs); pretrain() replaces it once
        it has measured the speed of the compiled step.
        """
        if self.steps:
            return self.steps
        per_epoch = max(1, n_images // self.batch_size)
        return per_epoch * (self.epochs or self.DEFAULT_EPOCHS)

    @classmethod
    def tiny(cls, **overrides: Any) -> TrainConfig:
        """A seconds-long configuration for tests: small encoder, 32 px, batch 8, 3 steps."""
        base = dict(model=ModelConfig(encoder="small", image_size=32), batch_size=8, steps=3, log_every=1)
        base.update(overrides)
        return cls(**base)

    # ---- config.json -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from its JSON form; keys this version does not know (a newer tool's) are left out
        at every level, and missing ones (an older tool's) take their defaults."""
        data = dict(data)
        # A key missing from an older config keeps the default that version trained and embedded with.
        model = _known(ModelConfig, data.pop("model", {}))
        if "stem" not in model and str(model.get("encoder", "")).startswith("resnet"):
            # before 0.3.1: resnet50 took the ImageNet stem from 96 px, resnet18 never
            legacy = model.get("encoder") == "resnet50" and model.get("image_size", 32) >= IMAGENET_STEM_FROM
            model["stem"] = "imagenet" if legacy else "small"
        model = ModelConfig(**{**_BEFORE_0_2_2["model"], **model})
        augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in {**_BEFORE_0_2_2["augment"],
                                                **_known(AugmentConfig, data.pop("augment", {}))}.items()})
        return cls(model=model, augment=augment, **{**_BEFORE_0_2_2["train"], **_known(cls, data)})

    def save(self, path: Path) -> None:
        """Write config.json atomically (a reader sees the old file or the new one)."""
        from .files import write_json_atomic

        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}
