"""pretrain's monitoring: the kNN probe on --eval-folder, the learned sigmoid scalars, the collapse
warning, the plot at the end."""
import json

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from contrastive_cli.cli import app
from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.console import TrainDisplay
from contrastive_cli.data.decode import ImageSet
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.infer.evaluate import knn_accuracy, labeled_features, stratified_split
from contrastive_cli.plot import image_size
from contrastive_cli.train.loop import Monitor, pretrain
from contrastive_cli.train.optim import make_optimizer
from test_cli import write_images

pytestmark = pytest.mark.slow  # real training runs or subprocesses

runner = CliRunner()


class Recorder(Monitor):
    def __init__(self):
        self.records, self.warnings = [], []

    def step(self, step, total, record):
        if record is not None:
            self.records.append(record)

    def warn(self, message):
        self.warnings.append(message)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_images(root / "images", n=16, size=24)
    labeled = root / "labeled"  # 3 classes x 6 noisy images: a kNN score that is not trivially 1
    rng = np.random.default_rng(1)
    for c, colour in enumerate(((190, 60, 60), (60, 190, 60), (60, 60, 190))):
        (labeled / f"class{c}").mkdir(parents=True)
        for i in range(6):
            a = np.clip(np.array(colour) + rng.normal(0, 60, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(labeled / f"class{c}" / f"{i}.png")
    return root / "images", labeled


@pytest.fixture(scope="module")
def sigmoid_run(folders, tmp_path_factory):
    """4 steps of the sigmoid loss with a kNN probe every 2 steps, logging every 3."""
    images, labeled = folders
    run = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig.tiny(model=ModelConfig(image_size=16), steps=4, log_every=3, loss="sigmoid",
                           eval_folder=str(labeled), eval_every=2)
    monitor = Recorder()
    pretrain(images, cfg, run, monitor=monitor, cache=False)
    return run, monitor


def test_knn_probe_runs_every_n_steps_and_matches_evaluate(sigmoid_run, folders):
    run, monitor = sigmoid_run
    records = metrics(run)
    # Log steps 1, 3, 4 plus the probe's steps 2 and 4; kNN only on the probe's.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "knn" in r] == [2, 4]
    assert all(0 <= r["knn"] <= 1 for r in records if "knn" in r)
    assert monitor.records == records  # the monitor sees what is written
    # The last probe scored the saved encoder exactly as `contrastive evaluate` would (same split).
    encoder = load_encoder(run)
    feats, _ = labeled_features(encoder, folders[1])
    tr, te = stratified_split(feats.labels, 0.2, seed=0)
    want = knn_accuracy(feats.emb[tr], feats.labels[tr], feats.emb[te], feats.labels[te])
    assert records[-1]["knn"] == pytest.approx(want)


def test_sigmoid_scale_and_bias_are_trained_and_saved(sigmoid_run):
    run, _ = sigmoid_run
    records = metrics(run)
    assert records[0]["sigmoid_t"] == pytest.approx(10.0) and records[0]["sigmoid_b"] == pytest.approx(-10.0)
    assert records[-1]["sigmoid_t"] != records[0]["sigmoid_t"] and records[-1]["sigmoid_b"] != records[0]["sigmoid_b"]
    params = load_encoder(run).params  # the checkpoint holds them: embed and evaluate restore the run
    scale = float(np.asarray(params["logit_scalars"]["logit_scale"][...]))
    assert scale != pytest.approx(np.log(10.0)) and np.isfinite(scale)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_learned_loss_scalars_get_no_weight_decay(optimizer):
    # With zero gradients only weight decay moves a parameter: the 0-d scalars must stay put.
    tx = make_optimizer(TrainConfig.tiny(optimizer=optimizer, lr=0.1, weight_decay=0.5, loss="sigmoid"))
    params = {"kernel": np.ones((3, 3), np.float32), "logit_scale": np.float32(2.3), "logit_bias": np.float32(-10)}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) < 0)
    assert float(updates["logit_scale"]) == 0 and float(updates["logit_bias"]) == 0


def test_plot_written_at_the_end_and_no_false_collapse(sigmoid_run):
    run, monitor = sigmoid_run
    assert Image.open(run / "metrics.png").size == image_size()
    assert not monitor.warnings


def test_blank_images_warn_of_collapse_once(tmp_path):
    # Identical blank images make identical views: every embedding is the same, from step 1.
    blank = ImageSet(tmp_path, [f"{i}.png" for i in range(8)], np.zeros((8, 24, 24, 3), np.uint8))
    monitor = Recorder()
    pretrain(tmp_path, TrainConfig.tiny(model=ModelConfig(image_size=16), steps=5), tmp_path / "run",
             images=blank, monitor=monitor)
    collapse = [w for w in monitor.warnings if "collapsed" in w]
    assert len(collapse) == 1, monitor.warnings
    assert "for 3 log steps up to step 3" in collapse[0] and "emb_std" in collapse[0] and "--lr" in collapse[0]
    assert "--temperature" in collapse[0] and "augmentations" in collapse[0]


def test_display_keeps_the_last_knn():
    display = TrainDisplay()
    display.start(dict(images=8, skipped=0, load_s=0.0, steps=4, batch_size=8, devices=1, backend="cpu",
                       start=0, output="run"))
    try:
        base = {"loss": 1.0, "data_wait": 0.0, "pairs_per_s": 10.0}
        display.step(1, 4, base)
        assert "kNN" not in display._progress.tasks[0].fields["stats"]
        display.step(2, 4, {**base, "knn": 0.75})
        display.step(3, 4, base)
        assert "kNN 0.750" in display._progress.tasks[0].fields["stats"]
    finally:
        display.close()


def test_unlabeled_eval_folder_fails_before_the_run_dir(folders, tmp_path):
    images, _ = folders
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (20, 20)).save(loose / "a.png")
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "-o", str(run), "--steps", "2", "-b", "8", "--quiet",
                                 "--no-cache", "--eval-folder", str(loose)])
    assert result.exit_code == 1
    assert "not a labeled folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not run.exists()


def test_eval_every_needs_eval_folder(folders, tmp_path):
    result = runner.invoke(app, ["pretrain", str(folders[0]), "-o", str(tmp_path / "run"), "--eval-every", "5",
                                 "--quiet"])
    assert result.exit_code == 1 and "--eval-every 5 needs --eval-folder" in result.stderr
