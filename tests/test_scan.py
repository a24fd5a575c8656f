"""data/scan.py: the sorted, recursive folder scan (hidden files, symlinked folders, unreadable folders)."""
import json
import os

import pytest

from contrastive_cli.data import scan
from contrastive_cli.errors import InputError


# ---- scan ------------------------------------------------------------------------------------------
def test_scan_is_sorted_recursive_and_ignores_hidden_and_other_extensions(tmp_path):
    for rel in ["b.png", "A.JPG", "sub/c.jpeg", "sub/deeper/d.PNG", ".hidden.jpg", ".cache/e.jpg",
                "sub/.git/f.png", "notes.txt", "g.jpg.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in scan.scan_folder(tmp_path)]
    assert found == ["A.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.PNG"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_scan_does_not_enter_symlinked_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"x")
    os.symlink("..", tmp_path / "sub" / "up")  # a loop: sub/up/sub/up/...
    os.symlink("sub", tmp_path / "alias")  # the same files under a second name
    assert [p.relative_to(tmp_path).as_posix() for p in scan.scan_folder(tmp_path)] == ["sub/a.jpg"]


def test_scan_reports_unreadable_subfolders(tmp_path, monkeypatch):
    # chmod 000 does not stop root, so the failure is injected where os.walk lists a folder.
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped = []
    assert [p.name for p in scan.scan_folder(tmp_path, skipped=skipped)] == ["a.png"]
    assert skipped == [("locked/", "folder not read: permission denied")]


def test_scan_rejects_missing_folder_and_file(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        scan.scan_folder(tmp_path / "nope")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        scan.scan_folder(tmp_path / "f.jpg")


def test_scan_images_refuses_a_folder_without_images_and_lists_the_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no image files in .*\.jpeg.*\.png"):
        scan.scan_images(tmp_path)
    (tmp_path / "a.webp").write_bytes(b"x")
    assert [p.name for p in scan.scan_images(tmp_path)] == ["a.webp"]


def test_no_usable_image_names_the_first_reason(tmp_path):
    err = scan.no_usable_image(tmp_path, 3, [("a.jpg", "not an image"), ("b.jpg", "truncated file")])
    assert isinstance(err, InputError)
    assert str(err) == f"none of the 3 image files in {tmp_path} could be read (first: a.jpg: not an image)"


def test_scan_leaves_out_run_directories_inside_the_folder(tmp_path):
    for rel in ["a.png", "runs/r1/metrics.png", "runs/r1/sub/x.png", "locked/metrics.png", "theirs/b.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "runs" / "r1" / "config.json").write_text(json.dumps({scan.RUN_MARKER: 1, "steps": 3}))
    (tmp_path / "locked" / scan.LOCK_NAME).write_text("1 host\n")  # a run being written
    (tmp_path / "theirs" / "config.json").write_text('{"steps": 3}')  # a user's config: not a run
    found = [p.relative_to(tmp_path).as_posix() for p in scan.scan_folder(tmp_path)]
    assert found == ["a.png", "theirs/b.png"]
    # the folder itself is scanned whatever it is
    assert [p.name for p in scan.scan_folder(tmp_path / "runs" / "r1")] == ["metrics.png", "x.png"]
