"""infer/whiten.py and where it is used: the PCA whitening fitted on a run's training images at
every save, applied by embed (and every export), skipped by evaluate's linear probe."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli.infer import whiten

runner = CliRunner()


def reference(x, dim, floor=whiten.FLOOR):
    """The textbook fit: SVD of the centred rows, each axis over the square root of its variance."""
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(dim, x.shape[1], len(x) - 1)
    var = sv[:k] ** 2 / (len(x) - 1)
    return mean, vt[:k].T / np.sqrt(np.maximum(var, floor * var[0]))


@pytest.mark.parametrize(("n", "d", "dim"), [(300, 40, 16), (60, 200, 512), (200, 200, 50)])
def test_fit_is_the_svd_whitening_by_gram_or_covariance(n, d, dim):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * np.geomspace(5, 0.5, d) + rng.normal(size=d)  # unequal spreads, off-centre
    mean, matrix = whiten.fit(x, dim)
    k = min(dim, d, n - 1)
    assert mean.shape == (d,) and matrix.shape == (d, k) and matrix.dtype == np.float32
    want_mean, want = reference(x, dim)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    # Each axis' sign is arbitrary: compare the whitened rows' dot products, not the matrices.
    got_z, want_z = (x - mean) @ matrix, (x - want_mean) @ want
    np.testing.assert_allclose(got_z @ got_z.T, want_z @ want_z.T, rtol=1e-3, atol=1e-3)
    # Whitened: the training rows' covariance is the identity on the axes above the floor.
    cov = np.cov(got_z.T)
    np.testing.assert_allclose(cov, np.eye(k), atol=1e-3)


def test_the_floor_keeps_a_near_empty_axis_from_being_blown_up():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * np.array([1.0, 0.5, 1e-4])
    mean, matrix = whiten.fit(x)
    spread = ((x - mean) @ matrix).std(axis=0)
    np.testing.assert_allclose(spread[:2], 1.0, rtol=1e-2)
    # The 1e-4 axis is scaled as if its variance were 1% of the largest: 1e-4 / 0.1, not 1.
    assert spread[2] == pytest.approx(1e-4 / 0.1, rel=0.1)


def test_apply_gives_unit_rows_and_a_cosine_that_ignores_the_dominant_axis():
    """Two rows that differ only along a weak axis are far apart whitened, although their cosine
    before is about 1: what whitening is for."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 2)) * np.array([10.0, 1.0])
    mean, matrix = whiten.fit(x)
    a, b = np.array([[10.0, 1.0]]), np.array([[10.0, -1.0]])
    before = float((a @ b.T / np.linalg.norm(a) / np.linalg.norm(b))[0, 0])
    za, zb = whiten.apply(a, mean, matrix), whiten.apply(b, mean, matrix)
    np.testing.assert_allclose(np.linalg.norm(za), 1.0, rtol=1e-6)
    assert before > 0.97 and float((za @ zb.T)[0, 0]) < 0.3


