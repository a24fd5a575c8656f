"""checkpoint.py: the model apart from the training state. An encoder loads from a checkpoint that
holds no optimizer state; runs saved in the old one-item layout still load and resume."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli import checkpoint
from contrastive_cli.cli import app
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.errors import CheckpointError
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.train.loop import pretrain
from test_files import mounted_tmpfs

pytestmark = pytest.mark.slow  # real training runs

runner = CliRunner()
tmpfs = pytest.fixture(mounted_tmpfs)
CFG = TrainConfig.tiny(model=ModelConfig(image_size=16, embed_grid=1), steps=2)  # grid 1: h is what is centred


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    pretrain(root / "images", CFG, root / "run", cache=False)
    return root


def copy_run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def test_a_grid_2_run_saves_one_centre_per_cell(tmp_path):
    """On the embedding grid each cell is centred on its own mean over the training images (the
    cells' means differ: a corner is not the middle); read on another grid, the cells' mean serves
    every cell; a centre of one cell for all (runs before 0.3.1) is used for every cell."""
    import jax.numpy as jnp
    from contrastive_cli.data.decode import decode_or_reason
    from contrastive_cli.infer.encoder import embed_in_batches, no_centre, sharded_forward, unit_features

    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for i in range(12):  # a bright top half: the cells' means differ
        img = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
        img[:8] += 120
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.png")
    cfg = TrainConfig.tiny(model=ModelConfig(image_size=16, embed_grid=2), steps=2)
    pretrain(tmp_path / "images", cfg, tmp_path / "run", cache=False)
    encoder = load_encoder(tmp_path / "run")
    width = no_centre(encoder.cfg).shape[0]
    assert encoder.centre.shape == (4 * width,) == (encoder.dim,)
    x = np.stack([decode_or_reason(f, 16) for f in sorted((tmp_path / "images").glob("*.png"))])
    raw = embed_in_batches(sharded_forward(encoder.graphdef, encoder.cfg, encoder._mesh, unit=False), encoder.params,
                           encoder.stats, x, encoder._mesh, 8, centre=no_centre(encoder.cfg))
    # From the training images as cached (24 px, resized): each cell's direction, not its numbers.
    for got, mean in zip(encoder.centre.reshape(4, width), raw.mean(axis=0).reshape(4, width)):
        assert float(got @ mean / np.linalg.norm(got) / np.linalg.norm(mean)) > 0.95
    want = raw - encoder.centre
    np.testing.assert_allclose(encoder.embed(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    one = load_encoder(tmp_path / "run", embed_grid=1)
    np.testing.assert_allclose(one.centre, encoder.centre.reshape(4, width).mean(axis=0), rtol=1e-6)
    # An [F] centre (saved before 0.3.1) is every cell's: the same as that centre tiled.
    forward = unit_features(encoder.graphdef, encoder.cfg)
    c = jnp.asarray(one.centre)
    np.testing.assert_allclose(forward(encoder.params, encoder.stats, jnp.asarray(x), c),
                               forward(encoder.params, encoder.stats, jnp.asarray(x), jnp.tile(c, 4)), atol=1e-6)


def test_a_step_is_saved_as_model_train_and_centre_items(trained):
    (step,) = checkpoint.saved_steps(trained / "run")
    items = sorted(p.name for p in (trained / "run" / "checkpoints" / str(step)).iterdir() if p.is_dir())
    assert items == ["centre", "model", "train"]


def test_embeddings_are_centred_on_the_training_images_mean(trained, tmp_path):
    """embed writes unit(h - centre), the centre being the mean of h over the training images, so
    cosines spread around 0 instead of sharing the ReLU features' common direction. A run saved
    without a centre (before 0.2.1) embeds unit(h), as it always did."""
    from contrastive_cli.data.decode import decode_or_reason
    from contrastive_cli.infer.encoder import embed_in_batches, no_centre, sharded_forward

    encoder = load_encoder(trained / "run")
    files = sorted((trained / "images").rglob("*.png"))
    x = np.stack([decode_or_reason(f, 16) for f in files])  # as embed decodes them
    raw = embed_in_batches(sharded_forward(encoder.graphdef, encoder.cfg, encoder._mesh, unit=False), encoder.params,
                           encoder.stats, x, encoder._mesh, 8, centre=no_centre(encoder.cfg))
    assert encoder.centre.shape == (encoder.dim,) and np.isfinite(encoder.centre).all()
    # The centre came from the training images as cached for training (24 px) resized to 16 in
    # memory; embed decodes them to 16 directly: the same direction, not the same numbers (the
    # images are noise, the worst case for resampling).
    mean = raw.mean(axis=0)
    assert float(encoder.centre @ mean / np.linalg.norm(encoder.centre) / np.linalg.norm(mean)) > 0.95
    want = raw - encoder.centre
    np.testing.assert_allclose(encoder.embed(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    cos = encoder.embed(x) @ encoder.embed(x).T
    assert abs(np.median(cos[np.triu_indices(len(x), 1)])) < 0.5  # centred: unrelated images spread around 0

    run = copy_run(trained, tmp_path)
    (step,) = checkpoint.saved_steps(run)
    shutil.rmtree(run / "checkpoints" / str(step) / "centre")
    old = load_encoder(run)
    assert old.centre is None
    np.testing.assert_allclose(old.embed(x), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_embed_similarity_and_evaluate_need_no_optimizer_state(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    reference = load_encoder(trained / "run")
    (step,) = checkpoint.saved_steps(run)
    shutil.rmtree(run / "checkpoints" / str(step) / "train")  # the optimizer's moments, step, schedule
    encoder = load_encoder(run)
    for a, b in zip(jax.tree.leaves((encoder.params, encoder.stats)), jax.tree.leaves((reference.params, reference.stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = trained / "images"
    out = runner.invoke(app, ["embed", str(images), "--model", str(run), "--output", str(tmp_path / "e.npy")])
    assert out.exit_code == 0, out.output
    assert np.load(tmp_path / "e.npy").shape == (12, encoder.dim)
    out = runner.invoke(app, ["similarity", str(images / "a" / "0.png"), str(images / "b" / "0.png"), "--model", str(run)])
    assert out.exit_code == 0 and -1 <= float(out.stdout) <= 1
    out = runner.invoke(app, ["evaluate", str(images), "--model", str(run), "--json"])
    assert out.exit_code == 0, out.output
    # ... while resuming it needs the training state, and says so in one line
    with pytest.raises(CheckpointError, match="holds no training state"):
        pretrain(images, CFG, run, resume=True, cache=False)


def _to_legacy_layout(run):
    """Rewrite the run's checkpoint as runs before 0.2 saved it: one `default` item, whole state."""
    import orbax.checkpoint as ocp

    (step,) = checkpoint.saved_steps(run)
    where = run / "checkpoints" / str(step)
    state = {**ocp.StandardCheckpointer().restore(where / "model"), **ocp.StandardCheckpointer().restore(where / "train")}
    shutil.rmtree(where)
    mngr = ocp.CheckpointManager(run.absolute() / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    mngr.close()
    assert sorted(p.name for p in where.iterdir() if p.is_dir()) == ["default"]


def test_a_run_in_the_old_layout_still_embeds_and_resumes(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    _to_legacy_layout(run)
    old, new = load_encoder(run), load_encoder(trained / "run")
    assert old.centre is None  # 0.1 saved none: its embeddings stay uncentred, as they were
    new.centre = None
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(old.embed(x), new.embed(x))
    summary = pretrain(trained / "images", CFG, run, resume=True, cache=False)  # the whole state restores
    assert summary["resumed_from"] == 2 and summary["steps"] == 2


def test_no_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    CFG.save(tmp_path / "run" / "config.json")
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        load_encoder(tmp_path / "run")


def test_every_step_has_a_digest_and_a_changed_byte_is_caught(trained, tmp_path):
    """Orbax stores arrays raw with no checksum: without digest.json a flipped byte would load as a
    silently different weight. With it: one line naming the file, and `embed` exits 1."""
    run = copy_run(trained, tmp_path)
    (step,) = checkpoint.saved_steps(run)
    where = run / "checkpoints" / str(step)
    listed = json.loads((where / checkpoint.DIGEST).read_text())["sha256"]
    assert {p.relative_to(where).as_posix() for p in where.rglob("*") if p.is_file()} - set(listed) == {checkpoint.DIGEST}
    data = max((p for p in (where / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x40  # one bit in the middle of the weights
    data.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="changed since it was saved") as e:
        load_encoder(run)
    assert str(data.relative_to(where)) in str(e.value) and "\n" not in str(e.value)
    out = runner.invoke(app, ["embed", str(trained / "images"), "--model", str(run), "--output", str(tmp_path / "e.npy")])
    assert out.exit_code == 1 and "changed since it was saved" in out.output and not (tmp_path / "e.npy").exists()

    (where / checkpoint.DIGEST).unlink()  # a step saved before digests: read unchecked, as before
    assert load_encoder(run).step == step


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_step(tmp_path, tmpfs):
    """A real `contrastive pretrain` process whose checkpoint does not fit on a real tmpfs: exit 1,
    one line naming the folder and the OS's reason (no tracebacks from Orbax's threads, before or
    after), and no half-written step folder left."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmpfs.path / "run"  # 2 MiB: config.json and metrics fit, the small CNN's checkpoint does not
    env = {k: v for k, v in os.environ.items() if k != "CONTRASTIVE_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "contrastive_cli", "pretrain", str(images), "--steps", "2",
                          "-b", "4", "--image-size", "16", "--quiet", "--no-cache", "--output", str(run)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert "could not save a checkpoint" in out.stderr and "No space left on device" in out.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == []
