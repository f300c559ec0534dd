#!/usr/bin/env bash
# Create .venv and install loragen with its test extras. The CPU build of PyTorch goes in first: a bare
# `torch` requirement would pull a multi-GB CUDA build. On a GPU host, install the torch build you want
# first, then run this script (pip keeps an installed torch that satisfies the requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "installed: $(.venv/bin/loragen --version)"
