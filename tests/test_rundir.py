"""train/rundir.py: --force replaces only provable runs and only their entries; one writer at a time
(RUN/.lock, a stale one taken over); a corrupt newest checkpoint falls back to the previous one for
loading and resuming; --resume with a larger --steps extends a finished run.

Every refusal must leave the user's files byte-identical: the tree is hashed before and after.
"""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli import checkpoint
from contrastive_cli.cli import app
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.data.scan import LOCK_NAME, RUN_MARKER
from contrastive_cli.errors import CheckpointError
from contrastive_cli.infer.encoder import _abstract_model, load_encoder
from contrastive_cli.train.loop import Monitor, pretrain
from contrastive_cli.train.rundir import RunDir

runner = CliRunner()
CFG = TrainConfig.tiny(model=ModelConfig(image_size=16), batch_size=4, steps=2, checkpoint_every=1)
TINY = ["--batch-size", "4", "--image-size", "16", "--quiet", "--no-cache"]


def tree_hash(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too): its kind and, for a file, its bytes' sha256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_images(folder: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def fake_run(path: Path, *, marked: bool = True) -> Path:
    """A folder laid out as a run (no real checkpoint inside: --force never reads one)."""
    (path / "checkpoints" / "3" / "model").mkdir(parents=True)
    (path / "checkpoints" / "3" / "model" / "_METADATA").write_text("{}")
    (path / "checkpoints" / "4.orbax-checkpoint-tmp-1733").mkdir()  # a save cut short
    config = {**CFG.to_json(), **({RUN_MARKER: 1} if marked else {})}
    (path / "config.json").write_text(json.dumps(config))
    for name in ["metrics.jsonl", "metrics.png", "summary.json", "skipped.txt", ".metrics.png.k3j2_x.tmp"]:
        (path / name).write_text(name)
    return path


# ---- --force: provable runs only, their entries only -----------------------------------------------
def _own_config(tmp, images):
    out = tmp / "project"
    out.mkdir()
    (out / "config.json").write_text('{"lr": 0.1}')  # the user's own config.json
    (out / "notes.txt").write_text("precious")
    return out, "not a run directory"


def _the_image_folder(tmp, images):
    (images / "config.json").write_text(json.dumps({RUN_MARKER: 1}))  # even when it looks like a run
    return images, "is the image folder"


def _its_parent(tmp, images):
    fake_run(images.parent)
    return images.parent, "holds the image folder"


def _the_current_directory(tmp, images):
    fake_run(tmp / "here")
    os.chdir(tmp / "here")
    return Path("."), "is the current directory"


def _the_home_directory(tmp, images):
    fake_run(tmp / "home")
    os.environ["HOME"] = str(tmp / "home")  # restored by the monkeypatch in the test
    return tmp / "home", "is the home directory"


def _a_plain_file(tmp, images):
    (tmp / "model.bin").write_bytes(b"weights")
    return tmp / "model.bin", "is a file"


def _a_run_with_a_foreign_file(tmp, images):
    out = fake_run(tmp / "run")
    (out / "paper.tex").write_text("precious")
    return out, "holds paper.tex"


def _a_foreign_file_in_checkpoints(tmp, images):
    out = fake_run(tmp / "run")
    (out / "checkpoints" / "best.pkl").write_bytes(b"mine")
    return out, "holds checkpoints/best.pkl"


def _an_old_layout_folder_without_checkpoints(tmp, images):
    out = tmp / "exp"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(CFG.to_json()))  # no marker, no checkpoints/
    return out, "not written by contrastive"


@pytest.mark.parametrize("case", [_own_config, _the_image_folder, _its_parent, _the_current_directory,
                                  _the_home_directory, _a_plain_file, _a_run_with_a_foreign_file,
                                  _a_foreign_file_in_checkpoints, _an_old_layout_folder_without_checkpoints])
