"""perf/xla.py: the Eigen-convolution XLA flag, added before JAX starts and only then."""
import pytest
import subprocess
import sys

pytestmark = pytest.mark.slow  # real training runs or subprocesses


def xla_flags(env: dict) -> str:
    code = ("import os; from contrastive_cli.perf import xla; xla.prefer_eigen_convolutions(); import jax; "
            "jax.devices(); print(os.environ.get('XLA_FLAGS', ''))")
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_eigen_convolutions_are_preferred_unless_told_otherwise():
    from contrastive_cli.perf.xla import EIGEN_CONVOLUTIONS

    assert xla_flags({}) == EIGEN_CONVOLUTIONS
    assert xla_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) == (
        f"--xla_force_host_platform_device_count=2 {EIGEN_CONVOLUTIONS}")
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
    assert xla_flags({"XLA_FLAGS": mine}) == mine  # the user's choice stands
    assert xla_flags({"CONTRASTIVE_XLA_FLAGS": "0"}) == ""


def test_no_flag_is_added_once_jax_has_started():
    code = ("import jax; jax.devices(); import os; from contrastive_cli.perf import xla\n"
            "print(xla.prefer_eigen_convolutions(), repr(os.environ.get('XLA_FLAGS', '')))")
    out = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "''"]


def test_a_jaxlib_the_flag_was_not_tested_with_gets_no_flag():
    code = ("import os, contrastive_cli.perf.xla as r\n"
            "r.EIGEN_FLAG_JAXLIB = ('9.',)\n"
            "print(r.prefer_eigen_convolutions(), repr(os.environ.get('XLA_FLAGS', '')))\n"
            "r.EIGEN_FLAG_JAXLIB = ('0.10.',)\n"
            "print(r.prefer_eigen_convolutions())")
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "''", "True"]
