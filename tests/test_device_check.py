"""benchmarks/device_check.sh (issue 22): the accelerator check, run here as --dry-run on CPU so the
script cannot rot before an accelerator machine runs it for real."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".peer" / "bin" / "python"  # the peer's venv, where a machine has one


@pytest.mark.slow
def test_device_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "check.json"
    peer = str(PEER_PYTHON) if PEER_PYTHON.exists() else sys.executable
    result = subprocess.run([str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run", "--out", str(out),
                             "--peer-python", peer], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads(out.read_text())
    assert check["dry_run"] and check["machine"]["backend"] == "cpu"
    assert [r["model"] for r in check["ours"]] == ["small"]  # the dry run compiles one model of ours
    for row in check["ours"]:
        assert "error" not in row and "embed_error" not in row, row
        assert row["pairs_per_s"] > 0 and 0 <= row["data_wait"] <= 1 and row["compile_s"] > 0
        assert row["embed_images"] == 32 and row["embed_images_per_s"] > 0
        assert row["precision"] == "float32"  # --precision auto on a CPU
    peer_rows = check["peer"]
    if "skipped" in peer_rows[0]:  # no torch here: said so, and no ratio invented
        assert "torch" in peer_rows[0]["skipped"] and check["ratio_ours_to_peer"] == {}
    else:
        assert [r["pairs_per_s"] > 0 for r in peer_rows] == [True, True]
        assert [r["model"] for r in peer_rows] == ["small", "resnet18"]
        assert set(check["ratio_ours_to_peer"]) == {"small:16:16"}
    assert not list(tmp_path.glob("*.tmp"))
