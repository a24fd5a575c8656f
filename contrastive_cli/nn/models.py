"""Flax NNX encoders and SimCLR's projection head.

Images are NHWC float arrays, normalised. `SimCLRModel(x, train=...)` returns (h, z): h the
encoder's features (what `embed` writes), z the projection the loss sees (SimCLR, section 2.1:
"we use a MLP with one hidden layer to obtain z = g(h)").

The first two encoders mirror the peer script in shared/peers exactly, so speed comparisons are like
for like: `small` is 4 x (3x3 conv, BatchNorm, ReLU), strides 1-2-2-2, channels 32-64-128-256, global
average pool; `resnet18` is torchvision's ResNet-18 with the small-image stem (3x3 stride-1 first
convolution, no max-pool), as lightly and SimCLR's CIFAR variant use, below 96 px. `resnet50` is
torchvision's ResNet-50 (SimCLR's standard backbone). Both take torchvision's own ImageNet stem
(7x7/2 conv, 3x3/2 max-pool) from 96 px up (ModelConfig.imagenet_stem).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig, TrainConfig
from . import losses
from .conv import Conv as ConvFn, convolution, xla_conv

# torchvision's ResNet init (kaiming normal, fan_out); BatchNorm momentum 0.1 in PyTorch terms.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


class Conv(nnx.Module):
    """Bias-free square convolution with symmetric zero padding (NHWC x HWIO)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, conv: ConvFn, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_CONV_INIT(rngs.params(), (kernel, kernel, cin, cout), jnp.float32))
        self.stride, self.padding, self.dtype, self.conv = stride, kernel // 2, dtype, conv

    def __call__(self, x):
        return self.conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                         stride=self.stride, padding=self.padding)


def _bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(n, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, dtype=jnp.float32, rngs=rngs)


class ConvBNReLU(nnx.Module):
    def __init__(self, cin, cout, stride, *, conv, dtype, rngs):
        self.conv = Conv(cin, cout, 3, stride, conv=conv, dtype=dtype, rngs=rngs)
        self.bn = _bn(cout, rngs)

    def __call__(self, x, train: bool):
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train).astype(x.dtype))


class SmallCNN(nnx.Module):
    """4 conv layers, 32-64-128-256 channels, strides 1-2-2-2, global average pool -> [B, 256]."""

    features = 256

    def __init__(self, *, conv: ConvFn = xla_conv, dtype=jnp.float32, rngs: nnx.Rngs):
        widths, strides = (3, 32, 64, 128, 256), (1, 2, 2, 2)
        self.layers = nnx.List([ConvBNReLU(widths[i], widths[i + 1], strides[i], conv=conv, dtype=dtype, rngs=rngs)
                                for i in range(4)])

    def feature_map(self, x, train: bool):
        for layer in self.layers:
            x = layer(x, train)
        return x  # [B, H/8, W/8, 256]

    def __call__(self, x, train: bool):
        return grid_pool(self.feature_map(x, train), 1)  # [B, 256] float32


class BasicBlock(nnx.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm; 1x1 projection shortcut on shape change."""

    def __init__(self, cin, cout, stride, *, conv, dtype, rngs):
        self.conv1 = Conv(cin, cout, 3, stride, conv=conv, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(cout, rngs)
        self.conv2 = Conv(cout, cout, 3, 1, conv=conv, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cout, rngs)
        if stride != 1 or cin != cout:
            self.short_conv = Conv(cin, cout, 1, stride, conv=conv, dtype=dtype, rngs=rngs)
            self.short_bn = _bn(cout, rngs)
        else:
            self.short_conv = self.short_bn = None

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura)).astype(x.dtype)
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.short_conv is not None:
            x = self.short_bn(self.short_conv(x), use_running_average=ura)
        return jax.nn.relu(y + x).astype(y.dtype if self.short_conv is None else x.dtype)


class ResNet18(nnx.Module):
    """torchvision ResNet-18 -> [B, 512], with the small-image stem (3x3/1 conv, no max-pool: H/8 at
    the end) or torchvision's ImageNet stem (H/32), as ModelConfig.imagenet_stem picks."""

    features = 512

    def __init__(self, *, conv: ConvFn = xla_conv, dtype=jnp.float32, rngs: nnx.Rngs, imagenet_stem: bool = False):
        self.stem = (ImageNetStem(conv=conv, dtype=dtype, rngs=rngs) if imagenet_stem
                     else ConvBNReLU(3, 64, 1, conv=conv, dtype=dtype, rngs=rngs))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride, conv=conv, dtype=dtype, rngs=rngs),
                       BasicBlock(cout, cout, 1, conv=conv, dtype=dtype, rngs=rngs)]
            cin = cout
        self.blocks = nnx.List(blocks)

    def feature_map(self, x, train: bool):
        x = self.stem(x, train)
        for block in self.blocks:
            x = block(x, train)
        return x  # [B, H/8 or H/32, W/8 or W/32, 512]

    def __call__(self, x, train: bool):
        return grid_pool(self.feature_map(x, train), 1)  # [B, 512] float32


