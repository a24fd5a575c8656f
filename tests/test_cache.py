"""Decoded-image cache: same pixels as a fresh decode; only changed files are decoded again; a
full or read-only disk (a real tmpfs) means decoding in memory with a warning, never a SIGBUS."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_files import mounted_tmpfs

from contrastive_cli.data import cache
from contrastive_cli.data.cache import load_cached
from contrastive_cli.data.decode import load_folder

tmpfs = pytest.fixture(mounted_tmpfs)


def write(folder, n=6):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.jpg").write_text("not an image")


def test_second_load_decodes_nothing_and_matches_a_fresh_decode(tmp_path):
    folder, root = tmp_path / "imgs", tmp_path / "cache"
    write(folder)
    first, n1 = load_cached(folder, 12, root=root)
    second, n2 = load_cached(folder, 12, root=root)
    fresh = load_folder(folder, 12)
    assert (n1, n2) == (7, 0)
    assert first.paths == second.paths == fresh.paths == [f"{i}.png" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(second.images), fresh.images)
    assert [p for p, _ in second.skipped] == ["bad.jpg"] == [p for p, _ in fresh.skipped]


def test_changed_added_and_removed_files(tmp_path):
    folder, root = tmp_path / "imgs", tmp_path / "cache"
    write(folder)
    load_cached(folder, 12, root=root)
    Image.new("RGB", (25, 25), (255, 0, 0)).save(folder / "2.png")
    os.utime(folder / "2.png", ns=(1, 10**18))  # a different mtime for certain
    Image.new("RGB", (25, 25), (0, 255, 0)).save(folder / "9.png")
    (folder / "4.png").unlink()
    data, decoded = load_cached(folder, 12, root=root)
    assert decoded == 2  # 2.png changed, 9.png new; the rest reused
    assert data.paths == ["0.png", "1.png", "2.png", "3.png", "5.png", "9.png"]
    np.testing.assert_array_equal(np.asarray(data.images), load_folder(folder, 12).images)
    assert (np.asarray(data.images[2]) == [255, 0, 0]).all()


def test_resolution_is_part_of_the_key(tmp_path):
    folder, root = tmp_path / "imgs", tmp_path / "cache"
    write(folder)
    a, _ = load_cached(folder, 12, root=root)
    b, decoded = load_cached(folder, 16, root=root)
    assert decoded == 7 and b.images.shape[1:] == (16, 16, 3) and a.images.shape[1:] == (12, 12, 3)


# --- the key sees every rewrite; a full or read-only disk is a warning, never a crash -------------

def test_a_same_size_rewrite_with_its_mtime_restored_is_decoded_again(tmp_path):
    """cp -p, rsync -t, tar x: same size, same mtime, new pixels. The ctime gives it away."""
    folder, root = tmp_path / "imgs", tmp_path / "cache"
    write(folder)
    Image.new("RGB", (20, 20), (10, 20, 30)).save(folder / "2.png", compress_level=0)  # stored: size fixed
    load_cached(folder, 12, root=root)
    st = os.stat(folder / "2.png")
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / "2.png", compress_level=0)
    os.utime(folder / "2.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(folder / "2.png").st_size, os.stat(folder / "2.png").st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    data, decoded = load_cached(folder, 12, root=root)
    assert decoded == 1
    assert (np.asarray(data.images[2]) == [200, 0, 0]).all()
    np.testing.assert_array_equal(np.asarray(data.images), load_folder(folder, 12).images)


def test_no_room_for_the_data_file_decodes_in_memory_with_a_warning(tmpfs, tmp_path):
    """2 MiB free is less than FREE_MARGIN: no data file is created (a sparse one would SIGBUS later)."""
    folder = tmp_path / "imgs"
    write(folder)
    warnings = []
    data, decoded = load_cached(folder, 12, root=tmpfs.path / "decoded", on_warning=warnings.append)
    assert decoded == 7 and data.paths == load_folder(folder, 12).paths
    np.testing.assert_array_equal(np.asarray(data.images), load_folder(folder, 12).images)
    assert len(warnings) == 1 and "MiB free" in warnings[0] and "decoding in memory" in warnings[0]
    assert not list(tmpfs.path.rglob("images-*.bin")) and not list(tmpfs.path.rglob("index.json"))


def test_a_full_disk_with_no_margin_asked_fails_in_posix_fallocate_not_later(tmpfs, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write(folder, n=40)  # 40 x 32 x 32 x 3: 120 KiB of pixels
    monkeypatch.setattr(cache, "FREE_MARGIN", 0)
    monkeypatch.setattr(cache.os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 512, 512, 512, 0, 0, 0, 0, 255)))
    tmpfs.fill(leave=32 << 10)  # statvfs says 2 MiB free; the disk has 32 KiB
    warnings = []
    data, _ = load_cached(folder, 32, root=tmpfs.path / "decoded", on_warning=warnings.append)
    assert len(data) == 40 and len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not list(tmpfs.path.rglob("images-*.bin"))


def test_a_read_only_cache_decodes_in_memory_with_a_warning(tmpfs, tmp_path):
    folder = tmp_path / "imgs"
    write(folder)
    tmpfs.read_only()
    warnings = []
    data, _ = load_cached(folder, 12, root=tmpfs.path / "decoded", on_warning=warnings.append)
    assert len(data) == 6 and len(warnings) == 1 and "Read-only file system" in warnings[0]
    data, _ = load_cached(folder, 12, root=tmpfs.path / "decoded")  # no callback: silent, still works
    assert len(data) == 6


def test_the_data_file_is_allocated_and_takes_the_umask(tmp_path):
    folder, root = tmp_path / "imgs", tmp_path / "cache"
    write(folder)
    old = os.umask(0o022)
    try:
        load_cached(folder, 12, root=root)
    finally:
        os.umask(old)
    (data,) = root.rglob("images-*.bin")
    assert data.stat().st_size == 6 * 12 * 12 * 3 and data.stat().st_blocks * 512 >= data.stat().st_size  # not sparse
    assert {p.name.split("-")[0]: p.stat().st_mode & 0o777 for p in data.parent.iterdir()} == \
        {"images": 0o644, "index.json": 0o644}


@pytest.mark.slow
def test_pretrain_with_the_cache_on_a_full_disk_trains_without_sigbus(tmpfs, tmp_path):
    """A real `contrastive pretrain` with CONTRASTIVE_CACHE_DIR on a full tmpfs: no SIGBUS."""
    folder = tmp_path / "imgs"
    write(folder, n=8)
    tmpfs.fill()
    env = {**os.environ, "CONTRASTIVE_CACHE_DIR": str(tmpfs.path)}
    result = subprocess.run([sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o",
                             str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--image-size", "16",
                             "--quiet"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
