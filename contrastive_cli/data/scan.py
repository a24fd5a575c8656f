"""Folder scan: the sorted image files under a folder, hidden files, symlinked folders and run
directories left out."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# What marks a folder as a run directory (train/rundir.py writes both): the top-level key of its
# config.json, and the lock file a training process holds (hidden, so never scanned as an image).
RUN_MARKER = "contrastive_run"
LOCK_NAME = ".lock"


def is_marked_run(config_json: Path) -> bool:
    """Whether `config_json` is a run's config (carries RUN_MARKER); any read error is False."""
    try:
        with open(config_json, "rb") as f:
            data = json.loads(f.read(1 << 20))  # a run's config is ~1 KB; never read a huge file
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get(RUN_MARKER))


def _is_run(dirpath: str, filenames: list[str]) -> bool:
    return LOCK_NAME in filenames or ("config.json" in filenames and is_marked_run(Path(dirpath) / "config.json"))


def scan_folder(folder: Path, *, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """All image files under `folder` (recursive, following no symlinked folders), sorted.

    Hidden files and folders (leading '.') are skipped, as a file manager would. Symlinked folders
    are not entered, so a link loop cannot make the walk endless or list a file twice. A subfolder
    that is a run directory (holds LOCK_NAME, or a config.json carrying RUN_MARKER) is left out with
    all it holds, so a run written inside the image folder (its metrics.png) is never trained on;
    the folder itself is scanned whatever it is. Subfolders that cannot be read are appended to `skipped` as ("sub/folder/", reason) when it is given.
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
        if skipped is not None:
            rel = Path(err.filename).relative_to(folder).as_posix()
            skipped.append((rel + "/", f"folder not read: {(err.strerror or str(err)).lower()}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror, followlinks=False):
        if dirpath != str(folder) and _is_run(dirpath, filenames):
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found


def scan_images(folder: Path, *, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """`scan_folder`, raising InputError when the folder holds no image file at all."""
    files = scan_folder(folder, skipped=skipped)
    if not files:
        raise InputError(f"no image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def no_usable_image(folder: Path, n_files: int, skipped: list[tuple[str, str]]) -> InputError:
    """The error for a folder whose image files all failed to decode (the first reason shown)."""
    return InputError(f"none of the {n_files} image files in {folder} could be read "
                      f"(first: {skipped[0][0]}: {skipped[0][1]})")
