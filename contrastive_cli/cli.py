"""The `contrastive` command. The only module that imports typer; every command is thin:
parse options -> build a config -> call one library function -> render the result.

Library modules (and JAX) are imported inside the commands, so `contrastive --help` is instant.
"""
from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .config import AugmentConfig, ModelConfig, TrainConfig
from .errors import ContrastiveError

app = typer.Typer(
    help="Learn image representations from folders of unlabeled images (contrastive self-supervised "
         "learning on JAX), then embed and compare images with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Encoder(str, Enum):
    small = "small"
    resnet18 = "resnet18"


class Loss(str, Enum):
    ntxent = "ntxent"
    cosine = "cosine"


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"
    lars = "lars"


class Precision(str, Enum):
    float32 = "float32"
    bf16 = "bf16"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


def _folder(path: Path, param: str) -> Path:
    """A file where a folder is expected is a usage error (exit 2); a missing folder is exit 1."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a folder", param_hint=param)
    return path


def _run(fn, *args, **kwargs):
    """Call a library function; turn its errors into one line on stderr and an exit code."""
    try:
        return fn(*args, **kwargs)
    except ContrastiveError as e:
        console.error(str(e))
        raise typer.Exit(getattr(e, "exit_code", 1)) from None
    except KeyboardInterrupt:
        console.error("interrupted")
        raise typer.Exit(130) from None
    except MemoryError:
        console.error("out of memory; try a smaller --batch-size or --image-size")
        raise typer.Exit(1) from None


@app.command()
def pretrain(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively; labels not needed).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory. Default: a new folder under ./runs/.")] = None,
    steps: Annotated[int, typer.Option(min=0, help="Training steps (one batch each). Give this or --epochs.")] = 0,
    epochs: Annotated[int, typer.Option(min=0, help=f"Passes over the folder. Default: {TrainConfig.DEFAULT_EPOCHS} when --steps is not given.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Images per step; each gives a positive pair, all others are negatives.")] = TrainConfig.batch_size,
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Side of the square views the encoder sees, in pixels.")] = ModelConfig.image_size,
    encoder: Annotated[Encoder, typer.Option(help="Encoder network. 'small' (4 conv layers, default: trains at hundreds of pairs/s on a laptop CPU) or 'resnet18' (small-image stem; ~20x slower, better on GPU).")] = Encoder.small,
    loss: Annotated[Loss, typer.Option(help="ntxent: SimCLR's NT-Xent (default, best kNN accuracy in our benchmark); cosine: pairwise cosine (positives to 1, negatives to 0).")] = Loss.ntxent,
    temperature: Annotated[float, typer.Option(min=1e-4, help="NT-Xent temperature.")] = TrainConfig.temperature,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate. Default: scaled with the batch size for the optimizer.")] = 0.0,
    optimizer: Annotated[Optimizer, typer.Option(help="Optimizer (warm-up then cosine decay).")] = Optimizer.adamw,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="Weight decay (not on biases and norms).")] = TrainConfig.weight_decay,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and augmentation.")] = 0,
    precision: Annotated[Precision, typer.Option(help="Compute precision. bf16 keeps parameters and loss in float32.")] = Precision.float32,
    log_every: Annotated[int, typer.Option(min=1, help="Log metrics every N steps.")] = TrainConfig.log_every,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Save a checkpoint every N steps (0: at the end only).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint (its config.json is used).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run in --output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Train an encoder on augmented view pairs of the images in FOLDER; write a run directory."""
    _folder(folder, "FOLDER")
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output RUN_DIR", param_hint="--resume")
    if steps and epochs:
        raise typer.BadParameter(f"give --steps ({steps}) or --epochs ({epochs}), not both", param_hint="--steps")

    def build():
        return TrainConfig(
            model=ModelConfig(encoder=encoder.value, image_size=image_size), augment=AugmentConfig(),
            batch_size=batch_size, steps=steps, epochs=epochs, loss=loss.value, temperature=temperature,
            optimizer=optimizer.value, lr=lr, weight_decay=weight_decay, seed=seed,
            precision=precision.value, log_every=log_every, checkpoint_every=checkpoint_every)

    cfg = _run(build)
    from .train import pretrain as run_pretrain

    display = console.TrainDisplay(quiet=quiet)
    try:
        summary = _run(run_pretrain, folder, cfg, output, resume=resume, force=force, monitor=display)
    finally:
        display.close()
    typer.echo(summary["output"])  # stdout: the run directory, for scripts


@app.command()
def embed(
    folder: Annotated[Path, typer.Argument(help="Folder of images to embed (recursive).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `contrastive pretrain`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Embeddings file (.npy); the index goes beside it as .json.")] = Path("embeddings.npy"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 128,
    dtype: Annotated[DType, typer.Option(help="Stored dtype; float16 halves the file.")] = DType.float32,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Embed every image in FOLDER to OUTPUT (.npy, float [N, D], unit rows) with an index (.json)."""
    _folder(folder, "FOLDER")
    from .embed import embed_folder, index_path

    progress = console.DecodeProgress("embedding")
    try:
        index = _run(embed_folder, folder, model, output, force=force, dtype=dtype.value,
                     batch_size=batch_size, on_progress=progress)
    finally:
        progress.close()
    if index["skipped"]:
        console.warn(f"left out {len(index['skipped'])} unreadable file(s): "
                     + "; ".join(f"{s['path']}: {s['reason']}" for s in index["skipped"][:3])
                     + (" ..." if len(index["skipped"]) > 3 else "") + f" (listed in {index_path(output)})")
    console.info(f"embedded {len(index['paths'])} images -> {output} [{len(index['paths'])} x {index['dim']}, "
                 f"{index['dtype']}], index {index_path(output)}")
    typer.echo(str(output))


@app.command()
def similarity(
    a: Annotated[Path, typer.Argument(help="First image.")],
    b: Annotated[Path, typer.Argument(help="Second image.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `contrastive pretrain`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the bare number.")] = False,
) -> None:
    """Print the cosine similarity (-1..1) of two images' embeddings on stdout."""
    from .embed import similarity as run_similarity

    value = _run(run_similarity, a, b, model)
    if as_json:
        typer.echo(json.dumps({"a": str(a), "b": str(b), "model": str(model), "similarity": value}))
    else:
        typer.echo(f"{value:.6f}")


def main() -> None:
    """Console-script entry point."""
    if os.environ.get("CONTRASTIVE_DEBUG"):
        app()
        return
    try:
        app()
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        console.error(f"internal error: {type(e).__name__}: {e} (set CONTRASTIVE_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
