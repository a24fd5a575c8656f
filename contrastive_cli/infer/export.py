"""A trained encoder written out for use outside this package: ONNX, safetensors, StableHLO.

Every format holds the function `embed` runs: images in, the run's embeddings out (h on the run's
embedding grid, less the run's centre, L2-normalised, whitened; infer/encoder.py), with the preprocessing
(`/ 255`, the run's mean and std) inside, so a user cannot get the normalisation wrong.

    onnx         encoder.onnx: input "images" [B, S, S, 3] uint8 (or float32 in 0..1, or NCHW),
                 output "features" [B, F] float32; dynamic B. Converted by jax2onnx, with XLA's
                 convolution (the speed wing's kernels are CPU-only tricks). Metadata "contrastive"
                 (JSON) says image size, input, layout and the run it came from.
    safetensors  every parameter and BatchNorm statistic of the model (encoder and projection head)
                 plus the centre and whitening, named by their place in the Flax model ("encoder.layers.0.conv.kernel";
                 kernels HWIO, dense [in, out]); the header's metadata "contrastive" holds the
                 architecture (the run's config.json) and what the names mean. `read_safetensors`
                 loads it back into the Flax model.
    stablehlo    jax.export's serialization of the same function with the weights inside, lowered
                 for CPU, CUDA and TPU, batch size symbolic: `jax.export.deserialize(bytes).call(images)`
                 in any JAX program, without this package.

Files are written atomically (a temporary file beside the target, renamed when whole) and never over
an existing file without `force`.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import replace_all, write_temp

FORMATS = ("onnx", "safetensors", "stablehlo")
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "stablehlo": ".stablehlo"}
INPUTS = ("uint8", "float32")  # float32: pixel values in 0..1 (torchvision's ToTensor), not 0..255
PLATFORMS = ("cpu", "cuda", "tpu")  # what a StableHLO export is lowered for
METADATA_KEY = "contrastive"


def default_output(fmt: str) -> Path:
    return Path("encoder" + SUFFIXES[fmt])


def export(run_dir: Path, fmt: str, output: Path | None = None, *, force: bool = False, embed_grid: int = 0,
           input_dtype: str = "uint8", nchw: bool = False, on_warning=None) -> Path:
    """Write the run's encoder to `output` (default ./encoder.<format>) in `fmt` (FORMATS); its path.
    `embed_grid` > 0: that grid instead of the run's; `input_dtype` and `nchw` shape the ONNX
    model's input (other formats take uint8 NHWC). Raises InputError before any work for an
    existing output (without `force`), an unwritable folder or an unknown format."""
    from .encoder import load_encoder

    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r} must be one of {', '.join(FORMATS)}")
    if input_dtype not in INPUTS:
        raise InputError(f"input {input_dtype!r} must be one of {', '.join(INPUTS)}")
    if fmt != "onnx" and (input_dtype != "uint8" or nchw):
        raise InputError("--input and --nchw shape the ONNX model's input; the other formats take uint8 NHWC images")
    output = Path(output) if output is not None else default_output(fmt)
    _check_output(output, force)
    if fmt == "onnx":
        _need_onnx_converter()
    encoder = load_encoder(run_dir, batch_size=1, embed_grid=embed_grid, conv="xla")
    for note in encoder.notes if on_warning is not None else ():
        on_warning(note)
    about = describe(encoder)
    if fmt == "onnx":
        data = onnx_bytes(encoder, input_dtype=input_dtype, nchw=nchw, about=about)
    elif fmt == "safetensors":
        data = safetensors_bytes(encoder, about)
    else:
        data = stablehlo_bytes(encoder)
    replace_all([(write_temp(output, lambda f: f.write(data)), output)])
    return output


def _check_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise InputError(f"{output} is a folder; give a file name for the export")
    if (output.exists() or output.is_symlink()) and not force:
        raise InputError(f"{output} already exists; pass --force to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to the output folder {parent} (read-only or no permission)")


def package_version() -> str:
    """The installed package's version (the package's __init__ is a layer above this one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("contrastive")
    except PackageNotFoundError:
        return "unknown"