def test_force_refuses_and_leaves_every_file_byte_identical(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/"))
    images = write_images(tmp_path / "data" / "images", n=2)
    out, message = case(tmp_path, images)
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match=message) as e:
        pretrain(images, CFG, out, force=True, cache=False)
    assert "\n" not in str(e.value)
    assert tree_hash(tmp_path) == before
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(out), "--force", "--steps", "2", *TINY])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "before-the-marker"])
def test_force_replaces_a_run_removing_only_its_own_entries(marked, tmp_path):
    out = fake_run(tmp_path / "run", marked=marked)
    run = RunDir(out)
    with run.lock(fresh=True, force=True):
        run.create(CFG, force=True)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.json"]
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert json.loads((out / "config.json").read_text())[RUN_MARKER] == 1


def test_without_force_an_existing_run_is_kept(tmp_path):
    out = fake_run(tmp_path / "run")
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match="already exists; pass --resume .* or --force"):
        with RunDir(out).lock(fresh=True, force=False):
            pass
    assert tree_hash(tmp_path) == before


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="none of the 1 image files"):
        pretrain(images, CFG, tmp_path / "new" / "run", cache=False)
    assert not (tmp_path / "new" / "run").exists()


# ---- the lock ------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    out = fake_run(tmp_path / "run")
    (out / LOCK_NAME).write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # a SIGKILLed run's
    with RunDir(out).lock(fresh=False):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert not (out / LOCK_NAME).exists()


_CONTENDER = """
import sys, time
from pathlib import Path
from contrastive_cli.errors import CheckpointError
from contrastive_cli.train.rundir import RunDir
out, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
try:
    with RunDir(out).lock(fresh=False):
        held = time.time()
        time.sleep(1.0)
        (out.parent / f"held-{sys.argv[3]}").write_text(f"{held} {time.time()}")
except CheckpointError as e:
    print(e)
"""


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_by_one_of_several_at_once(tmp_path):
    """Real processes that all find the same stale lock at the same moment: one holds it at a time
    (a late starter may take it after the first let go). Before the takeover was guarded, two of
    six held it at once in one of three trials (test_a_taker_that_was_overtaken_... is the
    deterministic half)."""
    for trial in range(1):
        root = tmp_path / str(trial)
        out = fake_run(root / "run")
        (out / LOCK_NAME).write_text(f"{_dead_pid()} {socket.gethostname()}\n")
        start = time.time() + 3.0  # every contender imported and spinning by then
        procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(out), str(start), str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(6)]
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        spans = sorted(tuple(map(float, p.read_text().split())) for p in root.glob("held-*"))
        assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (spans, outputs)
        assert len(spans) + sum("in use by process" in o for o in outputs) == 6, outputs


