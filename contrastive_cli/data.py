"""Folder scan, robust decode, decoded-image array, seeded batch order.

    folder --scan--> sorted relative paths --decode (threads, JPEG draft)--> uint8 [N, R, R, 3]

Every image becomes an R x R RGB square: EXIF orientation applied, 16-bit scaled to 8, alpha
composited over white, palette/CMYK/grayscale converted, shorter side resized to R, centre crop.
Files that cannot be used are skipped with a reason; nothing here prints (the caller reports).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass
class ImageSet:
    """Decoded images of one folder. Row i of `images` is `paths[i]` (relative to `root`)."""

    root: Path
    paths: list[str]
    images: np.ndarray  # uint8 [N, R, R, 3]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def __len__(self) -> int:
        return len(self.paths)


def scan_folder(folder: Path) -> list[Path]:
    """All image files under `folder` (recursive, following no symlinked folders), sorted.

    Hidden files and folders (leading '.') are skipped, as a file manager would.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    found: list[Path] = []

    def onerror(err: OSError) -> None:
        if Path(err.filename) == folder:
            raise InputError(f"cannot read folder {folder}: {err.strerror}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with 16-bit data scaled (not clipped) and alpha over white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one file to uint8 [size, size, 3]: shorter side resized to `size`, centre crop.

    Raises OSError, ValueError, Image.DecompressionBombError/Warning or similar on a bad file;
    `load_folder` turns those into a skip reason.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `size`:
            # ~2.3x faster on photo-sized files (measured, issue 7).
            im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _reason(err: BaseException) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too large (over Pillow's decompression-bomb pixel limit)"
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "file vanished or broken symlink"
    if isinstance(err, OSError) and "truncated" in str(err).lower():
        return "truncated file"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{type(err).__name__}: {text}"[:160]


def _decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_image(path, size)
    except Exception as e:  # any failure of one file must skip that file, never stop the run
        return _reason(e)


def decode_files(
    folder: Path,
    files: list[Path],
    size: int,
    *,
    pool: ThreadPoolExecutor,
    on_progress: Callable[[int, int], None] | None = None,
    progress_offset: int = 0,
    progress_total: int | None = None,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode `files` (under `folder`) on `pool`: (uint8 [n, size, size, 3], kept paths, skipped)."""
    images = np.empty((len(files), size, size, 3), np.uint8)
    keep = np.zeros(len(files), bool)
    skipped: list[tuple[str, str]] = []
    for i, out in enumerate(pool.map(lambda p: _decode_or_reason(p, size), files)):
        rel = files[i].relative_to(folder).as_posix()
        if isinstance(out, str):
            skipped.append((rel, out))
        else:
            images[i], keep[i] = out, True
        if on_progress:
            on_progress(progress_offset + i + 1, progress_total or len(files))
    paths = [f.relative_to(folder).as_posix() for f, k in zip(files, keep) if k]
    return (images if keep.all() else images[keep]), paths, skipped


def decode_pool(workers: int | None = None) -> ThreadPoolExecutor:
    """Threads for decoding: Pillow releases the GIL while it decodes and resizes."""
    return ThreadPoolExecutor(workers or min(16, (os.cpu_count() or 2) + 2))


def no_usable_image(folder: Path, n_files: int, skipped: list[tuple[str, str]]) -> InputError:
    return InputError(f"none of the {n_files} image files in {folder} could be read "
                      f"(first: {skipped[0][0]}: {skipped[0][1]})")


def load_folder(
    folder: Path,
    size: int,
    *,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """Scan and decode `folder` to an ImageSet of `size` x `size` images.

    Raises InputError when the folder holds no usable image; bad files are listed in `skipped`.
    """
    folder = Path(folder)
    files = scan_folder(folder)
    if not files:
        raise InputError(f"no image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    with decode_pool(workers) as pool:
        images, paths, skipped = decode_files(folder, files, size, pool=pool, on_progress=on_progress)
    if not paths:
        raise no_usable_image(folder, len(files), skipped)
    return ImageSet(folder, paths, images, skipped)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `n` images in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int) -> np.ndarray:
    """Indices of the images in training step `step` (0-based); epochs drop the last partial batch.

    A pure function of (n, batch_size, step, seed), so a resumed run sees the same data order.
    """
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(n, seed=seed, epoch=epoch)[i * batch_size:(i + 1) * batch_size]


def iterate_batches(images: np.ndarray, batch_size: int, start: int, stop: int, *, seed: int) -> Iterator[np.ndarray]:
    """uint8 batches [B, R, R, 3] for steps start..stop-1."""
    for step in range(start, stop):
        yield images[batch_indices(len(images), batch_size, step, seed=seed)]