def test_axes_the_rows_do_not_span_are_dropped_not_blown_up():
    """Repeated rows (the same image twice in a folder) span fewer axes than there are rows; the
    missing axes' directions are rounding noise and must not be kept at the floor's weight."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(40, 300))
    x = np.concatenate([base, base, base[:10]])  # 90 rows, 40 distinct: 39 axes
    mean, matrix = whiten.fit(x)
    assert matrix.shape == (300, 39) and np.isfinite(matrix).all()
    np.testing.assert_allclose(np.cov(((x - mean) @ matrix).T), np.eye(39), atol=1e-3)
    other = rng.normal(size=(5, 300))  # rows outside the span: no axis amplifies them
    assert np.abs((other - mean) @ matrix).max() < 10 * np.abs((x - mean) @ matrix).max()


def test_fit_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        whiten.fit(np.ones((1, 4)))


def write_folder(folder, n, size=20, seed=0):
    """`n` images in two classes: a bright or a dark top half, and noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = ("light", "dark")[i % 2]
        img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        if c == "light":
            img[: size // 2] += 120
        (folder / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / c / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def whitened_run(tmp_path_factory):
    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.train.loop import pretrain

    root = tmp_path_factory.mktemp("whiten")
    images = write_folder(root / "images", 160)
    cfg = TrainConfig.tiny(model=ModelConfig(image_size=16), steps=2)  # the default grid: 2 x 2 at 16 px
    pretrain(images, cfg, root / "run", cache=False)
    return root


@pytest.mark.slow
def test_a_run_saves_a_whitening_that_embed_applies(whitened_run):
    from contrastive_cli.data.decode import decode_or_reason
    from contrastive_cli.infer.encoder import load_encoder

    run = whitened_run / "run"
    assert json.loads((run / "config.json").read_text())["model"]["embed_grid"] == 2  # default, recorded
    encoder = load_encoder(run)
    mean, matrix = encoder.whitening
    # 160 training images span 159 axes of the 2 x 2 x 256 features
    assert mean.shape == (1024,) and matrix.shape == (1024, 159) and encoder.dim == 159
    files = sorted((whitened_run / "images").rglob("*.png"))[:24]
    x = np.stack([decode_or_reason(f, 16) for f in files])
    u = encoder.embed(x, whiten=False)
    z = encoder.embed(x)
    assert u.shape == (24, 1024) and z.shape == (24, 159)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(z, whiten.apply(u, mean, matrix), atol=2e-5)  # jitted == NumPy
    np.testing.assert_allclose(encoder.whiten(u), z, atol=2e-5)

    one = load_encoder(run, embed_grid=1)  # fitted on grid 2: not applicable, said so
    assert one.whitening is None and one.dim == 256
    assert any("whitening" in n and "not applied" in n for n in one.notes)


@pytest.mark.slow
def test_embed_cli_and_every_export_write_the_whitened_rows(whitened_run, tmp_path):
    from contrastive_cli.cli import app
    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.infer.export import export, read_safetensors
    from contrastive_cli.infer.portable import load_model

    run, images = whitened_run / "run", whitened_run / "images"
    out = runner.invoke(app, ["embed", str(images), "--model", str(run), "-o", str(tmp_path / "e.npy")])
    assert out.exit_code == 0, out.output
    written = np.load(tmp_path / "e.npy")
    assert written.shape == (160, 159)
    encoder = load_encoder(run)
    from contrastive_cli.data.decode import decode_or_reason

    paths = json.loads((tmp_path / "e.json").read_text())["paths"][:8]
    x = np.stack([decode_or_reason(images / p, 16) for p in paths])
    want = encoder.embed(x)
    np.testing.assert_allclose(written[:8], want, atol=1e-4)
    # similarity reads the run through the user cache's StableHLO copy: the same whitened rows
    out = runner.invoke(app, ["similarity", str(images / paths[0]), str(images / paths[1]), "--model", str(run)])
    assert out.exit_code == 0, out.output
    assert float(out.stdout) == pytest.approx(float(want[0] @ want[1]), abs=1e-3)
    for fmt in ("safetensors", "stablehlo", "onnx"):
        path = export(run, fmt, tmp_path / f"encoder.{fmt}")
        loaded = read_safetensors(path) if fmt == "safetensors" else load_model(path)
        assert loaded.dim == 159, fmt
        np.testing.assert_allclose(loaded.embed(x), want, atol=1e-4, err_msg=fmt)


@pytest.mark.slow
def test_evaluate_probes_the_unwhitened_features_and_knn_the_whitened(whitened_run):
    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.infer.evaluate import evaluate, labeled_features

    encoder = load_encoder(whitened_run / "run")
    feats, classes = labeled_features(encoder, whitened_run / "images")
    assert classes == ["dark", "light"]
    assert feats.emb.shape == (160, 159) and feats.feat.shape == (160, 1024)
    np.testing.assert_allclose(feats.emb, encoder.whiten(feats.feat), atol=1e-6)
    result = evaluate(whitened_run / "images", None, encoder=encoder, raw=False)
    assert result["dim"] == 159 and result["knn"] > 0.6 and result["linear"] > 0.6


@pytest.mark.slow
def test_a_run_on_fewer_than_128_images_is_not_whitened(tmp_path):  # 127 images span 126 axes
    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.train.loop import pretrain

    images = write_folder(tmp_path / "images", whiten.MIN_AXES, seed=3)
    pretrain(images, TrainConfig.tiny(model=ModelConfig(image_size=16), steps=2), tmp_path / "run", cache=False)
    encoder = load_encoder(tmp_path / "run")
    assert encoder.whitening is None and encoder.dim == 1024 and encoder.centre.shape == (1024,)


@pytest.mark.slow
def test_a_run_on_repeated_images_is_not_whitened(tmp_path):
    """160 files but 40 distinct images: they span 39 axes, too few to whiten onto."""
    import shutil

    from contrastive_cli.config import ModelConfig, TrainConfig
    from contrastive_cli.infer.encoder import load_encoder
    from contrastive_cli.train.loop import pretrain

    images = write_folder(tmp_path / "images", 40, seed=4)
    for i, f in enumerate(sorted(images.rglob("*.png"))):
        for copy in range(3):
            shutil.copy(f, f.with_name(f"{f.stem}-copy{copy}.png"))
    pretrain(images, TrainConfig.tiny(model=ModelConfig(image_size=16), steps=2), tmp_path / "run", cache=False)
    encoder = load_encoder(tmp_path / "run")
    assert encoder.whitening is None and encoder.dim == 1024