def describe(encoder) -> dict:
    """What an exported file says about itself (JSON-able)."""
    cfg = encoder.cfg
    return {"format_version": 1, "contrastive": package_version(), "run": str(Path(encoder.run_dir).resolve()),
            "step": encoder.step, "encoder": cfg.model.encoder, "image_size": cfg.model.image_size,
            "embed_grid": cfg.model.embed_grid, "dim": encoder.dim, "config": cfg.to_json()}


def embedding_function(encoder):
    """uint8 [B, S, S, 3] -> float32 [B, D] unit rows, the weights, centre and whitening inside: `embed`'s function."""
    forward, weights = weighted_function(encoder)
    return lambda images: forward(weights, images)


def weighted_function(encoder):
    """(forward(weights, images), weights): `embedding_function` with its arrays (a list: the
    parameters, BatchNorm statistics, centre and whitening, flattened) as an argument."""
    import jax
    import jax.numpy as jnp

    from .encoder import no_centre, unit_features

    forward = unit_features(encoder.graphdef, encoder.cfg)
    centre = jnp.asarray(encoder.centre if encoder.centre is not None else no_centre(encoder.cfg))
    whitening = None if encoder.whitening is None else tuple(jnp.asarray(w) for w in encoder.whitening)
    leaves, tree = jax.tree.flatten((encoder.params, encoder.stats, centre, whitening))

    def with_weights(weights, images):
        params, stats, centre_, whitening_ = jax.tree.unflatten(tree, weights)
        return forward(params, stats, images, centre_, whitening_)

    return with_weights, leaves


# --- StableHLO -----------------------------------------------------------------------------------

def stablehlo_bytes(encoder, platforms: tuple[str, ...] | None = PLATFORMS, *, weights_inside: bool = True):
    """jax.export's serialization of `embedding_function(encoder)`, batch size symbolic, lowered for
    `platforms` (None: JAX's default backend alone). `weights_inside=False`: of `weighted_function`'s
    forward instead, returned with the weights, (bytes, [arrays]) (the user cache's form: a small
    program that compiles and loads from JAX's cache fast, whatever the size of the weights)."""
    import jax
    import jax.numpy as jnp

    size = encoder.image_size
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    if weights_inside:
        exported = jax.export.export(jax.jit(embedding_function(encoder)), platforms=platforms)(spec)
        return bytes(exported.serialize())
    forward, weights = weighted_function(encoder)
    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(specs, spec)
    return bytes(exported.serialize()), [np.asarray(w) for w in weights]


# --- ONNX ----------------------------------------------------------------------------------------

def _need_onnx_converter() -> None:
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        raise InputError("ONNX export needs jax2onnx: pip install 'contrastive[onnx]'") from None


def onnx_bytes(encoder, *, input_dtype: str = "uint8", nchw: bool = False, about: dict | None = None) -> bytes:
    """The ONNX model of `embedding_function(encoder)` (jax2onnx), input "images", output "features"."""
    import jax
    import jax.numpy as jnp
    import jax2onnx
    import onnx

    embed = embedding_function(encoder)
    size = encoder.image_size
    if input_dtype == "float32":
        def fn(images):  # 0..1 floats -> the 0..255 values the uint8 path normalises (exactly, for k / 255)
            return embed(images * 255.0)
        dtype = jnp.float32
    else:
        fn, dtype = embed, jnp.uint8
    with _quiet_converter():
        model = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct(("batch", size, size, 3), dtype)],
                                 model_name="contrastive_encoder", input_names=["images"],
                                 output_names=["features"], inputs_as_nchw=[0] if nchw else None)
    # jax2onnx 0.17 annotates some intermediate values of a residual block NHWC where its graph holds
    # them NCHW, and ONNX Runtime then refuses ResNet-18 ("Add: Incompatible dimensions"). The
    # annotations are optional hints; without them the runtime infers the shapes itself.
    del model.graph.value_info[:]
    meta = dict(about or {}, input=input_dtype, layout="NCHW" if nchw else "NHWC",
                output="L2-normalised features, as `contrastive embed` writes")
    meta.pop("config", None)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@contextmanager
