"""Multi-process training: two CPU processes joined by jax.distributed train like one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive_cli.config import ModelConfig, TrainConfig
from contrastive_cli.infer.encoder import load_encoder
from contrastive_cli.errors import ConfigError
from contrastive_cli.mesh import batch_sharding, data_mesh, init_distributed, local_rows
from contrastive_cli.train.loop import pretrain
from test_cli import write_images

pytestmark = pytest.mark.slow  # real training runs or subprocesses

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def gloo_available() -> bool:
    from jax._src.lib import _jax

    return hasattr(_jax, "make_gloo_tcp_collectives")


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="localhost:1234"), "give all three or none"),
    (dict(num_processes=2, process_id=0), "give all three or none"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), "process id 2 is not in [0, 2)"),
])
def test_bad_cluster_options(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        init_distributed(**kwargs)


def test_single_process_needs_no_cluster():
    assert init_distributed() is False
    assert init_distributed("localhost:1234", 1, 0) is False
    assert local_rows(batch_sharding(data_mesh()), 8).tolist() == list(range(8))  # one process feeds every row


@pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives for multi-process runs")
def test_two_processes_train_like_one(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}  # 2 processes x 2 devices
    cmd = [sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o", str(run), "--steps", str(STEPS),
           "-b", "8", "--image-size", "16", "--log-every", "1", "--quiet", "--no-cache",
           "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out == f"{run}\n"  # stdout: the run directory only (Gloo's chatter goes to stderr)

    # The same run in this process, on its 4 devices: one process, the same global batch.
    single = tmp_path / "single"
    pretrain(folder, TrainConfig.tiny(model=ModelConfig(image_size=16), steps=STEPS), single, cache=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once, by process 0
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in expected], rtol=0, atol=1e-5)
    assert [r["lr"] for r in records] == [r["lr"] for r in expected]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["steps"] == STEPS

    # The checkpoint both processes wrote together restores here and matches the single-process one.
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise moves a weight by up to
    # the step size (lr ~3.5e-4), so parameters agree to 1e-4 while the losses agree to 1e-5.
    got, want = load_encoder(run), load_encoder(single)
    assert got.step == STEPS
    for a, b in zip(jax.tree.leaves((got.params, got.stats)), jax.tree.leaves((want.params, want.stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