class Bottleneck(nnx.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 at 4x
    the width, BatchNorm after each; 1x1 projection shortcut on shape change."""

    expansion = 4

    def __init__(self, cin, width, stride, *, conv, dtype, rngs):
        cout = width * self.expansion
        self.conv1 = Conv(cin, width, 1, 1, conv=conv, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(width, rngs)
        self.conv2 = Conv(width, width, 3, stride, conv=conv, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(width, rngs)
        self.conv3 = Conv(width, cout, 1, 1, conv=conv, dtype=dtype, rngs=rngs)
        self.bn3 = _bn(cout, rngs)
        if stride != 1 or cin != cout:
            self.short_conv = Conv(cin, cout, 1, stride, conv=conv, dtype=dtype, rngs=rngs)
            self.short_bn = _bn(cout, rngs)
        else:
            self.short_conv = self.short_bn = None

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura)).astype(x.dtype)
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura)).astype(x.dtype)
        y = self.bn3(self.conv3(y), use_running_average=ura)
        if self.short_conv is not None:
            x = self.short_bn(self.short_conv(x), use_running_average=ura)
        return jax.nn.relu(y + x).astype(y.dtype if self.short_conv is None else x.dtype)


class ImageNetStem(nnx.Module):
    """torchvision's stem: 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool (H/4)."""

    def __init__(self, *, conv, dtype, rngs):
        self.conv = Conv(3, 64, 7, 2, conv=conv, dtype=dtype, rngs=rngs)
        self.bn = _bn(64, rngs)

    def __call__(self, x, train: bool):
        x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train).astype(x.dtype))
        # Zero padding is -inf padding here (after the ReLU every window holds a value >= 0), and
        # explicit: jax2onnx's MaxPool dropped the pool's own padding (ONNX features 0.0135 off).
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class ResNet50(nnx.Module):
    """torchvision ResNet-50 (bottlenecks 3-4-6-3, widths 64-128-256-512 x 4) -> [B, 2048], with
    torchvision's ImageNet stem (7x7/2 conv and max-pool: H/32 at the end) or SimCLR's small-image
    stem (3x3/1 conv, no pool: H/8), as ModelConfig.imagenet_stem picks by image size."""

    features = 2048

    def __init__(self, *, conv: ConvFn = xla_conv, dtype=jnp.float32, rngs: nnx.Rngs, imagenet_stem: bool = False):
        self.stem = (ImageNetStem(conv=conv, dtype=dtype, rngs=rngs) if imagenet_stem
                     else ConvBNReLU(3, 64, 1, conv=conv, dtype=dtype, rngs=rngs))
        blocks, cin = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(count):
                blocks.append(Bottleneck(cin, width, stride if b == 0 else 1, conv=conv, dtype=dtype, rngs=rngs))
                cin = width * Bottleneck.expansion
        self.blocks = nnx.List(blocks)

    def feature_map(self, x, train: bool):
        x = self.stem(x, train)
        for block in self.blocks:
            x = block(x, train)
        return x  # [B, H/32 or H/8, W/32 or W/8, 2048]

    def __call__(self, x, train: bool):
        return grid_pool(self.feature_map(x, train), 1)  # [B, 2048] float32


ENCODERS = {"small": SmallCNN, "resnet18": ResNet18, "resnet50": ResNet50}


