#!/usr/bin/env bash
# Create .venv and install loragen with its test extras. Safe to run again: an existing venv and torch are kept.
# The test extras include selenium, which drives the system's Chromium and chromedriver (Debian's chromium and
# chromium-driver packages, which .ci/run installs) in the playground's browser tests.
#
# PyTorch goes in first, and the right build of it: a bare `torch` requirement from PyPI is the multi-GB
# CUDA build on Linux. Without an NVIDIA GPU (no working `nvidia-smi`) the CPU build comes from PyTorch's CPU
# index; with one, the CUDA build comes from the default index. When PyTorch's index cannot be reached the
# default index is used (whatever it offers: on a machine with a local wheel folder, that wheel), and the
# script says so.
#
#   bash scripts/install.sh            install
#   bash scripts/install.sh --dry-run  print which torch build and index it would use, install nothing
#
# Environment: PYTHON (default python3), LORAGEN_TORCH_INDEX (an index URL to take torch from, skipping
# the detection).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "install.sh: unknown argument $1 (use --dry-run or nothing)" >&2; exit 2 ;;
esac

reachable() {  # an index answers within 10 s
  "$PYTHON" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
EOF
}

# decide: the build, and the index flags pip gets (none: the default index)
if [ -n "${LORAGEN_TORCH_INDEX:-}" ]; then
  build="as LORAGEN_TORCH_INDEX serves it"; index_args=(--index-url "$LORAGEN_TORCH_INDEX"); from="$LORAGEN_TORCH_INDEX"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  build="CUDA (an NVIDIA GPU is present)"; index_args=(); from="the default index"
elif reachable "$CPU_INDEX"; then
  build="CPU (no NVIDIA GPU)"; index_args=(--index-url "$CPU_INDEX"); from="$CPU_INDEX"
else
  build="CPU (no NVIDIA GPU)"; index_args=()
  from="the default index, because $CPU_INDEX cannot be reached (check the result below)"
fi
echo "torch $TORCH_VERSION: $build, from $from"
[ "$dry_run" = 1 ] && exit 0

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "torch already installed in .venv: kept"
else
  .venv/bin/python -m pip install --quiet "${index_args[@]}" "torch==$TORCH_VERSION"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch; print(f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
echo "installed: $(.venv/bin/loragen --version)"
