"""The `contrastive` command. The only module that imports typer; every command is thin:
parse options -> build a config -> call one library function -> render the result.

Library modules (and JAX) are imported inside the commands, so `contrastive --help` is instant. The
commands that train or embed switch on process-wide settings first (`_heavy_command`); nothing else
in the package changes the process.

Signals: while a command runs, SIGINT and SIGTERM are recorded and raise KeyboardInterrupt in the
main thread (`_on_signal`); the command then ends with one line and exit 130 (SIGTERM: 143). A
KeyboardInterrupt that something swallows (Python prints "Exception ignored" for one raised in a
garbage-collection callback) still ends the command that way, since the signal is recorded: nothing
is written or printed as a result after it (`_run`, embed's `stop`). train/guards.py's SignalFlag
replaces the handler during training steps and puts it back after.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import console
from .config import (
    CONV_CHOICES,
    EMBEDDING_DTYPES,
    ENCODERS,
    LOSSES,
    OPTIMIZERS,
    PRECISION_CHOICES,
    VIEWS,
    AugmentConfig,
    ModelConfig,
    TrainConfig,
)
from .errors import ContrastiveError


class _FlagsWithoutType:
    """Typer's Rich help shows `<bool>` beside every flag (--help, --force, ...), which takes no
    value; give flags an empty type label instead."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_FlagsWithoutType, typer.core.TyperGroup):
    def invoke(self, ctx):
        """Run the command with the signal handlers on; an interrupt (raised, or recorded and
        swallowed) is one line and exit 130/143, never "Aborted!" with exit 1 or success."""
        if not _AS_COMMAND:
            _signals.update(received=0, stopping=False)  # CliRunner: each invocation starts afresh
        with _signal_handlers():
            try:
                if _signals["received"]:  # arrived while the arguments were parsed
                    raise KeyboardInterrupt
                result = super().invoke(ctx)
            except KeyboardInterrupt:
                raise _interrupted() from None
            except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors, exit codes
                raise
            except Exception:
                if _signals["received"]:  # e.g. ImportError from an extension interrupted while it loads
                    raise _interrupted() from None
                raise
            if _signals["received"]:
                raise _interrupted()
            return result


class _Command(_FlagsWithoutType, typer.core.TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    help="Learn image representations from folders of unlabeled images (contrastive self-supervised "
         "learning on JAX), then embed and compare images with them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# The choice lists are config.py's, defined once.
Encoder = Enum("Encoder", {n: n for n in ENCODERS}, type=str)
Loss = Enum("Loss", {n: n for n in LOSSES}, type=str)
Optimizer = Enum("Optimizer", {n: n for n in OPTIMIZERS}, type=str)
Precision = Enum("Precision", {n: n for n in PRECISION_CHOICES}, type=str)
Views = Enum("Views", {n: n for n in VIEWS}, type=str)
Conv = Enum("Conv", {n: n for n in CONV_CHOICES}, type=str)
DType = Enum("DType", {n: n for n in EMBEDDING_DTYPES}, type=str)

# True when the process was started as the `contrastive` command (main()), not by a caller of
# `app` (tests' CliRunner): only then may a command change the process (malloc, re-exec, flags).
_AS_COMMAND = False

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# received: the first SIGINT/SIGTERM (0: none); stopping: the command is already ending for it.
_signals = {"received": 0, "stopping": False}


def _on_signal(signum, frame):
    _signals["received"] = _signals["received"] or signum
    if not _signals["stopping"]:  # once the command is ending, a second Ctrl-C must not cut its last line
        raise KeyboardInterrupt


def _signal_seen() -> bool:
    return bool(_signals["received"])


def _quiet_unraisable(hook):
    """sys.unraisablehook that drops a KeyboardInterrupt (the signal is recorded; the command ends
    for it) instead of printing "Exception ignored in ..." with a traceback, and asyncio's "Event
    loop is closed": TensorStore's callbacks of a failed Orbax save, arriving after Orbax closed
    their loop (hundreds of tracebacks after a disk-full save, whose error is already one line)."""

    def unraisable(info):
        if isinstance(info.exc_type, type) and issubclass(info.exc_type, KeyboardInterrupt):
            return
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            return
        hook(info)

    return unraisable


def _quiet_excepthook(hook):
    """sys.excepthook that prints no KeyboardInterrupt: a C extension interrupted while it loads
    prints its error through this hook (PyErr_Print), then raises ImportError, which ends the
    command as interrupted."""

    def excepthook(exc_type, exc, tb):
        if not (isinstance(exc_type, type) and issubclass(exc_type, KeyboardInterrupt)):
            hook(exc_type, exc, tb)

    return excepthook


def _quiet_hooks() -> tuple:
    """Install the quiet hooks; the previous (unraisablehook, excepthook) to put back."""
    old = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _quiet_unraisable(old[0]), _quiet_excepthook(old[1])
    return old


@contextmanager
def _signal_handlers():
    """_on_signal for SIGINT/SIGTERM in the main thread, the previous handlers back afterwards."""
    if not _in_main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in _STOP_SIGNALS}
    hooks = _quiet_hooks()
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = hooks
        for s, h in old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupted() -> typer.Exit:
    """Report the interrupt (one line) and return the Exit to raise: 128 + the signal's number."""
    _signals["stopping"] = True
    signum = _signals["received"] or signal.SIGINT
    console.error("interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}")
    return typer.Exit(128 + signum)


