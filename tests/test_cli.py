"""The tool end to end through its CLI: pretrain a few steps on a generated folder -> embed -> similarity."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli import processor
from contrastive_cli.cli import app

runner = CliRunner()


def write_images(folder, n=24, size=40, seed=0):
    """Real PNG/JPEG files: coloured shapes on noise, in two subfolders."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        c = rng.integers(100, 256, 3)
        y0, x0 = rng.integers(0, size // 2, 2)
        a[y0:y0 + size // 2, x0:x0 + size // 2] = c
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        p = sub / f"img{i:03d}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    images = root / "images"
    write_images(images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = root / "run"
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--steps", "3", "-b", "8",
                                 "--image-size", "16", "--log-every", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return root, images, run, result


@pytest.mark.slow
def test_pretrain_writes_a_self_describing_run(trained):
    root, images, run, result = trained
    assert result.stdout.strip().endswith(str(run))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["encoder"] == "small" and cfg["model"]["image_size"] == 16 and cfg["batch_size"] == 8
    assert cfg["precision"] == "float32" and cfg["model"]["conv"] != "auto"  # "auto" recorded as what ran
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite(r["loss"]) and r["lr"] >= 0 and {"pairs_per_s", "pos_cos", "neg_cos"} <= r.keys()
    assert records[-1]["pairs_per_s"] > 0
    assert (run / "checkpoints" / "3").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 24 and summary["skipped"] == 1
    # what the run's speed depended on: this processor's instruction sets, the precision, XLA's flags
    assert summary["backend"] == "cpu" and summary["precision"] == "float32" and summary["isa"] == processor.isa()
    assert summary["simd"] == processor.processor()["simd"] and "xla_flags" in summary
    assert "broken.jpg" in (run / "skipped.txt").read_text()
    assert "broken.jpg" in result.stderr and "skipped 1" in result.stderr


@pytest.mark.slow
def test_embed_then_similarity(trained, tmp_path):
    root, images, run, _ = trained
    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", str(images), "--model", str(run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    index = json.loads(out.with_suffix(".json").read_text())
    assert emb.shape == (24, 1024) and emb.dtype == np.float32  # 256 features on the default grid at 16 px (2 x 2), too few images to whiten
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert index["dim"] == 1024 and index["normalized"] is True and len(index["paths"]) == 24
    assert index["paths"] == sorted(index["paths"]) and index["paths"][0] == "a/img001.png"
    assert [s["path"] for s in index["skipped"]] == ["broken.jpg"]
    # Row order matches the index: embedding one file alone gives its row.
    first = images / index["paths"][5]
    other = images / index["paths"][6]
    sim = runner.invoke(app, ["similarity", str(first), str(first), "--model", str(run)])
    assert sim.exit_code == 0, sim.output
    assert float(sim.stdout) == pytest.approx(1.0, abs=1e-5)
    sim = runner.invoke(app, ["similarity", str(first), str(other), "--model", str(run), "--json"])
    value = json.loads(sim.stdout)["similarity"]
    assert value == pytest.approx(float(emb[5] @ emb[6]), abs=1e-4)
    # The same command again finds the pair up to date and writes nothing; other settings need --force.
    before = out.read_bytes()
    again = runner.invoke(app, ["embed", str(images), "--model", str(run), "--output", str(out)])
    assert again.exit_code == 0 and "up to date" in again.stderr and out.read_bytes() == before
    again = runner.invoke(app, ["embed", str(images), "--model", str(run), "--output", str(out), "--dtype", "float16"])
    assert again.exit_code == 1 and "--force" in again.stderr and out.read_bytes() == before
    forced = runner.invoke(app, ["embed", str(images), "--model", str(run), "--output", str(out), "--force",
                                 "--dtype", "float16"])
    assert forced.exit_code == 0 and np.load(out).dtype == np.float16


@pytest.mark.slow
def test_similarity_pairs_scores_many_pairs_in_one_process(trained, tmp_path):
    """--pairs FILE or - (stdin): one score per pair, in order, the same as `similarity a b`; a tab
    or quotes for paths with spaces; an unreadable image is nan for its pairs, named once, exit 1."""
    _, images, run, _ = trained
    a, b, c = images / "a" / "img001.png", images / "b" / "img002.png", images / "b" / "img004.png"
    spaced = tmp_path / "with space.png"
    spaced.write_bytes(a.read_bytes())
    one = runner.invoke(app, ["similarity", str(a), str(b), "-m", str(run)])
    assert one.exit_code == 0, one.output
    lines = [f"# a comment, then a blank line", "", f"{a} {b}", f"{spaced}\t{a}", f"'{b}' \"{c}\""]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    got = runner.invoke(app, ["similarity", "--pairs", str(tmp_path / "pairs.txt"), "-m", str(run)])
    assert got.exit_code == 0, got.output
    scores = [float(v) for v in got.stdout.split()]
    assert len(scores) == 3 and scores[0] == pytest.approx(float(one.stdout), abs=1e-5)
    assert scores[1] == pytest.approx(1.0, abs=1e-5)  # the same bytes under another name
    piped = runner.invoke(app, ["similarity", "--pairs", "-", "-m", str(run), "--json"], input=f"{a} {b}\n")
    assert piped.exit_code == 0 and json.loads(piped.stdout)["similarity"] == pytest.approx(scores[0], abs=1e-6)
    # an unreadable image: nan for each of its pairs, one line on stderr, the other pairs scored, exit 1
    (tmp_path / "bad.txt").write_text(f"{a} {tmp_path / 'gone.png'}\n{a} {b}\n{tmp_path / 'gone.png'} {c}\n")
    bad = runner.invoke(app, ["similarity", "--pairs", str(tmp_path / "bad.txt"), "-m", str(run)])
    assert bad.exit_code == 1 and bad.stdout.split()[::2] == ["nan", "nan"]
    assert float(bad.stdout.split()[1]) == pytest.approx(scores[0], abs=1e-5)
    assert bad.stderr.count("gone.png") == 1 and "Traceback" not in bad.output
    # a line that is not two paths: one line naming it, nothing scored
    (tmp_path / "three.txt").write_text(f"{a} {b}\n{a} {b} {c}\n")
    three = runner.invoke(app, ["similarity", "--pairs", str(tmp_path / "three.txt"), "-m", str(run)])
    assert three.exit_code == 1 and "line 2" in three.stderr and three.stdout == ""
    both = runner.invoke(app, ["similarity", str(a), str(b), "--pairs", "-", "-m", str(run)])
    assert both.exit_code == 2 and "not both" in both.stderr
    neither = runner.invoke(app, ["similarity", "-m", str(run)])
    assert neither.exit_code == 2 and "--pairs" in neither.stderr


@pytest.mark.slow
def test_existing_run_is_not_overwritten(trained):
    root, images, run, _ = trained
    before = (run / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--steps", "2", "-b", "8", "--quiet"])
    assert result.exit_code == 1 and "--resume" in result.stderr
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "folder not found"),
    (lambda p: p, "no image files"),
])
def test_bad_folders_exit_1_with_one_line(tmp_path, make, message):
    result = runner.invoke(app, ["pretrain", str(make(tmp_path)), "--quiet"])
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_folder_of_non_images_exits_1(tmp_path):
    (tmp_path / "a.jpg").write_text("hello")
    (tmp_path / "b.png").write_bytes(b"")
    result = runner.invoke(app, ["pretrain", str(tmp_path), "--quiet"])
    assert result.exit_code == 1
    assert "none of the 2 image files" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_similarity_of_missing_image(trained, tmp_path):
    _, images, run, _ = trained
    result = runner.invoke(app, ["similarity", str(tmp_path / "nope.jpg"), str(tmp_path / "x.jpg"), "-m", str(run)])
    assert result.exit_code == 1 and "image not found" in result.stderr


@pytest.mark.slow
def test_help_does_not_import_jax():
    code = "import sys; from contrastive_cli.cli import app; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "contrastive_cli.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
    assert time.perf_counter() - t < 5


@pytest.mark.slow
def test_augmentation_knobs_reach_the_saved_config(trained, tmp_path):
    _, images, _, _ = trained
    run = tmp_path / "aug"
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--steps", "1", "-b", "8",
                                 "--image-size", "16", "--quiet", "--crop-min-scale", "0.2", "--blur-p", "0",
                                 "--jitter-strength", "0.5", "--gray-p", "0.1"])
    assert result.exit_code == 0, result.output
    aug = json.loads((run / "config.json").read_text())["augment"]
    assert aug["crop_scale"] == [0.2, 1.0] and aug["blur_p"] == 0 and aug["gray_p"] == 0.1
    assert aug["brightness"] == pytest.approx(0.4) and aug["hue"] == pytest.approx(0.1)
    bad = runner.invoke(app, ["pretrain", str(images), "--blur-p", "1.5"])
    assert bad.exit_code == 2 and "1.5" in bad.stderr


