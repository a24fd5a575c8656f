"""JAX_PLATFORMS naming a backend the machine cannot start is one line that names the backends it has."""
import os
import subprocess
import sys

import pytest
from hostile import write_good_folder

pytestmark = pytest.mark.slow  # real processes


@pytest.mark.parametrize("platforms", ["cuda", "tpu,cpu"])
@pytest.mark.parametrize("command", ["pretrain", "similarity"])
def test_a_missing_backend_is_one_line(tmp_path, platforms, command):
    import jax

    if platforms.split(",")[0] in {d.platform for d in jax.devices()}:
        pytest.skip(f"this machine has {platforms}")
    folder = write_good_folder(tmp_path / "images", n=2)
    args = (["pretrain", str(folder), "-o", str(tmp_path / "run"), "--steps", "1"] if command == "pretrain" else
            ["similarity", str(folder / "img000.png"), str(folder / "img001.png"), "-m", str(tmp_path / "run")])
    done = subprocess.run([sys.executable, "-m", "contrastive_cli.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": platforms})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"error: JAX_PLATFORMS={platforms} names a backend this machine cannot start (")
    assert done.stderr.rstrip().endswith("; backends here: cpu (unset JAX_PLATFORMS to use the best of them)")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()
