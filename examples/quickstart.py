"""Quick start, offline: ask a running loragen for an adapter, load it into PEFT, see the output change.

    loragen serve --checkpoint t2l=../shared/fixtures/t2l-reference/llama_M      # in one terminal
    python examples/quickstart.py                                                # in another

The reference fixture's hypernetwork takes 1024-dim gte-large embeddings, which need that model and
--trust-remote-code to compute from text, so this script sends one of the fixture's own task embeddings.
A checkpoint with the default MiniLM encoder takes {"task": "..."} offline instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "t2l-reference" / "llama_M"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--fixture", type=Path, default=FIXTURE)
    args = p.parse_args()

    embedding = load_file(args.fixture / "task_embs.safetensors")["task_embs"][0].tolist()
    r = httpx.post(f"{args.url}/generate", json={"embedding": embedding}, timeout=120)
    r.raise_for_status()
    print(f"adapter {r.headers['x-adapter-id'][:16]}…: {len(r.content)} bytes, cache {r.headers['x-cache']}")

    out = Path(tempfile.mkdtemp(prefix="loragen-quickstart-"))
    (out / "adapter_model.safetensors").write_bytes(r.content)
    with safe_open(out / "adapter_model.safetensors", "pt") as f:  # the file carries its own PEFT config
        (out / "adapter_config.json").write_text(f.metadata()["adapter_config"])

    # the fixture's tiny random base model (its config is in fixture.json); a real run loads the hub model
    base_cfg = json.loads((args.fixture / "fixture.json").read_text())["base"]["config"]
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{k: base_cfg[k] for k in keep})).eval()
    ids = torch.tensor([[1, 7, 42, 3, 9]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(out)).eval()
        after = model(ids).logits
    print(f"PEFT loaded {out}; logits moved by up to {(after - before).abs().max().item():.3f}")


if __name__ == "__main__":
    main()
