"""embed: replacing a pair never loses the old one. A real full disk (at either of the two files), a
read-only disk, a folder named X.npy, a signal before the renames: exit 1 (or KeyboardInterrupt),
one line, the old .npy/.json byte-identical and still a consistent pair, no temporary file."""
import os

import numpy as np
import pytest
from hostile import write_good_folder
from test_files import mounted_tmpfs, snapshot
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.infer.embed import embed_folder
from contrastive_cli.infer.embfile import load_embeddings

pytestmark = pytest.mark.slow  # trains a run

runner = CliRunner()
tmpfs = pytest.fixture(mounted_tmpfs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    folder = write_good_folder(root / "images", n=8)
    result = runner.invoke(app, ["pretrain", str(folder), "-o", str(root / "run"), "--steps", "1",
                                 "--batch-size", "4", "--image-size", "16", "--embed-grid", "1", "--quiet"])
    assert result.exit_code == 0, result.output  # grid 1: 256 features, the page counts below
    return folder, root / "run"


def messages(stderr: str) -> list[str]:
    """stderr without the progress bar: what the user is told."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("embedding ")]


def embed(model, out, *extra):
    folder, run = model
    return runner.invoke(app, ["embed", str(folder), "-m", str(run), "-o", str(out), *extra])


@pytest.mark.parametrize("leave, failing", [(4096, "e.npy"), (12288, "e.json")])
def test_embed_force_on_a_full_disk_keeps_the_old_pair(model, tmpfs, leave, failing):
    """8 rows x 256 float32: the .npy takes 3 pages. 1 page free: the .npy fails; 3: the index fails."""
    out = tmpfs.path / "e.npy"
    assert embed(model, out).exit_code == 0
    tmpfs.fill(leave=leave)
    before = snapshot(tmpfs.path)
    result = embed(model, out, "--force")
    assert result.exit_code == 1, result.output
    assert messages(result.stderr) == [f"error: cannot write {tmpfs.path / failing}: No space left on device"]
    assert result.stdout == ""
    assert snapshot(tmpfs.path) == before  # every file byte-identical, no temporary file
    x, index = load_embeddings(out)  # and still a pair that agrees
    assert x.shape == (8, index["dim"])


def test_embed_into_a_read_only_disk_or_onto_a_folder(model, tmpfs):
    (tmpfs.path / "x.npy").mkdir()
    result = embed(model, tmpfs.path / "x.npy", "--force")
    folder_line = f"error: {tmpfs.path / 'x.npy'} is a folder; give a file name for the embeddings"
    assert result.exit_code == 1 and messages(result.stderr) == [folder_line]
    out = tmpfs.path / "e.npy"
    assert embed(model, out).exit_code == 0
    tmpfs.read_only()
    before = snapshot(tmpfs.path)
    result = embed(model, out, "--force")
    assert result.exit_code == 1 and len(messages(result.stderr)) == 1
    assert "read-only" in result.stderr and str(tmpfs.path) in result.stderr
    assert snapshot(tmpfs.path) == before


def test_a_signal_before_the_renames_leaves_the_old_pair(model, tmp_path):
    folder, run = model
    out = tmp_path / "e.npy"
    embed_folder(folder, run, out)
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(folder, run, out, force=True, dtype="float16", stop=lambda: True)
    assert snapshot(tmp_path) == before


def test_outputs_take_the_umask(model, tmp_path):
    folder, run = model
    old = os.umask(0o022)
    try:
        embed_folder(folder, run, tmp_path / "e.npy")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"e.npy": 0o644, "e.json": 0o644}
    x, index = load_embeddings(tmp_path / "e.npy")
    assert np.isfinite(x).all() and len(index["paths"]) == 8


# --- incremental: a second embed of the folder embeds only what changed -------------------------

def _picture(path, seed):
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


def test_embed_again_after_adding_changing_and_deleting_files_equals_a_fresh_embed(model, tmp_path):
    import shutil

    from contrastive_cli.infer import ann

    folder, run = model
    images = shutil.copytree(folder, tmp_path / "images")
    out = tmp_path / "e.npy"
    first = embed_folder(images, run, out)
    assert "update" not in first and len(first["files"]) == 8
    before = snapshot(tmp_path)
    again = embed_folder(images, run, out)  # nothing changed: nothing written
    assert again["update"] == {"reused": 8, "embedded": 0, "removed": 0} and snapshot(tmp_path) == before
    built = ann.build_index(load_embeddings(out)[0], tie=(first["npy_bytes"], first["npy_sha256"]))
    ann.save_index(ann.ann_path(out), built)  # an index beside: the update must rebuild it
    _picture(images / "img002.png", seed=100)  # changed
    (images / "img005.png").unlink()  # deleted
    _picture(images / "a-new.png", seed=101)  # added: sorts first
    (images / "sub").mkdir()
    _picture(images / "sub" / "z.png", seed=102)
    updated = embed_folder(images, run, out)
    assert updated["update"] == {"reused": 6, "embedded": 3, "removed": 1}
    fresh = embed_folder(images, run, tmp_path / "fresh.npy")
    x, index = load_embeddings(out)
    y, ref = load_embeddings(tmp_path / "fresh.npy")
    assert index["paths"] == ref["paths"] and index["files"] == ref["files"] == fresh["files"]
    np.testing.assert_allclose(x, y, atol=1e-5)
    loaded, why = ann.load_index(ann.ann_path(out), x, ann.npy_digest(out, index))
    assert why is None and loaded.header["rows"] == 9


def test_embed_over_a_pair_of_other_settings_needs_force(model, tmp_path):
    folder, run = model
    out = tmp_path / "e.npy"
    assert embed(model, out).exit_code == 0
    before = snapshot(tmp_path)
    result = embed(model, out, "--dtype", "float16")
    assert result.exit_code == 1 and result.stdout == ""
    assert messages(result.stderr) == [f"error: {out} already exists and it holds float32, not float16; "
                                       f"pass --force to replace it"]
    assert snapshot(tmp_path) == before
    result = embed(model, out)
    assert result.exit_code == 0 and "up to date" in result.stderr
    (tmp_path / "other.npy").write_bytes(b"a user's file")
    result = embed(model, tmp_path / "other.npy")
    assert result.exit_code == 1 and "already exists and cannot be updated" in result.stderr
    assert (tmp_path / "other.npy").read_bytes() == b"a user's file"
    assert embed(model, out, "--force", "--dtype", "float16").exit_code == 0
    assert load_embeddings(out)[0].dtype == np.float16
