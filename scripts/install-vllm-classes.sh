#!/usr/bin/env bash
# Install vLLM's Python classes into .venv so that tests/test_vllm_resolver.py runs against them (CI does;
# without them those tests skip). vLLM's wheel is a CUDA build that pins other torch and transformers versions:
# it goes in without its dependencies, and the few pure-Python packages its LoRA classes import are installed
# with this venv's torch and transformers held where they are. vLLM's engine is not usable this way.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
py=.venv/bin/python
[ -x "$py" ] || { echo "install-vllm-classes.sh: run scripts/install.sh first" >&2; exit 2; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$py" -c 'import torch, transformers; print(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}")' > "$constraints"
"$py" -m pip install --quiet --no-deps "vllm==$VLLM_VERSION" "xgrammar==0.2.9"
"$py" -m pip install --quiet -c "$constraints" packaging msgspec regex psutil pyzmq cbor2 aiohttp requests openai-harmony openai \
    pillow pybase64 cachetools cloudpickle uvloop py-cpuinfo partial-json-parser llguidance einops apache-tvm-ffi
"$py" -c 'import vllm.lora.resolver, vllm.lora.request'  # fails loudly if a class cannot import
echo "installed: vllm $VLLM_VERSION (LoRA classes only)"
