"""Robust decode of image files to a decoded-image array.

    sorted files (scan.py) --decode (threads, JPEG draft)--> uint8 [N, R, R, 3]

Every image becomes an R x R RGB square: EXIF orientation applied, 16-bit scaled to 8, alpha
composited over white, palette/CMYK/grayscale converted, shorter side resized to R, centre crop.
Files that cannot be used are skipped with a reason; nothing here prints (the caller reports).
"""
from __future__ import annotations

import errno
import functools
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .scan import IMAGE_EXTENSIONS, no_usable_image, scan_images

@dataclass
class ImageSet:
    """Decoded images of one folder. Row i of `images` is `paths[i]` (relative to `root`)."""

    root: Path
    paths: list[str]
    images: np.ndarray  # uint8 [N, R, R, 3]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def __len__(self) -> int:
        return len(self.paths)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with 16-bit data scaled (not clipped) and alpha over white.

    I;16*: 0..65535 -> 0..255. I (32-bit) and F: 8-bit range kept when the maximum is <= 255,
    else scaled from 0..65535 (or 0..max); F with maximum <= 1 is taken as 0..1. NaN -> 0.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "F" and hi <= 1.0:
            top = 1.0
        else:
            top = 255.0 if hi <= 255 else max(65535.0, hi)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB") if im.mode != "RGB" else im


class UnusableImage(InputError):
    """A file decode_image refuses before decoding it; str(e) is the reason shown to the user."""


def _open_regular(path: Path):
    """Open `path` for reading only if it is a regular, non-empty file (following symlinks).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer forever; the
    type check then happens on the open descriptor, so a swapped file cannot slip in between.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise UnusableImage(f"not a regular file ({kind})")
        if st.st_size == 0:
            raise UnusableImage("empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@functools.cache
def _formats() -> tuple[str, ...]:
    """Pillow formats tried on a file: those our extensions name (and MPO, a multi-picture JPEG).

    A file is tried by these decoders only, whatever its extension says, so a stray file never
    reaches Pillow's rarely used plugins.
    """
    Image.init()
    wanted = {Image.EXTENSION[e] for e in IMAGE_EXTENSIONS if e in Image.EXTENSION} | {"MPO"}
    return tuple(sorted(f for f in wanted if f in Image.OPEN))


def pixel_limit() -> int | None:
    """Largest width x height decoded: Pillow's Image.MAX_IMAGE_PIXELS (None: no limit)."""
    return Image.MAX_IMAGE_PIXELS


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one file to uint8 [size, size, 3]: shorter side resized to `size`, centre crop.

    Time and memory are bounded before any pixel is decoded: the file must be a regular, non-empty
    file (a FIFO or /dev/zero would never end), and its header's width x height must be within
    `pixel_limit()`. Only the first frame of an animation is decoded. Raises UnusableImage, OSError,
    ValueError, Image.DecompressionBombError or similar on a bad file; `decode_or_reason` turns
    those into a skip reason.
    """
    with _open_regular(path) as f, Image.open(f, formats=_formats()) as im:  # reads the header only
        limit = pixel_limit()
        w, h = im.size
        if limit is not None and w * h > limit:
            raise UnusableImage(f"too large: {w} x {h} = {w * h:,} pixels, over the decompression-bomb "
                                f"limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")
        if im.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `size`: much
            # faster on photo-sized files (BENCHMARKS.md, "Figures moved from the code").
            im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _reason(err: BaseException, path: Path | None = None) -> str:
    """One line a user can act on, for any exception decoding one file raised."""
    if isinstance(err, UnusableImage):
        return str(err)
    if isinstance(err, Image.DecompressionBombError):
        return (f"too large: over twice the decompression-bomb limit of {pixel_limit() or 0:,} pixels "
                "(PIL.Image.MAX_IMAGE_PIXELS)")
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can read (tried JPEG, PNG, GIF, BMP, TIFF, WebP, PPM)"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "broken symlink (its target does not exist)" if path and os.path.islink(path) else "file vanished"
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(err, OSError) and "truncated" in str(err).lower():
        return "truncated file"
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{type(err).__name__}: {text}"[:160]


def decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    """decode_image(path, size), or the reason the file cannot be used. Never raises for one file.

    Safe to call from many threads at once: it does not touch the process-wide warnings filters.
    Pillow's own DecompressionBombWarning is redundant with the pixel check in decode_image;
    silence it with `quiet_pillow()` around the calls.
    """
    try:
        return decode_image(path, size)
    except Exception as e:  # any failure of one file must skip that file, never stop the run
        return _reason(e, path)


@contextmanager
def quiet_pillow() -> Iterator[None]:
    """Hide the warnings Pillow prints while opening hostile files (decompression bomb, corrupt
    EXIF, ...): every file it warns about is either refused with a reason or used as it decodes.

    Enter on the calling thread only, around work that decoding threads do (warnings filters are
    process-wide and `catch_warnings` is not thread-safe).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


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
    with quiet_pillow():
        for i, out in enumerate(pool.map(lambda p: decode_or_reason(p, size), files)):
            rel = files[i].relative_to(folder).as_posix()
            if isinstance(out, str):
                skipped.append((rel, out))
            else:
                images[i], keep[i] = out, True
            if on_progress:
                on_progress(progress_offset + i + 1, progress_total or len(files))
    paths = [f.relative_to(folder).as_posix() for f, k in zip(files, keep) if k]
    return (images if keep.all() else images[keep]), paths, skipped


@contextmanager
def decode_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """Threads for decoding (Pillow releases the GIL while it decodes and resizes), as a `with`
    block. On an error or Ctrl-C the decodes not yet started are cancelled, not waited for."""
    pool = ThreadPoolExecutor(workers or min(16, (os.cpu_count() or 2) + 2))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


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
    unreadable: list[tuple[str, str]] = []
    files = scan_images(folder, skipped=unreadable)
    with decode_pool(workers) as pool:
        images, paths, skipped = decode_files(folder, files, size, pool=pool, on_progress=on_progress)
    if not paths:
        raise no_usable_image(folder, len(files), skipped)
    return ImageSet(folder, paths, images, unreadable + skipped)