def _heavy_command(*, check_backend: bool = True) -> None:
    """Process-wide settings for a command that compiles and runs the model (pretrain, embed,
    evaluate): the CPU speed wing (perf.switch_on), JAX's persistent compilation cache, and Orbax's
    INFO logging silenced. Called first in those commands, before NumPy or JAX start.

    SIGINT and SIGTERM are held (blocked) meanwhile and delivered after: a KeyboardInterrupt raised
    inside a native extension's import (jaxlib's nanobind, TensorStore's pybind11) aborts the
    process with a C++ `terminate` instead of one line. The mask and pending signals survive the
    perf re-exec; main() delivers them in the new process once its handler is in place."""
    with _signals_held():
        if _AS_COMMAND:
            try:
                from . import perf
            except ImportError:  # the wing is not installed: the same results, slower
                perf = None
            if perf is not None:
                perf.switch_on(reexec=True)
        import logging

        if not os.environ.get("CONTRASTIVE_DEBUG"):
            # Orbax reports every save through absl at INFO, and a failed save as a traceback per
            # thread, some after the command has reported it (as one CheckpointError line).
            for name in ("absl", "asyncio"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        _enable_compilation_cache(check_backend=check_backend)  # imports JAX
        try:
            import orbax.checkpoint  # noqa: F401  (TensorStore: native, like jaxlib)
        except ImportError:
            pass


@contextmanager
def _signals_held():
    held = _in_main_thread() and hasattr(signal, "pthread_sigmask")
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _check_backend() -> None:
    """JAX_PLATFORMS naming a backend this machine lacks (cuda without a GPU, tpu without libtpu)
    is one line naming the backends it has, not JAX's AssertionError at the first array."""
    wanted = os.environ.get("JAX_PLATFORMS", "")
    if not wanted:
        return
    import jax

    try:
        jax.devices()
        return
    except Exception as e:  # RuntimeError ("Unable to initialize backend"), AssertionError (no backend at all)
        why = str(e).split(" (set JAX_PLATFORMS", 1)[0].strip() or "not installed, or no such device"
    import subprocess

    probe = subprocess.run([sys.executable, "-c", "import jax; print(' '.join(sorted({d.platform for d in jax.devices()})))"],
                           env={**os.environ, "JAX_PLATFORMS": ""}, capture_output=True, text=True)
    have = probe.stdout.strip() or "none found"
    console.error(f"JAX_PLATFORMS={wanted} names a backend this machine cannot start ({why}); "
                  f"backends here: {have} (unset JAX_PLATFORMS to use the best of them)")
    raise typer.Exit(1)


def _enable_compilation_cache(min_compile_secs: float = 0.5, *, check_backend: bool = True) -> None:
    """Compiled programs are reused across runs: a second `pretrain` starts in seconds, not tens.
    Programs that compiled faster than `min_compile_secs` are not kept (0 for the quick commands,
    `similarity` and `neighbors --query`, whose whole run is about one compile). `check_backend`:
    first `_check_backend`, which starts JAX's backends (not before a multi-process run joins)."""
    import jax

    from .files import cache_dir

    if check_backend:
        _check_backend()
    if jax.config.jax_compilation_cache_dir:
        return  # already set (by the user, or by tests/conftest.py)
    path = cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: compile every time rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)