def test_help_shows_no_type_beside_flags_and_offers_completion_and_version():
    from contrastive_cli import __version__

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert out.exit_code == 0 and "<bool>" not in out.stdout
    assert "--install-completion" in out.stdout and "--version" in out.stdout
    assert "<bool>" not in CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "120"}).stdout
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"contrastive {__version__}"


@pytest.mark.parametrize("args", [
    ["pretrain", "{folder}", "--lr", "nan"],
    ["pretrain", "{folder}", "--lr", "inf"],
    ["pretrain", "{folder}", "--temperature", "nan"],
    ["pretrain", "{folder}", "--time-budget", "inf"],
    ["pretrain", "{folder}", "--flip-p", "nan"],
    ["duplicates", "{folder}/e.npy", "--threshold", "nan"],
])
def test_float_options_refuse_nan_and_infinity(tmp_path, args):
    result = runner.invoke(app, [a.format(folder=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    boxless = " ".join(result.stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    assert "must be a finite number" in boxless


def test_an_os_error_in_a_command_is_one_line_not_an_internal_error(tmp_path, monkeypatch):
    def plot_metrics(run, output=None, *, force=False):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr("contrastive_cli.plot.plot_metrics", plot_metrics)
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: error with {tmp_path / 'run' / 'metrics.jsonl'}: Permission denied"]
