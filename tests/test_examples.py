"""Docs are code: README's quick-start commands run here, as a fresh user would run them."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real training runs or subprocesses

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_blocks():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)


def contrastive_commands(block):
    """The `contrastive ...` parts of a `cmd && cmd && ...` line, as argument lists."""
    cli = Path(sys.executable).parent / "contrastive"
    out = []
    for part in block.split(" && "):
        args = shlex.split(part)
        if args and args[0].endswith("bin/contrastive"):
            out.append([str(cli)] + args[1:])
    return out


def test_readme_gives_two_commands_and_ci_runs_the_test_command():
    run_block, test_block = quick_start_blocks()
    assert "pip install ." in run_block and "contrastive pretrain examples/" in run_block
    tests = [c for c in test_block.split(" && ") if "pytest" in c]
    assert [c.rsplit("-m ", 1)[-1] for c in tests] == ['"not slow"', "slow"]  # every test runs, fast set first
    ci = (ROOT / ".ci" / "run").read_text()
    assert " && ".join(tests) in ci


def test_readme_main_job_runs(tmp_path):
    """The first quick-start command, minus the install, in a scratch copy of the checkout."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    commands = contrastive_commands(quick_start_blocks()[0])
    assert [c[1] for c in commands] == ["pretrain", "embed", "similarity"]
    outputs = [subprocess.run(c, cwd=tmp_path, capture_output=True, text=True, timeout=600) for c in commands]
    for c, o in zip(commands, outputs):
        assert o.returncode == 0, (c, o.stderr[-2000:])
        assert "Traceback" not in o.stderr
    assert (tmp_path / "runs" / "example" / "embeddings.json").is_file()
    value = float(outputs[-1].stdout)
    assert -1.0 <= value <= 1.0


@pytest.mark.parametrize("command", ["pretrain", "embed", "similarity", "evaluate", "neighbors", "duplicates", "export"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "contrastive_cli.cli", command, "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Usage" in out.stdout


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """A scratch checkout with a tiny runs/example, as the quick start leaves one."""
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").symlink_to(ROOT / "examples")
    cli = Path(sys.executable).parent / "contrastive"
    done = subprocess.run([str(cli), "pretrain", "examples/fashion-mnist", "--steps", "2", "--batch-size", "16",
                           "--output", "runs/example", "--quiet"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def section(title):
    return README.split(f"\n## {title}" if not title.startswith("#") else f"\n{title}", 1)[1].split("\n## ", 1)[0]


def test_readme_python_api_runs(example_run):
    (code,) = re.findall(r"```python\n(.*?)\n```", section("Python API"), re.DOTALL)
    done = subprocess.run([sys.executable, "-c", code], cwd=example_run, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (example_run / "runs" / "example" / "encoder.stablehlo").is_file()


def test_readme_export_examples_run(example_run):
    (block,) = re.findall(r"```bash\n(.*?)\n```", section("### `contrastive export"), re.DOTALL)
    cli = Path(sys.executable).parent / "contrastive"
    for line in block.splitlines():
        args = shlex.split(line.split("  #", 1)[0])
        args = [str(cli) if a == "contrastive" else sys.executable if a == "python" else a for a in args]
        done = subprocess.run(args, cwd=example_run, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        if "python" in line:
            # [2, D]: the 4 x 4 x 256 features whitened onto the 299 axes its 300 training images span
            assert done.stdout.strip().endswith(", 299)"), done.stdout
