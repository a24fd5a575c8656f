"""Hostile folders and bad input: never crash, never lose anything, always say what happened.

One hostile folder (tests/hostile.py) goes through the library and both commands; two real
`contrastive pretrain` processes are stopped, one by SIGINT and one by SIGKILL, and their runs must
still embed and resume. Everything else runs in this process, sharing one run directory.
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from contrastive_cli.data import decode as data
from contrastive_cli.cli import app
from contrastive_cli.infer.embed import embed_folder
from hostile import write_good_folder, write_hostile_folder

pytestmark = pytest.mark.slow  # real training runs or subprocesses

runner = CliRunner()
TINY = ["--batch-size", "4", "--image-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return write_hostile_folder(tmp_path_factory.mktemp("hostile") / "photos")


@pytest.fixture(scope="module")
def run(hostile, tmp_path_factory):
    """`contrastive pretrain` on the hostile folder: (CliRunner result, run directory)."""
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    result = runner.invoke(app, ["pretrain", str(hostile["root"]), "-o", str(out), "--steps", "2", *TINY])
    return result, out


def usage_text(stderr: str) -> str:
    """Typer's boxed usage error as one line: borders dropped, wrapped lines joined."""
    return " ".join(stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def read_skipped_txt(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # names are written as their bytes
    return dict(line.split("\t", 1) for line in text.splitlines())


def assert_reasons(found: dict[str, str], expected: dict[str, str]):
    assert sorted(found) == sorted(expected)
    for path, fragment in expected.items():
        assert fragment in found[path], (path, found[path])


# ---- the library -------------------------------------------------------------------------------------
def test_load_folder_uses_every_good_file_and_says_why_it_skips_each_bad_one(hostile):
    result = []
    t = threading.Thread(target=lambda: result.append(data.load_folder(hostile["root"], 24)), daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # a hang is the failure; unblock a FIFO reader so the test run can still end
        if (hostile["root"] / "pipe.jpg").exists():
            os.close(os.open(hostile["root"] / "pipe.jpg", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_folder did not finish within 60 s")
    images = result[0]
    assert images.paths == sorted(hostile["good"])  # hidden files, notes.txt, sub/loop_dir: not there
    assert images.images.shape == (len(hostile["good"]), 24, 24, 3)
    assert_reasons(dict(images.skipped), hostile["skipped"])
    for rel, (top, bottom) in hostile["colour"].items():
        im = images.images[images.paths.index(rel)].astype(int)
        assert np.abs(im[:3].mean((0, 1)) - top).max() < 12, (rel, im[:3].mean((0, 1)))
        assert np.abs(im[-3:].mean((0, 1)) - bottom).max() < 12, (rel, im[-3:].mean((0, 1)))


# ---- pretrain and embed on the hostile folder -----------------------------------------------------
def test_pretrain_uses_good_images_and_lists_every_skip(run, hostile):
    result, out = run
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    n_good, n_bad = len(hostile["good"]), len(hostile["skipped"])
    assert not error_lines(result.stderr)
    assert f"skipped {n_bad} of {n_good + n_bad} files" in result.stderr
    assert str(out / "skipped.txt") in result.stderr
    assert_reasons(read_skipped_txt(out / "skipped.txt"), hostile["skipped"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["skipped"]) == (n_good, n_bad)


def test_embed_leaves_skipped_files_out_of_the_index_and_says_so(run, hostile, tmp_path):
    _, model = run
    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", str(hostile["root"]), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert not error_lines(result.stderr)
    index = json.loads(out.with_suffix(".json").read_text())
    assert index["paths"] == sorted(hostile["good"])
    assert_reasons({s["path"]: s["reason"] for s in index["skipped"]}, hostile["skipped"])
    emb = np.load(out)
    assert emb.shape == (len(hostile["good"]), index["dim"]) and np.isfinite(emb).all()
    assert f"left out {len(hostile['skipped'])} unreadable file(s)" in result.stderr
    # Run again, the unreadable files (a broken link among them) are tried again, the rest is kept.
    before = out.read_bytes()
    again = runner.invoke(app, ["embed", str(hostile["root"]), "-m", str(model), "-o", str(out)])
    assert again.exit_code == 0 and "up to date" in again.stderr, again.output
    assert out.read_bytes() == before and not error_lines(again.stderr)


def test_a_folder_whose_own_name_is_not_utf8(tmp_path):
    try:
        folder = write_good_folder(tmp_path / os.fsdecode(b"caf\xe9"), n=4)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem only takes UTF-8 names")
    result = runner.invoke(app, ["pretrain", str(folder), "-o", str(tmp_path / "run"), "--steps", "2", *TINY])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["pretrain", "embed"])
def test_a_folder_without_usable_images_exits_1_with_one_line(command, run, hostile, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for rel in ["empty.jpg", "text.jpg", "truncated.jpg", "bomb.png"]:
        (bad / rel).write_bytes((hostile["root"] / rel).read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = ["-o", str(tmp_path / "r"), "--steps", "2", *TINY] if command == "pretrain" else \
        ["-m", str(run[1]), "-o", str(tmp_path / "e.npy")]
    for folder, message in [(bad, "none of the 4 image files"), (empty, "no image files in")]:
        result = runner.invoke(app, [command, str(folder), *extra])
        assert result.exit_code == 1, result.output
        assert len(error_lines(result.stderr)) == 1 and message in result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "e.npy").exists()


# ---- outputs are never overwritten, and writes are atomic -------------------------------------------
def test_a_run_directory_is_replaced_only_with_force(run, hostile, tmp_path):
    _, out = run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = runner.invoke(app, ["pretrain", str(hostile["root"]), "-o", str(out), "--steps", "2", *TINY])
    assert result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    not_a_run = tmp_path / "thesis"  # --force replaces runs only, never other folders
    not_a_run.mkdir()
    (not_a_run / "chapter1.tex").write_text("precious")
    result = runner.invoke(app, ["pretrain", str(hostile["root"]), "-o", str(not_a_run), "--force",
                                 "--steps", "2", *TINY])
    assert result.exit_code == 1 and "not a run directory" in result.stderr
    assert (not_a_run / "chapter1.tex").read_text() == "precious"

    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "config.json").write_text((out / "config.json").read_text())
    (old_run / "notes.txt").write_text("the user's")  # not a file a run writes: refused, kept
    result = runner.invoke(app, ["pretrain", str(hostile["root"]), "-o", str(old_run), "--force",
                                 "--steps", "2", *TINY])
    assert result.exit_code == 1 and "notes.txt" in result.stderr and "which a run does not write" in result.stderr
    assert (old_run / "notes.txt").read_text() == "the user's"
    (old_run / "notes.txt").unlink()
    (old_run / "metrics.jsonl").write_text("{}\n")  # what the previous run wrote is replaced
    result = runner.invoke(app, ["pretrain", str(hostile["root"]), "-o", str(old_run), "--force",
                                 "--steps", "2", *TINY])
    assert result.exit_code == 0, result.output
    assert (old_run / "summary.json").is_file() and (old_run / "metrics.jsonl").read_text() != "{}\n"


def test_embeddings_are_replaced_only_with_force_and_survive_a_failing_embed(run, hostile, tmp_path, monkeypatch):
    _, model = run
    out = tmp_path / "emb.npy"
    out.write_bytes(b"old embeddings")
    out.with_suffix(".json").write_text('{"old": true}')
    result = runner.invoke(app, ["embed", str(hostile["root"]), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr

    bad = tmp_path / "bad"  # --force, but nothing usable: the old files stay
    bad.mkdir()
    (bad / "text.jpg").write_text("no")
    result = runner.invoke(app, ["embed", str(bad), "-m", str(model), "-o", str(out), "--force"])
    assert result.exit_code == 1

    def disk_full(f, array):  # np.save dies half way through writing the new file
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("contrastive_cli.infer.embed.np.save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        embed_folder(hostile["root"], model, out, force=True)
    assert out.read_bytes() == b"old embeddings"
    assert out.with_suffix(".json").read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "emb.json", "emb.npy"]  # no temp file left


# ---- argument errors: Typer's usage error, exit 2 -----------------------------------------------------
@pytest.mark.parametrize("args, shown", [
    (["pretrain", "{folder}", "--encoder", "vgg"], "'vgg' is not one of"),
    (["pretrain", "{folder}", "--loss", "hinge"], "'hinge' is not one of"),
    (["pretrain", "{folder}", "--optimizer", "adam"], "'adam' is not one of"),
    (["pretrain", "{file}"], "f.jpg is a file, not a folder"),
    (["pretrain", "{folder}", "--steps", "3", "--epochs", "2"], "--steps (3), --epochs (2)"),
    (["pretrain", "{folder}", "--resume"], "--resume needs --output"),
    (["embed", "{file}", "-m", "{folder}"], "f.jpg is a file, not a folder"),
    (["embed", "{folder}", "-m", "{folder}", "--dtype", "int8"], "'int8' is not one of"),
])
def test_argument_errors_are_usage_errors_naming_the_value(args, shown, tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    result = runner.invoke(app, [a.format(folder=tmp_path, file=tmp_path / "f.jpg") for a in args])
    assert result.exit_code == 2, result.output
    # Rich breaks a path longer than the box anywhere (pytest-xdist's tmp paths are), so compare without spaces
    assert "Usage:" in result.stderr and shown.replace(" ", "") in usage_text(result.stderr).replace(" ", "")


@pytest.mark.parametrize("args, option, value", [
    (["pretrain", "{folder}", "--steps", "-1"], "'--steps'", "-1"),
    (["pretrain", "{folder}", "--epochs", "-3"], "'--epochs'", "-3"),
    (["pretrain", "{folder}", "--batch-size", "1"], "'--batch-size'", "1"),
    (["pretrain", "{folder}", "--image-size", "8"], "'--image-size'", "8"),
    (["pretrain", "{folder}", "--temperature", "0"], "'--temperature'", "0"),
    (["embed", "{folder}", "-m", "{folder}", "--batch-size", "0"], "'--batch-size'", "0"),
])
def test_out_of_range_numbers_are_usage_errors(args, option, value, tmp_path):
    result = runner.invoke(app, [a.format(folder=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.stderr and option in result.stderr
    message = usage_text(result.stderr).split("Invalid value", 1)[1]
    assert f" {value} " in message + " ", message


def test_a_missing_folder_is_exit_1_not_a_usage_error(tmp_path):
    result = runner.invoke(app, ["pretrain", str(tmp_path / "nope"), "--steps", "2", *TINY])
    assert result.exit_code == 1 and error_lines(result.stderr) == [f"error: folder not found: {tmp_path / 'nope'}"]


def test_ctrl_c_during_embed_is_one_line_exit_130(run, hostile, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("contrastive_cli.infer.embed.load_model", interrupted)
    result = runner.invoke(app, ["embed", str(hostile["root"]), "-m", str(run[1]), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 130 and error_lines(result.stderr) == ["error: interrupted"]
    assert not (tmp_path / "e.npy").exists()


# ---- real processes stopped by SIGINT and SIGKILL --------------------------------------------------
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "contrastive_cli.cli", *map(str, args)]


def _committed(run_dir: Path) -> list[int]:
    """Checkpoint steps Orbax finished (renamed from its temporary folder)."""
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


KILL_STEPS = 10  # the SIGKILLed run: short enough to resume quickly here, long enough to be killed mid-run


def _stop_runs(root: Path, procs: dict, runs: dict, info: dict) -> None:
    """Send SIGINT to "int" once it has logged a step, SIGKILL to "kill" a random 0-0.15 s after its
    first checkpoint; wait for both. Both save a checkpoint every step, so the kill usually lands
    while Orbax is writing one."""
    delay = info["delay"] = random.Random().uniform(0.0, 0.15)
    kill_at, deadline = None, time.monotonic() + 240
    while time.monotonic() < deadline and ("sigint" not in info or "killed" not in info):
        metrics = runs["int"] / "metrics.jsonl"
        if "sigint" not in info and metrics.is_file() and metrics.read_text().strip():
            procs["int"].send_signal(signal.SIGINT)
            info["sigint"] = True
        if kill_at is None and _committed(runs["kill"]):
            kill_at = time.monotonic() + delay
        if kill_at is not None and "killed" not in info and time.monotonic() >= kill_at:
            info["killed"] = procs["kill"].poll() is None  # False: it finished before the kill
            info["at_kill"] = sorted(p.name for p in (runs["kill"] / "checkpoints").iterdir())
            procs["kill"].kill()
        if any(p.poll() is not None and {"int": "sigint", "kill": "killed"}[n] not in info for n, p in procs.items()):
            break  # exited on its own: the test reports its stderr
        time.sleep(0.02)
    for name, p in procs.items():
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        info[name] = (p.returncode, (root / f"{name}.stderr").read_text(), runs[name])


@pytest.fixture(scope="module", autouse=True)
def _stopped_runs(tmp_path_factory):
    """Two `contrastive pretrain` processes, started before this module's first test so that their
    start-up overlaps the in-process tests; a thread stops them (see _stop_runs)."""
    root = tmp_path_factory.mktemp("signals")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {"int": root / "run_int", "kill": root / "run_kill"}
    procs, info = {}, {}
    for name, steps in [("int", 100_000), ("kill", KILL_STEPS)]:
        # One folder each: the two processes must not race on one decoded-image cache entry.
        folder = info[f"{name}_folder"] = write_good_folder(root / f"images_{name}", seed=len(name))
        with open(root / f"{name}.stderr", "w") as log:
            procs[name] = subprocess.Popen(
                _cli("pretrain", folder, "-o", runs[name], "--steps", steps, "--checkpoint-every", 1,
                     "--log-every", 1, *TINY), stdout=subprocess.DEVNULL, stderr=log, env=env)
    thread = threading.Thread(target=_stop_runs, args=(root, procs, runs, info), daemon=True)
    thread.start()
    yield thread, info
    for p in procs.values():  # tests failed or were deselected: leave no process behind
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def stopped(_stopped_runs):
    thread, info = _stopped_runs
    thread.join(300)
    assert not thread.is_alive(), "the pretrain processes did not stop"
    return info


def test_sigint_saves_and_exits_130_with_one_line(stopped, tmp_path):
    rc, stderr, out = stopped["int"]
    assert stopped.get("sigint"), f"pretrain exited {rc} before it logged a step: {stderr}"
    assert rc == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: stopped by SIGINT after step ") and "--resume" in lines[0]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert step in _committed(out)
    result = runner.invoke(app, ["embed", str(stopped["int_folder"]), "-m", str(out), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["step"] == max(_committed(out))


def test_sigkill_mid_save_keeps_the_previous_checkpoint(stopped, tmp_path):
    rc, stderr, out = stopped["kill"]
    assert stopped["killed"], f"the run finished before the kill (after {stopped['delay']:.2f} s): {stderr}"
    assert rc == -signal.SIGKILL
    kept = _committed(out)
    assert kept and max(kept) < KILL_STEPS, stopped["at_kill"]
    result = runner.invoke(app, ["embed", str(stopped["kill_folder"]), "-m", str(out), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["step"] == max(kept)

    result = runner.invoke(app, ["pretrain", str(stopped["kill_folder"]), "-o", str(out), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == max(kept) and summary["steps"] == KILL_STEPS
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, KILL_STEPS + 1))  # the lines past the restored step were replaced
    assert max(_committed(out)) == KILL_STEPS
