"""files.py: atomic writes keep the old file on any failure (a real full disk, a read-only disk, a
folder in the way, a signal), leave no temporary file, take the umask, and name the user's path.

The `tmpfs` fixture (also used by test_embed.py, test_signals.py and test_cache.py) mounts a
small real file system, so "disk full" and "read-only" are the kernel's, not a mock's.
"""
import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from contrastive_cli.files import (
    WriteError,
    replace_all,
    sha256_file,
    write_atomic,
    write_temp,
)


class Tmpfs:
    """A mounted tmpfs of `size` bytes: fill it, make it read-only; unmounted by the fixture."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take all but `leave` bytes (rounded to pages) with a filler file."""
        with open(self.path / ".filler", "ab") as f:
            while self.free() > leave:
                try:
                    f.write(b"\0" * min(65536, self.free() - leave))
                    f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)


def mounted_tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only: skipped elsewhere). Other modules: `tmpfs = pytest.fixture(mounted_tmpfs)`."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    size = 2 << 20
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield Tmpfs(path, size)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


tmpfs = pytest.fixture(mounted_tmpfs)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_take_the_umask_not_mkstemps_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode


def test_a_real_full_disk_keeps_the_old_file_and_names_it(tmpfs):
    target = tmpfs.path / "data.bin"
    target.write_bytes(b"old bytes")
    tmpfs.fill(leave=64 << 10)
    before = snapshot(tmpfs.path)
    with pytest.raises(WriteError) as e:
        write_atomic(target, lambda f: f.write(b"n" * (1 << 20)))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert str(target) in str(e.value) and "No space left on device" in str(e.value)
    assert snapshot(tmpfs.path) == before  # old file intact, no temporary file


def test_a_read_only_disk_and_a_folder_in_the_way(tmpfs):
    (tmpfs.path / "x.npy").mkdir()
    with pytest.raises(WriteError, match="Is a directory"):
        write_atomic(tmpfs.path / "x.npy", lambda f: f.write(b"x"))
    (tmpfs.path / "keep.txt").write_text("mine")
    tmpfs.read_only()
    with pytest.raises(WriteError) as e:
        write_atomic(tmpfs.path / "keep.txt", lambda f: f.write(b"new"))
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmpfs.path / "keep.txt")
    assert snapshot(tmpfs.path) == {"keep.txt": b"mine"}


def test_stop_renames_nothing_and_removes_the_temporary_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    b.write_text("old b")
    moves = [(write_temp(a, lambda f: f.write(b"new a")), a), (write_temp(b, lambda f: f.write(b"new b")), b)]
    with pytest.raises(KeyboardInterrupt):
        replace_all(moves, stop=lambda: True)
    assert snapshot(tmp_path) == {"a": b"old a", "b": b"old b"}


def test_a_signal_between_two_renames_waits_for_the_second(tmp_path, monkeypatch):
    """SIGINT arrives during the first rename: both renames happen, then the handler runs."""
    a, b = tmp_path / "a", tmp_path / "b"
    moves = [(write_temp(a, lambda f: f.write(b"A")), a), (write_temp(b, lambda f: f.write(b"B")), b)]
    real_replace, seen = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        if not seen:
            seen.append(dst)
            signal.raise_signal(signal.SIGINT)  # Python runs the handler at the next bytecode

    monkeypatch.setattr(os, "replace", replace)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            replace_all(moves)
    finally:
        signal.signal(signal.SIGINT, old)
    assert snapshot(tmp_path) == {"a": b"A", "b": b"B"}


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
