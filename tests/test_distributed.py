"""Multi-process training: two CPU processes joined by jax.distributed train like one process."""
import json
import os
import shutil
import signal
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


def two_processes(folder, run, extra=((), ()), prefix=((), ()), timeout=180):
    """Start process 1 then 0 of a 2-process run (extra arguments and a command prefix per process
    id); (returncode, stderr) of each, process 0 first."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    port = free_port()
    procs = {}
    for i in (1, 0):
        cmd = [*prefix[i], sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o", str(run),
               "--steps", "2", "-b", "4", "--image-size", "16", "--quiet", "--no-cache",
               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), *extra[i]]
        procs[i] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outs = {i: p.communicate(timeout=timeout) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return [(procs[i].returncode, outs[i][1]) for i in (0, 1)]


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives for multi-process runs")
def test_processes_started_with_different_settings_stop_and_say_which(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    results = two_processes(folder, tmp_path / "run",
                            extra=(["--lr", "0.1"], ["--lr", "0.2", "--temperature", "0.3", "-o", str(tmp_path / "b")]))
    for code, err in results:
        assert code == 1
        line = last_line(err)
        assert line.startswith("error: the processes were started with different settings: "), line
        assert "lr (process 1)" in line and "temperature (process 1)" in line and "--output (process 1)" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.mark.skipif(not gloo_available() or os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs gloo, and root with unshare to give one process storage the other cannot see")
def test_processes_that_do_not_share_the_run_directory_stop(tmp_path):
    """The same --output on every process, but process 1's is on a tmpfs of its own (as on another
    host without shared storage): both stop with one line instead of hanging in the checkpoint save."""
    folder = tmp_path / "images"
    write_images(folder)
    own = tmp_path / "storage"
    own.mkdir()
    private = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{own}" && exec "$0" "$@"']
    results = two_processes(folder, own / "run", prefix=((), private), timeout=180)
    for code, err in results:
        assert code == 1, err[-3000:]
        line = last_line(err)
        assert line == (f"error: process 1 cannot see the run directory {own / 'run'} that process 0 writes: every "
                        "process needs the same --output, on storage all of them reach"), line


@pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives for multi-process runs")
@pytest.mark.parametrize("stop", [None, signal.SIGINT, signal.SIGTERM])
def test_a_process_whose_peer_never_comes_says_so_and_ends(tmp_path, stop):
    """Alone, it says what it waits for, then gives up after --join-timeout with one line, exit 1
    (XLA's own timeout aborts with a C++ stack trace after 5 minutes); Ctrl-C and SIGTERM end the wait."""
    folder = tmp_path / "images"
    write_images(folder)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    address = f"localhost:{free_port()}"
    cmd = [sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o", str(tmp_path / "run"),
           "--steps", "1", "--coordinator", address, "--num-processes", "2", "--process-id", "1",
           "--join-timeout", "30" if stop else "5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    if stop:
        first = proc.stderr.readline()  # it says what it waits for after 3 s: signal it once it waits
        proc.send_signal(stop)
    out, err = proc.communicate(timeout=60)
    err = first + err
    assert "Traceback" not in err and "@ 0x" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[0] == f"waiting for the other processes at {address} (process 1 of 2; giving up after " \
                       f"{'30' if stop else '5'} s)"
    if stop is None:
        assert proc.returncode == 1
        assert lines[-1] == (f"error: gave up after 5 s waiting for the other processes at {address} (process 1 "
                             "of 2): is every process started, with the same --coordinator and --num-processes?")
    else:
        assert proc.returncode == 128 + stop
        assert lines[-1] == ("error: interrupted" if stop == signal.SIGINT else "error: interrupted by SIGTERM")
    assert len(lines) == 2 and out == ""


def test_a_coordinator_port_in_use_is_one_line(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "contrastive_cli.cli", "pretrain", str(folder), "-o",
                               str(tmp_path / "run"), "--steps", "1", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", "0"], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: port {port} of the coordinator localhost:{port} is already in use; "
                                   "choose another --coordinator port")