def _step_cache():
    """Where pretrain keeps traced train steps (perf/stepcache.py); None without the speed wing or
    with CONTRASTIVE_STEP_CACHE=0."""
    if os.environ.get("CONTRASTIVE_STEP_CACHE", "1") == "0":
        return None
    try:
        from .perf import stepcache
    except ImportError:
        return None
    return stepcache.directory()


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"contrastive {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Learn image representations from folders of unlabeled images (contrastive self-supervised
    learning on JAX), then embed and compare images with them."""


def _range(lo: float | None, hi: float | None):
    """A callback that rejects numbers outside [lo, hi] with a usage error that shows the value
    (Typer's own min=/max= messages leave the value out)."""

    def check(value):
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not valid: it must be a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"at least {lo:g}" if hi is None else f"at most {hi:g}" if lo is None else f"in {lo:g}..{hi:g}"
            raise typer.BadParameter(f"{value:g} is not valid: it must be {bounds}")
        return value

    return check


def _folder(path: Path, param: str) -> Path:
    """A file where a folder is expected is a usage error (exit 2); a missing folder is exit 1."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a folder", param_hint=param)
    return path


def _run(fn, *args, **kwargs):
    """Call a library function; turn its errors into one line on stderr and an exit code.

    A signal recorded while it ran (and swallowed somewhere) ends the command too: its result is
    not rendered."""
    try:
        result = fn(*args, **kwargs)
    except ContrastiveError as e:
        console.error(str(e))
        raise typer.Exit(getattr(e, "exit_code", 1)) from None
    except KeyboardInterrupt:
        raise _interrupted() from None
    except MemoryError:
        console.error("out of memory; try a smaller --batch-size or --image-size")
        raise typer.Exit(1) from None
    except OSError as e:  # disk full, quota, read-only folder, ...: the file and the reason
        if _signals["received"]:
            raise _interrupted() from None
        console.error(_os_error(e))
        raise typer.Exit(1) from None
    except Exception:
        if _signals["received"]:  # whatever the interrupt turned into on its way out
            raise _interrupted() from None
        raise
    if _signals["received"]:
        raise _interrupted()
    return result


def _os_error(e: OSError) -> str:
    from .files import WriteError

    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    return f"{'cannot write' if isinstance(e, WriteError) else 'error with'} {e.filename}: {reason}"


@app.command(cls=_Command)
def pretrain(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively; labels not needed).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory. Default: a new folder under ./runs/.")] = None,
    steps: Annotated[int, typer.Option(callback=_range(0, None), help="Training steps (one batch each). Give this or --epochs.")] = 0,
    epochs: Annotated[int, typer.Option(callback=_range(0, None), help=f"Passes over the folder. Default: {TrainConfig.DEFAULT_EPOCHS} when --steps is not given.")] = 0,
    time_budget: Annotated[float, typer.Option("--time-budget", callback=_range(0.0, None), help="Train for this many minutes of wall-clock time instead (the step count and learning-rate schedule follow the measured speed).")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", callback=_range(2, None), help="Images per step; each gives a positive pair, all others are negatives.")] = TrainConfig.batch_size,
    image_size: Annotated[int, typer.Option(callback=_range(16, 1024), help="Side of the square views the encoder sees, in pixels.")] = ModelConfig.image_size,
    encoder: Annotated[Encoder, typer.Option(help="Encoder network. 'small' (4 conv layers, default: fast on a laptop CPU), 'resnet18' (small-image stem; much slower on CPU, better on GPU; speeds in BENCHMARKS.md) or 'resnet50' (torchvision's ResNet-50, SimCLR's backbone; ImageNet stem from --image-size 96 up, small-image stem below; for accelerators).")] = Encoder(ModelConfig.encoder),
    loss: Annotated[Loss, typer.Option(help="ntxent: SimCLR's NT-Xent (default, best kNN accuracy in our benchmark); cosine: pairwise cosine (positives to 1, negatives to 0); dcl: decoupled contrastive (NT-Xent without the positive in the denominator); sigmoid: SigLIP's pairwise sigmoid with a learned scale and bias.")] = Loss(TrainConfig.loss),
    temperature: Annotated[float, typer.Option(callback=_range(1e-4, None), help="Temperature of ntxent and dcl.")] = TrainConfig.temperature,
    lr: Annotated[float, typer.Option(callback=_range(0.0, None), help="Peak learning rate. Default: scaled with the batch size for the optimizer.")] = 0.0,
    optimizer: Annotated[Optimizer, typer.Option(help="Optimizer (warm-up then cosine decay).")] = Optimizer(TrainConfig.optimizer),
    weight_decay: Annotated[float, typer.Option(callback=_range(0.0, None), help="Weight decay (not on biases and norms).")] = TrainConfig.weight_decay,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and augmentation.")] = 0,
    precision: Annotated[Precision, typer.Option(help="Compute precision: auto (bf16 on GPU/TPU, float32 on CPU; config.json records which ran), float32 or bf16. bf16 keeps parameters, BatchNorm and the loss in float32.")] = Precision(TrainConfig.precision),
    embed_grid: Annotated[int, typer.Option("--embed-grid", callback=_range(0, None), help="Embeddings (embed, evaluate, similarity, search, the --eval-folder probe) average-pool the encoder's last feature map on a G x G grid, then are whitened to 512 dimensions (accuracy by G in BENCHMARKS.md). Training is the same whatever G: the projection head sees the global average. 1: global average pooling; 0 (default): the finest grid up to 4 x 4 that the feature map holds, within 8,192 features.")] = ModelConfig.embed_grid,
    views: Annotated[Views, typer.Option(help="How the two views go through the encoder: concat (one pass, BatchNorm statistics over both views, as SimCLR) or separate (one pass per view, statistics per view, as lightly's examples; faster for resnet18 on CPU, see BENCHMARKS.md).")] = Views(TrainConfig.views),
    log_every: Annotated[int, typer.Option(callback=_range(1, None), help="Log metrics every N steps.")] = TrainConfig.log_every,
    checkpoint_every: Annotated[int, typer.Option(callback=_range(0, None), help="Save a checkpoint every N steps (0: at the end only).")] = 0,
    eval_folder: Annotated[Path | None, typer.Option("--eval-folder", help="Labeled folder (one subfolder per class): log the kNN accuracy of the current encoder on it (`knn` in metrics.jsonl) every --eval-every steps and at the end.")] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", callback=_range(0, None), help="Steps between kNN probes on --eval-folder (0: at the end only).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint (its config.json is used).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run in --output.")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Keep decoded images in the user cache directory, so later runs on the folder skip decoding.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    coordinator: Annotated[str | None, typer.Option(help="Multi-process (multi-host) training: HOST:PORT where process 0 listens. Every process runs the same command with the same FOLDER and --output (shared storage) and its own --process-id. Without these options, a SLURM or mpirun launch is detected.")] = None,
    num_processes: Annotated[int | None, typer.Option(callback=_range(1, None), help="Multi-process training: how many processes (with --coordinator).")] = None,
    process_id: Annotated[int | None, typer.Option(callback=_range(0, None), help="Multi-process training: this process's id, 0 to N-1; process 0 writes metrics and shows progress.")] = None,
    join_timeout: Annotated[float, typer.Option("--join-timeout", callback=_range(1.0, None), help="Multi-process training: seconds to wait for every process to join before giving up with one line.")] = 300.0,
    conv: Annotated[Conv, typer.Option(help="Convolution kernels: auto (the CPU speed wing's on CPU, XLA's elsewhere), xla, im2col or winograd. The same maths; config.json records which ran.")] = Conv("auto"),
    crop_min_scale: Annotated[float, typer.Option("--crop-min-scale", callback=_range(0.01, 1.0), rich_help_panel="Augmentation (SimCLR defaults)", help="Smallest crop, as a fraction of the image area.")] = AugmentConfig.crop_scale[0],
    flip_p: Annotated[float, typer.Option("--flip-p", callback=_range(0.0, 1.0), rich_help_panel="Augmentation (SimCLR defaults)", help="Probability of a horizontal flip.")] = AugmentConfig.flip_p,
    jitter_p: Annotated[float, typer.Option("--jitter-p", callback=_range(0.0, 1.0), rich_help_panel="Augmentation (SimCLR defaults)", help="Probability of colour jitter.")] = AugmentConfig.jitter_p,
    jitter_strength: Annotated[float, typer.Option("--jitter-strength", callback=_range(0.0, 1.25), rich_help_panel="Augmentation (SimCLR defaults)", help="SimCLR's colour strength s: brightness, contrast, saturation 0.8s, hue 0.2s.")] = 1.0,
    gray_p: Annotated[float, typer.Option("--gray-p", callback=_range(0.0, 1.0), rich_help_panel="Augmentation (SimCLR defaults)", help="Probability of grayscale.")] = AugmentConfig.gray_p,
    blur_p: Annotated[float, typer.Option("--blur-p", callback=_range(0.0, 1.0), rich_help_panel="Augmentation (SimCLR defaults)", help="Probability of Gaussian blur (sigma 0.1-2, kernel ~10% of the side).")] = AugmentConfig.blur_p,
) -> None:
    """Train an encoder on augmented view pairs of the images in FOLDER; write a run directory."""
    _folder(folder, "FOLDER")
    if eval_folder is not None:
        _folder(eval_folder, "--eval-folder")
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output RUN_DIR", param_hint="--resume")
    if sum(bool(x) for x in (steps, epochs, time_budget)) > 1:
        raise typer.BadParameter(f"give one of --steps ({steps}), --epochs ({epochs}) or --time-budget "
                                 f"({time_budget:g}), not several", param_hint="--steps")

    def build():
        return TrainConfig(
            model=ModelConfig(encoder=encoder.value, image_size=image_size, embed_grid=embed_grid, conv=conv.value), augment=AugmentConfig(
                crop_scale=(crop_min_scale, 1.0), flip_p=flip_p, jitter_p=jitter_p,
                brightness=0.8 * jitter_strength, contrast=0.8 * jitter_strength,
                saturation=0.8 * jitter_strength, hue=0.2 * jitter_strength, gray_p=gray_p, blur_p=blur_p),
            batch_size=batch_size, steps=steps, epochs=epochs, time_budget=time_budget, loss=loss.value, temperature=temperature,
            optimizer=optimizer.value, lr=lr, weight_decay=weight_decay, seed=seed,
            precision=precision.value, views=views.value, log_every=log_every, checkpoint_every=checkpoint_every,
            eval_folder=str(eval_folder.resolve()) if eval_folder else "", eval_every=eval_every)

    cfg = _run(build)
    _heavy_command(check_backend=False)
    from .mesh import launcher_present

    if coordinator is None and not launcher_present():  # it starts JAX's devices: not before a run joins
        _check_backend()
    from .train.loop import pretrain as run_pretrain

    display = console.TrainDisplay(quiet=quiet)
    try:
        summary = _run(run_pretrain, folder, cfg, output, resume=resume, force=force, monitor=display, cache=cache,
                       coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                       join_timeout=join_timeout, step_cache=_step_cache())
    finally:
        display.close()
    typer.echo(summary["output"])  # stdout: the run directory, for scripts


@app.command(cls=_Command)
def embed(
    folder: Annotated[Path, typer.Argument(help="Folder of images to embed (recursive).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `contrastive pretrain`, or an exported encoder: .stablehlo, .safetensors, or .onnx (ours or any ONNX image encoder; needs contrastive[onnx]).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Embeddings file (.npy); the index goes beside it as .json.")] = Path("embeddings.npy"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", callback=_range(1, None), help="Images per forward pass.")] = 128,
    dtype: Annotated[DType, typer.Option(help="Stored dtype; float16 halves the file.")] = DType(EMBEDDING_DTYPES[0]),
    force: Annotated[bool, typer.Option("--force", help="Embed everything again and replace an existing OUTPUT. Without it, an OUTPUT embedded from FOLDER by the same model, step and settings is brought up to date (only new or changed files are embedded, removed ones dropped); any other existing OUTPUT is an error.")] = False,
) -> None:
    """Embed every image in FOLDER to OUTPUT (.npy, float [N, D], unit rows) with an index (.json).

    Run again on the same folder, it updates OUTPUT: only files added or changed since are embedded."""
    _folder(folder, "FOLDER")
    _heavy_command()
    from .infer.embed import embed_folder, index_path

    progress = console.DecodeProgress("embedding")
    try:
        index = _run(embed_folder, folder, model, output, force=force, dtype=dtype.value,
                     batch_size=batch_size, conv="auto", on_progress=progress, stop=_signal_seen,
                     on_warning=console.warn)
    finally:
        progress.close()
    if index["skipped"]:
        console.warn(f"left out {len(index['skipped'])} unreadable file(s): "
                     + "; ".join(f"{s['path']}: {s['reason']}" for s in index["skipped"][:3])
                     + (" ..." if len(index["skipped"]) > 3 else "") + f" (listed in {index_path(output)})")
    if "update" in index:
        u = index["update"]
        done = (f"up to date: {output} already holds these {u['reused']} images" if not (u["embedded"] or u["removed"])
                else f"updated {output}: kept {u['reused']} rows, embedded {u['embedded']} new or changed "
                     f"images, dropped {u['removed']} removed")
        console.info(f"{done} [{len(index['paths'])} x {index['dim']}, {index['dtype']}]")
    else:
        console.info(f"embedded {len(index['paths'])} images -> {output} [{len(index['paths'])} x {index['dim']}, "
                     f"{index['dtype']}], index {index_path(output)}")
    typer.echo(str(output))


@app.command(cls=_Command)
def similarity(
    a: Annotated[Path | None, typer.Argument(help="First image.", show_default=False)] = None,
    b: Annotated[Path | None, typer.Argument(help="Second image.", show_default=False)] = None,
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `contrastive pretrain`, or an exported encoder file (.onnx, .stablehlo, .safetensors).")] = ...,
    pairs: Annotated[str | None, typer.Option("--pairs", metavar="FILE", help="Score many pairs in one process: a file (or - for stdin) of lines 'A B' (a tab between the paths, or quote paths with spaces; # comments). One score per line, in order; a pair with an unreadable image prints nan, is named on stderr, and the command exits 1 after the rest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object (one per pair) instead of the bare number.")] = False,
) -> None:
    """Print the cosine similarity (-1..1) of two images' embeddings on stdout."""
    if pairs is None and (a is None or b is None):
        raise typer.BadParameter("give two images, or --pairs FILE", param_hint="A B")
    if pairs is not None and (a is not None or b is not None):
        raise typer.BadParameter("give two images or --pairs FILE, not both", param_hint="--pairs")
    _enable_compilation_cache(0.0)
    if pairs is not None:
        return _similarity_pairs(pairs, model, as_json)
    from .infer.embed import similarity as run_similarity

    value = _run(run_similarity, a, b, model, on_warning=console.warn)
    if as_json:
        typer.echo(json.dumps({"a": str(a), "b": str(b), "model": str(model), "similarity": value}))
    else:
        typer.echo(f"{value:.6f}")


def _similarity_pairs(source: str, model: Path, as_json: bool) -> None:
    from .infer.embed import read_pairs, similarity_pairs

    if source == "-":
        pairs = _run(read_pairs, sys.stdin, "stdin")
    else:
        try:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:
                pairs = _run(read_pairs, f, source)
        except OSError as e:
            console.error(f"cannot read the pairs file: {_os_error(e)}")
            raise typer.Exit(1) from None
    scores = _run(similarity_pairs, pairs, model, on_warning=console.warn)
    for (pa, pb), value in zip(pairs, scores):
        if as_json:
            typer.echo(json.dumps({"a": pa, "b": pb, "model": str(model), "similarity": value}))
        else:
            typer.echo("nan" if value is None else f"{value:.6f}")
    if any(v is None for v in scores):
        raise typer.Exit(1)


def _format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise typer.BadParameter("give --json or --csv, not both", param_hint="--json")
    return "json" if as_json else "csv" if as_csv else "text"


def _csv(header: list[str], rows: list[list]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


_EXACT_HELP = "Exact search whatever the file's size (streams every row; no index is used or built)."
_NPROBE_HELP = ("Approximate search: index cells scanned per query (more: higher recall, slower). "
                "0: the index's default (16).")


def _searched(search: dict) -> str:
    """How a result was found, for the summary line."""
    if search["method"] == "exact":
        return "exact search"
    return f"approximate search: faiss {search['index']}, nprobe {search['nprobe']}; --exact for the exact one"


@app.command(cls=_Command)
def index(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings (.npy) written by `contrastive embed`, with its index (.json) beside it.")],
    nlist: Annotated[int, typer.Option("--nlist", callback=_range(0, None), help="Cells of the inverted file (k-means centroids). 0: from the row count, the power of two nearest 4 sqrt(N) (1M rows: 4096).")] = 0,
    nprobe: Annotated[int, typer.Option("--nprobe", callback=_range(0, None), help="Cells a query scans by default (neighbors/duplicates --nprobe override it). 0: 16.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a file at EMB.ann that contrastive did not write.")] = False,
) -> None:
    """Build the approximate nearest-neighbour index (faiss IVF, float16 rows) of EMB.npy as EMB.ann.

    Tied to the embeddings it was built from: once they change, searches say so and build it again.
    `neighbors` and `duplicates` build it on first use for files of 50,000 rows or more; this
    command builds it ahead, or with other parameters. Prints the index's path.
    """
    from .infer.find import make_index

    result = _run(make_index, embeddings, nlist=nlist, nprobe=nprobe, force=force, on_info=console.info)
    for message in result["warnings"]:
        console.warn(message)
    h = result["header"]
    console.info(f"{'built' if result['built'] else 'up to date:'} {result['path']} [faiss {h['kind']}, "
                 f"{h['indexed']} of {h['rows']} rows, nprobe {h['nprobe']}]")
    typer.echo(result["path"])


@app.command(cls=_Command)
def neighbors(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings (.npy) written by `contrastive embed`, with its index (.json) beside it.")],
    query: Annotated[Path | None, typer.Option("--query", help="Image file to embed and search for.")] = None,
    row: Annotated[int | None, typer.Option("--row", callback=_range(0, None), help="Search for row I of the embeddings (itself left out).")] = None,
    path: Annotated[str | None, typer.Option("--path", help="Search for an indexed image: its path as in the index, or a path to the file (itself left out).")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run directory (or exported .onnx/.stablehlo/.safetensors encoder) that embeds --query. Default: the model named in the index.")] = None,
    k: Annotated[int, typer.Option("-k", callback=_range(1, None), help="Number of neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV: rank,row,path,cosine.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help=_EXACT_HELP)] = False,
    nprobe: Annotated[int, typer.Option("--nprobe", callback=_range(0, None), help=_NPROBE_HELP)] = 0,
) -> None:
    """Print the K nearest neighbours (highest cosine) of an image, a row or an indexed path.

    Files of 50,000 rows or more are searched through the approximate index beside them (EMB.ann,
    built on first use; see `contrastive index`); smaller ones, or with --exact, exactly."""
    fmt = _format(as_json, as_csv)
    if sum(q is not None for q in (query, row, path)) != 1:
        raise typer.BadParameter("give exactly one of --query IMAGE, --row I, --path P", param_hint="--query")
    if model is not None and query is None:
        raise typer.BadParameter("--model is only used with --query", param_hint="--model")
    if query is not None:
        _enable_compilation_cache(0.0)
    from .infer.find import neighbors as run_neighbors

    result = _run(run_neighbors, embeddings, k, row=row, path=path, image=query, model=model,
                  search="exact" if exact else "auto", nprobe=nprobe, on_info=console.info)
    for message in result["warnings"]:
        console.warn(message)
    found = result["neighbors"]
    if fmt == "json":
        typer.echo(json.dumps({"query": result["query"], "model": result["model"], "search": result["search"],
                               "neighbors": found}))
    elif fmt == "csv":
        _csv(["rank", "row", "path", "cosine"], [[n["rank"], n["row"], n["path"], f"{n['cosine']:.6f}"] for n in found])
    else:
        console.info(f"{len(found)} nearest to {result['query']['path']} ({_searched(result['search'])})")
        width = max(3, len(str(max(n["row"] for n in found))))
        typer.echo(f"{'rank':>4}  {'row':>{width}}  {'cosine':>9}  path")
        for n in found:
            typer.echo(f"{n['rank']:>4}  {n['row']:>{width}}  {n['cosine']:>9.6f}  {n['path']}")


@app.command(cls=_Command)
def duplicates(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings (.npy) written by `contrastive embed`, with its index (.json) beside it.")],
    threshold: Annotated[float, typer.Option("--threshold", "-t", callback=_range(-1.0, 1.0), help="Cosine at or above which two images count as near-duplicates; depends on the model, so check a few pairs with `neighbors` first.")],
    cross: Annotated[Path | None, typer.Option("--cross", help="Second embeddings file: list pairs between the two sets instead of groups within one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (the default).")] = False,
    exact: Annotated[bool, typer.Option("--exact", help=_EXACT_HELP)] = False,
    nprobe: Annotated[int, typer.Option("--nprobe", callback=_range(0, None), help=_NPROBE_HELP)] = 0,
) -> None:
    """Print groups of near-duplicate images, or with --cross the matching pairs between two sets.

    CSV columns: group,row,path,score (largest group first; score is the image's best cosine within
    its group); with --cross: row,path,other_row,other_path,score (best first). Files of 50,000 rows
    or more (with --cross: the second file) are searched through the approximate index beside them
    (built on first use; see `contrastive index`); smaller ones, or with --exact, exactly.
    """
    fmt = _format(as_json, as_csv)
    from .infer.find import find_duplicates

    progress = console.DecodeProgress("comparing")
    try:
        result = _run(find_duplicates, embeddings, threshold, cross=cross, search="exact" if exact else "auto",
                      nprobe=nprobe, on_info=console.info,
                      on_progress=lambda done, total: total > 1 and progress(done, total))
    finally:
        progress.close()
    for message in result["warnings"]:
        console.warn(message)
    if cross is not None:
        pairs = result["pairs"]
        console.info(f"{len(pairs)} pairs at cosine >= {threshold} between {result['rows']} and "
                     f"{result['other_rows']} images ({_searched(result['search'])})")
        if fmt == "json":
            typer.echo(json.dumps({"threshold": threshold, "search": result["search"], "pairs": pairs}))
        else:
            _csv(["row", "path", "other_row", "other_path", "score"],
                 [[p["row"], p["path"], p["other_row"], p["other_path"], f"{p['score']:.6f}"] for p in pairs])
        return
    groups = result["groups"]
    console.info(f"{len(groups)} groups holding {sum(len(g['members']) for g in groups)} of {result['rows']} "
                 f"images at cosine >= {threshold} ({_searched(result['search'])})")
    if fmt == "json":
        typer.echo(json.dumps({"threshold": threshold, "search": result["search"], "groups": groups}))
    else:
        _csv(["group", "row", "path", "score"],
             [[g["group"], m["row"], m["path"], f"{m['score']:.6f}"] for g in groups for m in g["members"]])


@app.command(cls=_Command)
def evaluate(
    folder: Annotated[Path | None, typer.Argument(help="Labeled folder: one subfolder per class. Split per class into train/test.")] = None,
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `contrastive pretrain`.")] = None,
    train: Annotated[Path | None, typer.Option("--train", help="Labeled training folder (instead of splitting FOLDER).")] = None,
    test: Annotated[Path | None, typer.Option("--test", help="Labeled test folder (with --train).")] = None,
    test_fraction: Annotated[float, typer.Option(callback=_range(0.01, 0.99), help="Share of each class held out for testing.")] = 0.2,
    k: Annotated[int, typer.Option("-k", callback=_range(1, None), help="Neighbours that vote in kNN.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the split and the linear probe.")] = 0,
    embed_grid: Annotated[int, typer.Option("--embed-grid", callback=_range(0, None), help="Pool the encoder's last feature map on a G x G grid for this evaluation (see pretrain --embed-grid). 0: the run's own.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """kNN and linear-probe accuracy of the encoder's embeddings on labeled images, against raw pixels."""
    if model is None:
        raise typer.BadParameter("--model RUN_DIR is required", param_hint="--model")
    for path, hint in ((folder, "FOLDER"), (train, "--train"), (test, "--test")):
        if path is not None:
            _folder(path, hint)
    _heavy_command()
    from .infer.evaluate import evaluate as run_evaluate

    progress = console.DecodeProgress("embedding")
    try:
        result = _run(run_evaluate, folder, model, train_dir=train, test_dir=test, test_fraction=test_fraction,
                      seed=seed, k=k, embed_grid=embed_grid, on_progress=progress,
                        on_warning=console.warn)
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{'':12}{'kNN (k=' + str(result['k']) + ')':>12}{'linear':>10}")
    typer.echo(f"{'embeddings':12}{result['knn']:>12.4f}{result['linear']:>10.4f}")
    typer.echo(f"{'raw pixels':12}{result['raw_knn']:>12.4f}{result['raw_linear']:>10.4f}")
    console.info(f"{result['classes']} classes, {result['n_train']} train / {result['n_test']} test images, "
                 f"model {result['model']} at step {result['step']}")


ExportFormat = Enum("ExportFormat", {n: n for n in ("onnx", "safetensors", "stablehlo")}, type=str)
ExportInput = Enum("ExportInput", {n: n for n in ("uint8", "float32")}, type=str)


@app.command(cls=_Command)
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `contrastive pretrain`.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx: an ONNX model (ONNX Runtime, TensorRT, ...; needs contrastive[onnx]); safetensors: the weights, named, with the architecture in the header; stablehlo: a serialized JAX function (jax.export) for any JAX program.")] = ExportFormat("onnx"),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write. Default: ./encoder.onnx, ./encoder.safetensors or ./encoder.stablehlo.")] = None,
    embed_grid: Annotated[int, typer.Option("--embed-grid", callback=_range(0, None), help="Pool on a G x G grid (see pretrain --embed-grid). 0: the run's own.")] = 0,
    input_dtype: Annotated[ExportInput, typer.Option("--input", help="ONNX input: uint8 (0..255) or float32 (0..1) images.")] = ExportInput("uint8"),
    nchw: Annotated[bool, typer.Option("--nchw", help="ONNX input in NCHW layout (PyTorch's) instead of NHWC.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Write the run's encoder as ONNX, safetensors or StableHLO: images in, the embeddings `embed` writes out."""
    _enable_compilation_cache()
    from .infer.export import export as run_export

    path = _run(run_export, run, fmt.value, output, force=force, embed_grid=embed_grid,
                input_dtype=input_dtype.value, nchw=nchw, on_warning=console.warn)
    console.info(f"exported {run} as {fmt.value} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    typer.echo(str(path))


@app.command(cls=_Command)
def plot(
    run: Annotated[Path, typer.Argument(help="Run directory written by `contrastive pretrain`.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG file to write. Default: RUN/metrics.png.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file that `contrastive plot` did not write.")] = False,
) -> None:
    """Draw RUN/metrics.jsonl (loss, cosines, accuracy, emb_std, effective rank, lr over steps) to a PNG."""
    from .plot import plot_metrics

    typer.echo(str(_run(plot_metrics, run, output, force=force)))


def _exit_interrupted(code: int) -> None:
    """End an interrupted command with exactly `code` (130, 143). A normal exit would let CPython
    turn it into death by SIGINT (-2 to a parent; a shell still sees 130, but SIGTERM's 143 is
    lost): under `python -m`, CPython re-raises SIGINT at exit when any KeyboardInterrupt once went
    unhandled inside a C call of Python code (PyRun_String, as some extensions' imports make). The
    command's files are closed by now; only the streams are flushed, and exit handlers skipped."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    """Console-script entry point."""
    global _AS_COMMAND
    _AS_COMMAND = True
    # First thing: a Ctrl-C from here on is one line and exit 130. Signals held by _heavy_command
    # across its re-exec of this process arrive now, once the handler is in place.
    for s in _STOP_SIGNALS:
        signal.signal(s, _on_signal)
    if os.environ.get("CONTRASTIVE_DEBUG"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        app()
        return
    try:
        _quiet_hooks()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        app()
    except SystemExit as e:
        if _signals["received"]:
            # an interrupt nobody reported is not a success
            _exit_interrupted(e.code if _signals["stopping"] else _interrupted().exit_code)
        raise
    except KeyboardInterrupt:
        _exit_interrupted(_interrupted().exit_code)
    except BrokenPipeError:  # `contrastive duplicates ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if _signals["received"]:
            sys.exit(_interrupted().exit_code)
        console.error(f"internal error: {type(e).__name__}: {e} (set CONTRASTIVE_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