def _quiet_converter():
    """jax2onnx logs "BatchNorm exported with use_running_average=False; converting to inference
    mode" through the root logger for each layer (our BatchNorm gets the flag at call time, and the
    export is in inference mode). A root logger without handlers would also be given one
    (logging.basicConfig) by that call; neither may outlast the export."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(handler)

    def drop(record: logging.LogRecord) -> bool:
        return "use_running_average" not in record.getMessage()

    root.addFilter(drop)
    try:
        with warnings.catch_warnings():  # jax2onnx 0.17 reads Flax variables through the deprecated `.value`
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="jax2onnx")
            yield
    finally:
        root.removeFilter(drop)
        if added:
            root.removeHandler(handler)


# --- safetensors ---------------------------------------------------------------------------------

def _flat(state, prefix: str) -> dict[str, np.ndarray]:
    from flax import nnx

    return {prefix + ".".join(str(k) for k in path): np.asarray(v[...] if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(state)}


def safetensors_bytes(encoder, about: dict) -> bytes:
    """Parameters ("params." + path), BatchNorm statistics ("stats." + path), "centre" ([G*G*F] or
    [F]) and the whitening ("whiten.mean" [G*G*F], "whiten.matrix" [G*G*F, K])."""
    from safetensors.numpy import save

    tensors = {**_flat(encoder.params, "params."), **_flat(encoder.stats, "stats.")}
    if encoder.centre is not None:
        tensors["centre"] = np.asarray(encoder.centre, np.float32)
    if encoder.whitening is not None:
        tensors["whiten.mean"], tensors["whiten.matrix"] = (np.asarray(w, np.float32) for w in encoder.whitening)
    names = {"params.*": "trainable parameters; conv kernels HWIO, dense kernels [in, out] (Flax layout)",
             "stats.*": "BatchNorm running mean and var (inference mode uses them; epsilon 1e-5)",
             "centre": "float32 [G*G*F] (per embedding-grid cell) or [F] (every cell): subtracted from the features before L2 normalisation (absent: zero)",
             "whiten.*": "then, when present: less whiten.mean, times whiten.matrix, L2-normalised again (the embedding)",
             "images": "NHWC uint8; x / 255, less config.augment.mean, over config.augment.std"}
    meta = {METADATA_KEY: json.dumps(dict(about, names=names))}
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


def read_safetensors(path: Path, *, batch_size: int = 128):
    """An Encoder (infer/encoder.py) from a file `safetensors_bytes` wrote: the Flax model rebuilt
    from its metadata's config, every array set from the file."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx
    from safetensors import safe_open

    from ..config import TrainConfig
    from .encoder import Encoder, _abstract_model

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a safetensors file written by `contrastive export`: {e}") from None
    cfg = TrainConfig.from_json(meta["config"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conv="xla"))
    graphdef, abstract = _abstract_model(cfg)  # shapes only: nothing initialised, then every array from the file
    loaded = []
    for state, prefix in ((abstract["params"], "params."), (abstract["stats"], "stats.")):
        for p, v in nnx.to_flat_state(state):
            name = prefix + ".".join(str(k) for k in p)
            if name not in arrays or arrays[name].shape != v.shape:
                raise InputError(f"{path}: {name} is missing or has another shape than the model's {v.shape}")
            v.set_value(jnp.asarray(arrays[name]))
        loaded.append(state)
    centre = arrays.get("centre")
    whitening = (arrays["whiten.mean"], arrays["whiten.matrix"]) if "whiten.matrix" in arrays else None
    return Encoder(cfg, path, int(meta.get("step", 0)), graphdef, loaded[0], loaded[1], batch_size, centre, whitening)
