"""The train step's lowered program kept on disk, so that a repeated run skips tracing (jax.export).

JAX's persistent compilation cache (the CLI's `_enable_compilation_cache`) is keyed by the lowered
program, so it saves XLA's compile but not the Python tracing and lowering that produce the program
in every run, seconds for ResNet-18's step. Here the lowered step is serialized with `jax.export`
under a key of everything that shapes it, and a run with the same key deserializes it and lowers
only a call to it (benchmarks/compile_time.py; BENCHMARKS.md, "Figures moved from the code").

The key: this package's source, the versions of jax, jaxlib, flax and optax, JAX's tracing options,
the run's config (less the fields the step never reads), the state's structure, the shapes and
dtypes of the state and the batch, the devices, and the environment variables read while tracing
(XLA_FLAGS). A file that does not load is traced again and rewritten. Multi-process runs trace
as before. Used when pretrain() is given a `step_cache` folder (the CLI gives `directory()` unless
CONTRASTIVE_STEP_CACHE=0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

import jax
import optax
from flax import nnx

from ..config import TrainConfig
from ..files import cache_dir
from ..mesh import batch_sharding, replicated
from ..train.step import make_step, step_function

_MAGIC = b"contrastive-step 1\n"
# TrainConfig fields the step never reads (the step count lives in the state, "total"), left out of
# the key; tests/test_stepcache.py checks that they leave the lowered program as it is.
_NOT_TRACED = ("steps", "epochs", "time_budget", "log_every", "checkpoint_every", "keep_checkpoints",
               "eval_folder", "eval_every")


def directory() -> Path:
    return cache_dir() / "steps"


def make_cached_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh, state,
                     batch: jax.ShapeDtypeStruct, folder: Path | None = None):
    """`step.make_step`'s step (same arguments and results, donating the state), from `folder`
    (default `directory()`) when a run with the same key traced it before."""
    if jax.process_count() > 1:
        return make_step(cfg, graphdef, tx, mesh)
    treedef = jax.tree.structure(state)
    repl, split = replicated(mesh), batch_sharding(mesh)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl) for a in jax.tree.leaves(state)]
    batch = jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=split)
    path = (folder or directory()) / f"{step_key(cfg, treedef, specs, batch, mesh)}.bin"
    found = _load(path)
    if found is None:
        try:
            found = _export(step_function(cfg, graphdef, tx), treedef, specs, batch, repl, split)
        except _NotExportable:
            return make_step(cfg, graphdef, tx, mesh)
        _save(path, *found)
    exported, names = found
    return _LoadedStep(jax.jit(exported.call, donate_argnums=0), treedef, names)


class _LoadedStep:
    """The exported step, called like `make_step`'s: (state, images) -> (state, outputs)."""

    def __init__(self, call, treedef, names: list[str]):
        self._call, self._treedef, self._names = call, treedef, names

    def __call__(self, state, images):
        leaves, outs = self._call(jax.tree.leaves(state), images)
        return jax.tree.unflatten(self._treedef, leaves), dict(zip(self._names, outs))

    def lower(self, state, images):
        """As a jitted function's `lower` (benchmarks/compile_time.py times the compile with it)."""
        return self._call.lower(jax.tree.leaves(state), images)


def step_key(cfg: TrainConfig, treedef, specs, batch, mesh) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_TRACED}
    env = os.environ.get("XLA_FLAGS", "")  # fastconv's plan reads it while tracing
    parts = [_source_digest(), _versions(), _trace_options(), repr(sorted(fields.items())), str(treedef),
             repr([(s.shape, str(s.dtype)) for s in specs]), repr((batch.shape, str(batch.dtype))),
             repr([(d.platform, d.device_kind, d.id) for d in mesh.devices.flat]), repr(mesh.axis_names), repr(env)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _source_digest() -> str:
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _versions() -> str:
    found = []
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} ?")
    return ", ".join(found)


# JAX's public options that change what tracing produces (jit keys its own cache on these and more).
_TRACE_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                  "jax_threefry_partitionable", "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion",
                  "jax_softmax_custom_jvp")


def _trace_options() -> str:
    return repr([(name, getattr(jax.config, name, None)) for name in _TRACE_OPTIONS])


class _NotExportable(Exception):
    pass


def _export(fn, treedef, specs, batch, repl, split):
    """The step as a function of the state's leaves, lowered and exported; with its output names."""
    names: list[str] = []

    def flat(leaves, images):
        new, outs = fn(jax.tree.unflatten(treedef, leaves), images)
        if jax.tree.structure(new) != treedef:
            raise _NotExportable("the step changed the state's structure")
        names[:] = sorted(outs)
        return jax.tree.leaves(new), [outs[k] for k in names]

    jitted = jax.jit(flat, in_shardings=(repl, split), out_shardings=(repl, repl), donate_argnums=0)
    try:
        exported = jax.export.export(jitted)(specs, batch)
    except (NotImplementedError, ValueError) as e:  # e.g. a custom call that export does not take
        raise _NotExportable(str(e)) from e
    return exported, names


def _save(path: Path, exported, names: list[str]) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) costs only time."""
    try:
        payload = bytes(exported.serialize())
        header = json.dumps({"names": names, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        data = _MAGIC + len(header).to_bytes(4, "little") + header + payload
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent run reads the old file or the new one, whole
    except (OSError, ImportError):  # ImportError: jax.export serializes with the flatbuffers package
        pass


def _load(path: Path):
    try:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            return None
        at = len(_MAGIC)
        size = int.from_bytes(data[at:at + 4], "little")
        header = json.loads(data[at + 4:at + 4 + size])
        payload = data[at + 4 + size:]
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:  # truncated or damaged: never
            return None  # hand such bytes to the native deserializer
        return jax.export.deserialize(bytearray(payload)), header["names"]
    except Exception:  # noqa: BLE001  (missing, truncated or foreign file: trace instead)
        return None
