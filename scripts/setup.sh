#!/usr/bin/env bash
# Create .venv (if missing) and install anomaly_core with its dev extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU-usable torch/torchvision pair for these machines (torch>=2.14 is what pyproject declares).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[dev,onnx,faiss,serve]"
