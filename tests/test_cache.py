"""Decoded-image cache: same pixels as a fresh decode; only changed files are decoded again."""
import os

import numpy as np
from PIL import Image

from contrastive_cli.data.cache import load_cached
from contrastive_cli.data.decode import load_folder


def write(folder, n=6):
    rng = np.random.default_rng(0)
    folder.mkdir()
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