def test_a_taker_that_was_overtaken_leaves_the_new_lock_alone(tmp_path):
    """The moment of the race: this process judged the lock stale, but another took it over before
    this one acted. The takeover must see that and keep the other's lock."""
    out = fake_run(tmp_path / "run")
    stale = (_dead_pid(), socket.gethostname())
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")  # the other's, fresh
        (out / "mine.tmp").write_text(f"{os.getpid()} {socket.gethostname()}\n")
        assert not RunDir(out)._take_over(out / LOCK_NAME, out / "mine.tmp", stale)
        assert (out / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_a_live_lock_names_its_holder(tmp_path):
    out = fake_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        before = tree_hash(tmp_path)
        for fresh in (True, False):  # --force and --resume
            with pytest.raises(CheckpointError, match=f"in use by process {holder.pid} ") as e:
                with RunDir(out).lock(fresh=fresh, force=True):
                    pass
            assert "\n" not in str(e.value)
        assert tree_hash(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    (out / LOCK_NAME).write_text("4242 elsewhere.example\n")  # another host: cannot tell, never taken
    with pytest.raises(CheckpointError, match=f"process 4242 on elsewhere.example .*delete {out / LOCK_NAME}"):
        with RunDir(out).lock(fresh=False):
            pass


@pytest.mark.slow
def test_a_second_pretrain_stops_with_the_pid_of_the_running_one(tmp_path):
    images = write_images(tmp_path / "images")
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cli = [sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(images), "-o", str(out)]
    first = subprocess.Popen([*cli, "--steps", "100000", "--log-every", "1", *TINY], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.1)
        assert (out / LOCK_NAME).read_text().split()[0] == str(first.pid)
        second = subprocess.run([*cli, "--force", "--steps", "2", *TINY], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], second.stderr
        resumed = runner.invoke(app, ["pretrain", str(images), "-o", str(out), "--resume", "--quiet"])
        assert resumed.exit_code == 1 and f"in use by process {first.pid}" in resumed.stderr
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / LOCK_NAME).exists()  # released on the way out


# ---- a corrupt newest checkpoint; extending a finished run ------------------------------------------
class Warnings(Monitor):
    def __init__(self):
        self.messages = []

    def warn(self, message):
        self.messages.append(message)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_and_a_larger_steps_extends(tmp_path):
    images = write_images(tmp_path / "images")
    out = tmp_path / "run"
    pretrain(images, CFG, out, cache=False)
    assert checkpoint.saved_steps(out) == [1, 2]
    data = max((p for p in (out / "checkpoints" / "2" / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)  # a disk that filled, a copy cut short

    encoder = load_encoder(out)
    assert encoder.step == 1 and encoder.notes and "cannot be read" in encoder.notes[0]  # load: the previous step
    notes = []
    _, abstract = _abstract_model(checkpoint.read_config(out))
    step, _ = checkpoint.restore_model(out, abstract, warn=notes.append)
    assert step == 1 and len(notes) == 1 and "step 1 instead" in notes[0] and "\n" not in notes[0]
    assert "cannot be read" in notes[0] and str(out / "checkpoints" / "2") in notes[0]
    with pytest.raises(CheckpointError, match="cannot be read") as e:  # the step itself, asked for
        checkpoint.restore_model(out, abstract, step=2)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    a, b = str(images / "0.png"), str(images / "1.png")  # the commands say so, as a warning
    labeled = tmp_path / "labeled"
    for c, names in (("a", range(4)), ("b", range(4, 8))):
        (labeled / c).mkdir(parents=True)
        for i in names:
            (labeled / c / f"{i}.png").write_bytes((images / f"{i}.png").read_bytes())
    for args in (["embed", str(images), "--model", str(out), "--output", str(tmp_path / "e.npy")],
                 ["similarity", a, b, "--model", str(out)],
                 ["evaluate", str(labeled), "--model", str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "warning:" in result.stderr and "using step 1 instead" in result.stderr, (args[0], result.stderr)

    monitor = Warnings()  # resume: from step 1, again to 2
    summary = pretrain(images, TrainConfig(), out, resume=True, cache=False, monitor=monitor)
    assert (summary["resumed_from"], summary["steps"]) == (1, 2)
    assert any("using step 1 instead" in m for m in monitor.messages), monitor.messages

    monitor = Warnings()  # the run is finished: a larger --steps extends it
    summary = pretrain(images, TrainConfig(steps=4), out, resume=True, cache=False, monitor=monitor)
    assert (summary["resumed_from"], summary["steps"]) == (2, 4) and summary["final_loss"] is not None
    assert any("extending it to 4" in m for m in monitor.messages), monitor.messages
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert checkpoint.saved_steps(out) == [3, 4]
    lrs = [json.loads(line).get("lr") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(lr is None or np.isfinite(lr) for lr in lrs)

    for step in checkpoint.saved_steps(out):  # nothing restores: one line, every step named
        for p in (out / "checkpoints" / str(step) / "model").rglob("*"):
            if p.is_file() and p.stat().st_size > 10_000:
                os.truncate(p, 100)
    with pytest.raises(CheckpointError, match=r"steps? 3 cannot be read either") as e:
        load_encoder(out)
    assert "\n" not in str(e.value)
    assert jax.devices()  # the backend survived it all
