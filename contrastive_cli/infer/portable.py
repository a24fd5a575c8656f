"""Encoders that are files, not run directories: `--model encoder.onnx` (ours or any ONNX image
encoder), `encoder.stablehlo` and `encoder.safetensors` (infer/export.py's), and a run's encoder
kept as StableHLO in the user cache, so `similarity` and `neighbors --query` start in about a
second instead of restoring a checkpoint through Orbax and compiling afresh.

Every encoder here offers what the commands use (the Flax `Encoder` of infer/encoder.py does too):
`embed(uint8 [N, S, S, 3]) -> float32 [N, F]` unit rows, `image_size`, `dim`, `step`, `name`,
`source`, `notes`.

An ONNX model that `contrastive export` did not write is read by its input: uint8 is fed 0..255,
float32 gets torchvision's preprocessing (x / 255, less ImageNet's mean, over its std); NCHW when
its second dimension is 3 and its last is not; the image size is the input's when fixed, else 224
(said in `notes`). Its first output, flattened per image, is L2-normalised.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHED_ENCODERS = 8  # run encoders kept in the user cache (each the size of the weights)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class ExportedEncoder:
    """A jax.export function uint8 [B, S, S, 3] -> [B, F] (export.stablehlo_bytes'), or with
    `weights` (a list of arrays) its first argument (the user cache's)."""

    exported: object
    source: str
    step: int | None = None
    name: str = "stablehlo"
    notes: list[str] = field(default_factory=list)
    batch_size: int = 128
    weights: list | None = None

    @property
    def image_size(self) -> int:
        return int(self.exported.in_avals[-1].shape[1])

    @property
    def dim(self) -> int:
        return int(self.exported.out_avals[0].shape[-1])

    def embed(self, images: np.ndarray) -> np.ndarray:
        args = () if self.weights is None else (self.weights,)
        out = [np.asarray(self.exported.call(*args, np.ascontiguousarray(images[i:i + self.batch_size], np.uint8)))
               for i in range(0, len(images), self.batch_size)]
        return _unit(np.concatenate(out)) if out else np.empty((0, self.dim), np.float32)


def read_stablehlo(path: Path, **kw) -> ExportedEncoder:
    import jax

    try:
        exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # flatbuffers' errors for bytes that are not an export
        raise InputError(f"{path} is not a StableHLO export (jax.export): {type(e).__name__}") from None
    shape = exported.in_avals[0].shape if len(exported.in_avals) == 1 else ()
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
        raise InputError(f"{path}: expected one input of uint8 images [B, S, S, 3], found {exported.in_avals}")
    return ExportedEncoder(exported, str(path), **kw)


class OnnxEncoder:
    """An ONNX image encoder run by ONNX Runtime (see the module docstring for how it is fed)."""

    name = "onnx"

    def __init__(self, path: Path, *, batch_size: int = 128):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("running an ONNX model needs ONNX Runtime: pip install 'contrastive[onnx]'") from None
        self.source, self.notes, self.batch_size = str(path), [], batch_size
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its shape-merge warnings are about hints, not results
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types; a file that is not ONNX
            raise InputError(f"cannot load the ONNX model {path}: {str(e).splitlines()[0][:200]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        self.about = json.loads(meta["contrastive"]) if "contrastive" in meta else {}
        self.step = self.about.get("step")
        spec = self._session.get_inputs()[0]
        self._input = spec.name
        shape = list(spec.shape)
        if len(shape) != 4:
            raise InputError(f"ONNX model {path}: its input {spec.name} has shape {shape}, not images [B, H, W, C]")
        self._nchw = self.about.get("layout") == "NCHW" if self.about else (shape[1] == 3 and shape[3] != 3)
        side = shape[2] if self._nchw else shape[1]
        if isinstance(side, int) and side > 0:
            self.image_size = side
        elif "image_size" in self.about:
            self.image_size = int(self.about["image_size"])
        else:
            self.image_size = 224
            self.notes.append(f"ONNX model {path} does not fix its image size; using 224 x 224")
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self._dtype = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}.get(spec.type)
        if self._dtype is None:
            raise InputError(f"ONNX model {path}: input type {spec.type}; uint8 or float images are supported")
        self._ours = bool(self.about)
        self.dim = int(np.prod(self.embed(np.zeros((1, self.image_size, self.image_size, 3), np.uint8)).shape[1:]))

    def _feed(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.uint8)
        if self._dtype == np.float32:
            x = x.astype(np.float32) / 255.0
            if not self._ours:
                x = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        if self._nchw:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def embed(self, images: np.ndarray) -> np.ndarray:
        step = self._fixed_batch or self.batch_size
        out = []
        for i in range(0, len(images), step):
            chunk = images[i:i + step]
            n = len(chunk)
            if self._fixed_batch and n < step:  # a model exported for one batch size: pad the last
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(_unit(self._session.run(None, {self._input: self._feed(chunk)})[0])[:n])
        return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def embed_files(encoder, paths: list[Path]) -> np.ndarray:
    """float32 [len(paths), F]: image files embedded with `encoder` (any here, or a Flax Encoder),
    decoded as `embed` decodes them; InputError naming the first that cannot be read."""
    from ..data.decode import decode_or_reason, quiet_pillow

    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"image not found: {p}")
        with quiet_pillow():
            out = decode_or_reason(p, encoder.image_size)
        if isinstance(out, str):
            raise InputError(f"cannot read {p}: {out}")
        images.append(out)
    return encoder.embed(np.stack(images))


def load_model(model: Path, *, batch_size: int = 128, conv: str | None = None, quick: bool = False):
    """The encoder `--model` names: a run directory (infer/encoder.load_encoder; `quick`: from the
    user cache when it holds this run's checkpoint, see `load_run_quickly`), or an .onnx,
    .stablehlo or .safetensors file."""
    model = Path(model)
    if model.is_file() or model.suffix in (".onnx", ".stablehlo", ".safetensors"):
        if not model.is_file():
            raise InputError(f"model file not found: {model}")
        if model.suffix == ".onnx":
            return OnnxEncoder(model, batch_size=batch_size)
        if model.suffix == ".stablehlo":
            return read_stablehlo(model, batch_size=batch_size)
        if model.suffix == ".safetensors":
            from .export import read_safetensors

            return read_safetensors(model, batch_size=batch_size)
        raise InputError(f"model {model} is a file; give a run directory or an .onnx, .stablehlo or "
                         ".safetensors file (contrastive export)")
    if quick:
        return load_run_quickly(model, batch_size=batch_size)
    from .encoder import load_encoder

    return load_encoder(model, batch_size=batch_size, conv=conv)


# --- a run's encoder, cached as StableHLO --------------------------------------------------------

def _cache_key(run_dir: Path) -> tuple[str, int] | None:
    """(key, step) of the run's newest checkpoint, from its config, the step's digest.json and the
    size and mtime of each file the encoder reads; None when the step has no digest (nothing to
    tie a cached copy to)."""
    from ..checkpoint import CENTRE_ITEM, DIGEST, MODEL_ITEM, checkpoint_dir, saved_steps

    steps = saved_steps(run_dir)
    if not steps:
        return None
    where = checkpoint_dir(run_dir) / str(steps[-1])
    h = hashlib.sha256()
    try:
        h.update(str(Path(run_dir).resolve()).encode())
        h.update((Path(run_dir) / "config.json").read_bytes())
        h.update((where / DIGEST).read_bytes())
        for item in (MODEL_ITEM, CENTRE_ITEM):
            for p in sorted((where / item).rglob("*")):
                st = p.stat()
                h.update(f"{p.relative_to(where)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    from .export import package_version

    h.update(package_version().encode())
    return h.hexdigest()[:32], steps[-1]


def _cache_folder() -> Path:
    from ..files import cache_dir

    return cache_dir() / "encoders"


def load_run_quickly(run_dir: Path, *, batch_size: int = 128):
    """The run's encoder as `load_encoder` gives it, from the user cache when the cache holds the
    newest checkpoint's (no Orbax, no Flax, a compiled program JAX's cache may hold); else loaded
    from the checkpoint, and cached when the newest step was the one read. The cached copy is
    tied to the run's config and the checkpoint files' sizes and times: any change, and the
    checkpoint is read (and checked against its digest) again. CONTRASTIVE_ENCODER_CACHE=0: never cached."""
    import jax

    from ..checkpoint import read_config

    run_dir = Path(run_dir)
    read_config(run_dir)  # the run directory's own errors first
    found = _cache_key(run_dir) if os.environ.get("CONTRASTIVE_ENCODER_CACHE", "1") != "0" else None
    if found is not None:
        key, step = found
        program, weights = _entry(key)
        try:
            from safetensors.numpy import load_file

            exported = jax.export.deserialize(bytearray(program.read_bytes()))
            arrays = load_file(weights)
            name = json.loads((Path(run_dir) / "config.json").read_text())["model"]["encoder"]
            os.utime(program)  # recently used: kept when the cache is pruned
            return ExportedEncoder(exported, str(run_dir), step, name, batch_size=batch_size,
                                   weights=[arrays[str(i)] for i in range(len(arrays))])
        except Exception:  # not cached yet, or damaged: read the checkpoint
            pass
    from .encoder import load_encoder

    # XLA's convolution: the speed wing's kernels split the batch by its size, which a program for
    # any batch size does not know (the same maths, to float rounding)
    encoder = load_encoder(run_dir, batch_size=batch_size, conv="xla")
    if found is not None and encoder.step == found[1] and not encoder.notes:
        _store(encoder, *_entry(found[0]))
    return encoder


def _entry(key: str) -> tuple[Path, Path]:
    """The cache's files for `key`: the program (StableHLO) and its weights (safetensors)."""
    folder = _cache_folder()
    return folder / f"{key}.stablehlo", folder / f"{key}.safetensors"


def _store(encoder, program: Path, weights: Path) -> None:
    """Write a cache entry (weights first, each file atomically; the program last, which makes the
    entry) and keep the CACHED_ENCODERS newest; a cache that cannot be written (read-only, full)
    only costs speed."""
    from safetensors.numpy import save

    from ..files import write_atomic
    from .export import stablehlo_bytes

    try:
        program.parent.mkdir(parents=True, exist_ok=True)
        data, arrays = stablehlo_bytes(encoder, platforms=None, weights_inside=False)  # the backend in use
        blob = save({str(i): np.ascontiguousarray(a) for i, a in enumerate(arrays)})
        write_atomic(weights, lambda f: f.write(blob))
        write_atomic(program, lambda f: f.write(data))
        entries = sorted(program.parent.glob("*.stablehlo"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[CACHED_ENCODERS:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)
    except Exception:
        pass