class ProjectionHead(nnx.Module):
    """lightly's SimCLRProjectionHead: Linear(no bias) -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(din, hidden, use_bias=False, rngs=rngs)
        self.bn = _bn(hidden, rngs)
        self.fc2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, h, train: bool):
        return self.fc2(jax.nn.relu(self.bn(self.fc1(h), use_running_average=not train)))


class LogitScalars(nnx.Module):
    """A loss's learned scalars (SigLIP's t' and b): logits are exp(logit_scale) * cosine + logit_bias.

    0-d parameters: the optimizer's decay mask (ndim > 1) leaves them free of weight decay.
    """

    def __init__(self, logit_scale: float, logit_bias: float):
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(logit_bias, jnp.float32))


class SimCLRModel(nnx.Module):
    """Encoder f and projection head g: x -> (h = f(x), z = g(h)).

    `logit_scalars` (scale, bias): also hold a loss's learned scalars (`self.logit_scalars`, used by
    the train step, not by `__call__`). Only runs with such a loss have them, so the checkpoints of
    the other runs keep their layout.
    """

    def __init__(self, cfg: ModelConfig, *, conv: ConvFn = xla_conv, dtype=jnp.float32, rngs: nnx.Rngs,
                 logit_scalars: tuple[float, float] | None = None):
        stem = {"imagenet_stem": cfg.imagenet_stem} if cfg.encoder.startswith("resnet") else {}
        self.encoder = ENCODERS[cfg.encoder](conv=conv, dtype=dtype, rngs=rngs, **stem)
        width = self.encoder.features
        self.head = ProjectionHead(width, cfg.proj_hidden or width, cfg.proj_dim, rngs=rngs)
        self.logit_scalars = LogitScalars(*logit_scalars) if logit_scalars is not None else None

    def __call__(self, x, *, train: bool):
        h = self.encoder(x, train)  # [B, F] float32
        return h, self.head(h, train)  # [B, F], [B, proj_dim]

    def embed(self, x, grid: int = 1):
        """The features `embed` writes (inference mode): the encoder's last feature map
        average-pooled on a grid x grid grid, cells in row-major order -> [B, grid * grid * F]
        float32. grid 1 is h, the global average the head is trained on (h is the mean of the cells)."""
        return grid_pool(self.encoder.feature_map(x, False), grid)


def grid_pool(fmap, grid: int):
    """Adaptive average pooling of NHWC `fmap` to grid x grid cells (PyTorch's AdaptiveAvgPool2d
    cell bounds: floor(i * H / grid) to ceil((i + 1) * H / grid)), flattened to [B, grid * grid * C]."""
    _, h, w, _ = fmap.shape
    fmap = fmap.astype(jnp.float32)
    if grid == 1:
        return fmap.mean(axis=(1, 2))
    if grid > min(h, w):
        raise ValueError(f"a {grid} x {grid} grid needs a feature map of at least that size, not {h} x {w}")
    rows = [(i * h // grid, -(-(i + 1) * h // grid)) for i in range(grid)]
    cols = [(j * w // grid, -(-(j + 1) * w // grid)) for j in range(grid)]
    return jnp.concatenate([fmap[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols], axis=1)


def feature_dim(cfg: ModelConfig) -> int:
    return ENCODERS[cfg.encoder].features * cfg.embed_grid**2


def resolve_precision(name: str, backend: str | None = None) -> str:
    """`name`, or for "auto" the default for `backend` (default: JAX's): bf16 compute on GPUs and
    TPUs (their matrix units run it at several times float32's rate; parameters, BatchNorm and the
    loss stay float32), float32 on CPUs, where bf16 was no faster for our step (BENCHMARKS.md,
    "Session 10: the train step")."""
    if name != "auto":
        return name
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bf16"


def compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if resolve_precision(cfg.precision) == "bf16" else jnp.float32


def build_model(cfg: TrainConfig, *, conv: str | None = None) -> SimCLRModel:
    """The run's model, initialised from cfg.seed, with the convolution `conv` (default: the one
    cfg.model.conv names) and, for a loss that learns them, the loss's scalars."""
    scalars = (losses.SIGMOID_LOGIT_SCALE, losses.SIGMOID_LOGIT_BIAS) if cfg.loss in losses.LEARNED_SCALARS else None
    return SimCLRModel(cfg.model, conv=convolution(conv or cfg.model.conv), dtype=compute_dtype(cfg),
                       rngs=nnx.Rngs(params=jax.random.key(cfg.seed)), logit_scalars=scalars)
