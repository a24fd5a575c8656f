"""evaluate: kNN and linear probe on separable and on pure-noise data; the CLI on a labeled folder."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.infer.evaluate import knn_accuracy, linear_probe_accuracy, stratified_split

runner = CliRunner()


def clusters(n_per_class, n_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_separable_clusters_give_full_accuracy():
    x, y = clusters(40, 4, 16, 0.05, seed=0)
    tr, te = stratified_split(y, 0.25, seed=0)
    assert knn_accuracy(x[tr], y[tr], x[te], y[te], k=5) == 1.0
    assert linear_probe_accuracy(x[tr], y[tr], x[te], y[te], epochs=50, batch_size=32) == 1.0


def test_noise_gives_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2000, 32)), rng.integers(0, 4, 2000)
    tr, te = stratified_split(y, 0.5, seed=0)
    assert abs(knn_accuracy(x[tr], y[tr], x[te], y[te]) - 0.25) < 0.06
    assert abs(linear_probe_accuracy(x[tr], y[tr], x[te], y[te], epochs=20) - 0.25) < 0.06


def test_knn_votes_are_similarity_weighted():
    # One very close neighbour of class 1 outweighs two far ones of class 0.
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([1, 0, 0])
    assert knn_accuracy(train, labels, np.array([[1.0, 0.05]]), np.array([1]), k=3) == 1.0


def test_stratified_split_is_seeded_and_per_class():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = stratified_split(y, 0.2, seed=3)
    assert sorted(np.bincount(y[te]).tolist()) == [2, 4, 6]
    assert not set(tr) & set(te) and len(tr) + len(te) == 60
    tr2, te2 = stratified_split(y, 0.2, seed=3)
    assert (te == te2).all()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """Two classes that differ in colour: any reasonable representation separates them."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / name).mkdir()
        for i in range(16):
            a = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    run = root.parent / "run"
    out = runner.invoke(app, ["pretrain", str(root), "-o", str(run), "--steps", "2", "-b", "8",
                              "--image-size", "16", "--quiet"])
    assert out.exit_code == 0, out.output
    return root, run


@pytest.mark.slow
def test_evaluate_cli_on_separable_folder(labeled):
    root, run = labeled
    out = runner.invoke(app, ["evaluate", str(root), "--model", str(run), "--json", "-k", "5"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["classes"] == 2 and result["n_test"] == 6 and result["n_train"] == 26
    assert result["knn"] == 1.0 and result["raw_knn"] == 1.0
    table = runner.invoke(app, ["evaluate", "--train", str(root), "--test", str(root), "--model", str(run)])
    assert table.exit_code == 0 and "embeddings" in table.stdout and "raw pixels" in table.stdout


@pytest.mark.slow
def test_evaluate_rejects_unlabeled_folder(labeled, tmp_path):
    _, run = labeled
    Image.new("RGB", (20, 20)).save(tmp_path / "loose.png")
    out = runner.invoke(app, ["evaluate", str(tmp_path), "--model", str(run)])
    assert out.exit_code == 1 and "not inside a class subfolder" in out.stderr
