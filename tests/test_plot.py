"""plot: metrics.jsonl -> PNG with Pillow; the `contrastive plot` command's output and errors."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from test_files import mounted_tmpfs
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.plot import image_size, nice_ticks, plot_metrics, read_metrics

runner = CliRunner()
tmpfs = pytest.fixture(mounted_tmpfs)


def write_run(run, steps=60, knn_every=20, extra=""):
    """A run directory with a plausible metrics.jsonl: falling loss, rising kNN accuracy."""
    rng = np.random.default_rng(0)
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 5 * math.exp(-s / 20) + 0.1 * rng.random(), "lr": 1e-3 * min(1, s / 5),
             "pairs_per_s": None if s == 1 else 500.0, "data_wait": 0.01, "pos_cos": 1 - math.exp(-s / 15),
             "neg_cos": 0.3 * math.exp(-s / 30), "top1": min(1, s / 50), "emb_std": 0.05 + 0.0004 * s,
             "eff_rank": 3 + s / 10}
        if s % knn_every == 0:
            r["knn"] = 0.3 + s / 200
        lines.append(json.dumps(r))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return run


def pixels(path):
    img = Image.open(path)
    return img, np.asarray(img.convert("RGB"), np.float32)


def test_plot_draws_every_panel(tmp_path):
    run = write_run(tmp_path / "run", extra='{"step": 61, "loss": 0.')  # a half-written last line
    out = plot_metrics(run)
    assert out == run / "metrics.png"
    img, a = pixels(out)
    assert img.format == "PNG" and img.size == image_size() == (1140, 534)
    assert a.std() > 20  # not blank
    # Each of the 6 panels has ink (axes, ticks, lines) and colour (the plotted lines).
    for row in range(2):
        for col in range(3):
            panel = a[34 + row * 250:34 + (row + 1) * 250, col * 380:(col + 1) * 380]
            assert (panel < 128).any(axis=2).mean() > 0.01
            assert (np.ptp(panel, axis=2) > 60).mean() > 0.002, (row, col)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 61))


def test_plot_of_one_record_and_gaps(tmp_path):
    # One logged step, a NaN loss, a metric missing (no knn): still a picture, no error.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float("nan"), "lr": 0.0, "top1": 0.5}) + "\n")
    out = plot_metrics(run, tmp_path / "one.png")
    img, a = pixels(out)
    assert img.size == image_size() and a.std() > 5


def test_nice_ticks():
    assert np.allclose(nice_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1, 60) == [20, 40, 60]
    assert nice_ticks(0.5, 8.5) == [2, 4, 6, 8]
    assert np.allclose(nice_ticks(-0.03, 0.012), [-0.03, -0.02, -0.01, 0.0, 0.01])


def test_cli_plot_prints_the_path(tmp_path):
    run = write_run(tmp_path / "run")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "metrics.png")
    other = tmp_path / "other.png"
    result = runner.invoke(app, ["plot", str(run), "--output", str(other)])
    assert result.exit_code == 0 and result.stdout.strip() == str(other) and other.stat().st_size > 1000


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "has no metrics.jsonl"),
    (lambda p: p / "missing", "run directory not found"),
    (lambda p: (p / "metrics.jsonl").write_text("") or p, "has no metric records yet"),
])
def test_cli_plot_without_metrics_exits_1_with_one_line(tmp_path, make, message):
    result = runner.invoke(app, ["plot", str(make(tmp_path))])
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not result.stdout and not list(tmp_path.glob("*.png"))


def test_cli_plot_rejects_a_non_png_output(tmp_path):
    run = write_run(tmp_path / "run")
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "x.jpg")])
    assert result.exit_code == 1 and "must end in .png" in result.stderr


def test_plot_has_help():
    result = runner.invoke(app, ["plot", "--help"])
    assert result.exit_code == 0 and "metrics.jsonl" in result.stdout


# --- never overwrite a file plot did not write; a full disk is one line ------------------------

def test_plot_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    run = write_run(tmp_path / "run")
    photo = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    notes = tmp_path / "notes.png"
    notes.write_text("not even a picture")
    for victim in (photo, notes):
        before = victim.read_bytes()
        result = runner.invoke(app, ["plot", str(run), "-o", str(victim)])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"error: {victim} already exists and is not a plot written by `contrastive plot`; pass --force to replace it"]
        assert victim.read_bytes() == before
    result = runner.invoke(app, ["plot", str(run), "-o", str(photo), "--force"])
    assert result.exit_code == 0 and Image.open(photo).size == image_size()
    for _ in range(2):  # its own plots, at the default path or not, are replaced without --force
        assert runner.invoke(app, ["plot", str(run), "-o", str(photo)]).exit_code == 0
        assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.png", "notes.png", "run"]


def test_plot_takes_the_umask(tmp_path):
    run = write_run(tmp_path / "run")
    old = os.umask(0o022)
    try:
        out = plot_metrics(run)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_plot_onto_a_full_disk_is_one_line_and_keeps_the_old_plot(tmp_path, tmpfs):
    run = write_run(tmpfs.path / "run")
    plot_metrics(run)
    before = (run / "metrics.png").read_bytes()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 99, "loss": 0.5}\n')
    tmpfs.fill()
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: cannot write {run / 'metrics.png'}: No space left on device"]
    assert (run / "metrics.png").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "metrics.png"]
