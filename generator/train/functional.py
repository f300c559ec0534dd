"""Apply LoRA weights to a frozen transformers model functionally: forward hooks, no re-wrapping.

`FunctionalLora(model, modules, scaling)` hooks every target Linear once. `with lora.use(ab):` then makes
each hooked Linear return  base(x) + scaling * (x Aᵀ) Bᵀ  with ab = {module: (A (B, N, r, d_in),
B (B, N, d_out, r))}, the hypernetwork's output format. The batch dim of `ab` is per sample (sample i of
the model's input gets adapter i), or 1 to apply one adapter to the whole batch. Gradients flow into A and
B, so the same hooks serve end-to-end SFT of the hypernetwork and evaluation of any adapter; what PEFT
computes for a loaded adapter is the same sum (tests/test_train.py checks it against PEFT).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from generator.config import MODULE_PARENTS
from generator.errors import InputError

AB = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class FunctionalLora:
    def __init__(self, model, modules: Sequence[str], scaling: float):
        self.modules = tuple(modules)
        self.scaling = scaling
        self._ab: AB | None = None
        layers = model.model.layers
        self.n_layers = len(layers)
        self._handles = [
            getattr(getattr(layer, MODULE_PARENTS[m]), m).register_forward_hook(self._hook(i, m))
            for i, layer in enumerate(layers) for m in self.modules
        ]

    def _hook(self, layer: int, module: str):
        def hook(_mod, args, out):
            if self._ab is None:
                return out
            a, b = self._ab[module]  # (B, N, r, d_in), (B, N, d_out, r)
            x = args[0]
            delta = (x @ a[:, layer].transpose(-1, -2)) @ b[:, layer].transpose(-1, -2)  # (B, T, d_out)
            return out + self.scaling * delta.to(out.dtype)

        return hook

    @contextmanager
    def use(self, ab: AB) -> Iterator[None]:
        missing = [m for m in self.modules if m not in ab]
        if missing:
            raise InputError(f"the adapter has no weights for {missing}")
        self._ab = ab
        try:
            yield
        finally:
            self._ab = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def read_peft(path: str | Path, modules: Sequence[str], n_layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA directory (or its safetensors file) → {module: (A (1, N, r, d_in), B (1, N, d_out, r))}."""
    p = Path(path)
    weights = load_file(str(p / ADAPTER_WEIGHTS if p.is_dir() else p))
    out = {}
    for m in modules:
        parent = MODULE_PARENTS[m]
        try:
            a = torch.stack([weights[f"base_model.model.model.layers.{i}.{parent}.{m}.lora_A.weight"] for i in range(n_layers)])
            b = torch.stack([weights[f"base_model.model.model.layers.{i}.{parent}.{m}.lora_B.weight"] for i in range(n_layers)])
        except KeyError as e:
            raise InputError(f"{p}: not a LoRA of {m} on {n_layers} layers (missing {e.args[0]})") from None
        out[m] = (a.float()[None], b.float()[None])
    return out


def peft_scaling(path: str | Path) -> float:
    """What PEFT multiplies B@A by for the adapter in directory `path`."""
    import json
    import math

    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def stack(adapters: Sequence[AB]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapters with batch dim 1 each → one batch of them, in order."""
    return {m: (torch.cat([ad[m][0] for ad in adapters]), torch.cat([ad[m][1] for ad in adapters]))
            for m in adapters[0]}
