#!/usr/bin/env bash
# The accelerator check of issue 22, as one command (benchmarks/device_check.py says what it measures):
#
#   benchmarks/device_check.sh [--dry-run] [--out device_check.json] [--peer-python PY]
#
# On a machine with JAX (CUDA) and PyTorch preinstalled and no network, wheels of anything else the
# project needs may be carried in .whl/ (installed to /tmp/site first). Sized for 8 minutes on one
# accelerator (three cases, each a compile and 30-60 steps, an embed, then the peer's 20 steps each),
# but not yet run on one; --dry-run took 29 s on 2 CPU cores (tests/test_device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's contrastive_cli, installed or not
exec "$PY" benchmarks/device_check.py "$@"
