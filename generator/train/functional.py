"""Apply LoRA weights to a frozen transformers model functionally: forward hooks, no re-wrapping.

`FunctionalLora(model, modules, scaling)` hooks every target Linear of a Llama-family model once (Llama,
Mistral, Qwen2, Gemma: decoder layers at `model.model.layers`, projections under `self_attn` or `mlp`;
`target_linears` finds them and names what a model lacks). `with lora.use(ab):` then makes each hooked
Linear return  base(x) + scaling * (x Aᵀ) Bᵀ  with ab = {module: (A (B, N, r, d_in),
B (B, N, d_out, r))}, the hypernetwork's output format. The batch dim of `ab` is per sample (sample i of
the model's input gets adapter i), or 1 to apply one adapter to the whole batch. Gradients flow into A and
B, so the same hooks serve end-to-end SFT of the hypernetwork and evaluation of any adapter; what PEFT
computes for a loaded adapter is the same sum (tests/test_train.py checks it against PEFT).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from generator.config import MODULE_PARENTS
from generator.errors import InputError

AB = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
# PEFT's key of one LoRA matrix in a Llama-family model: ...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.\w+\.(?P<module>\w+)\.lora_(?P<which>[AB])\.weight")


def decoder_layers(model) -> Sequence[nn.Module]:
    """The decoder layers of a Llama-family causal LM (Llama, Mistral, Qwen2, Gemma): `model.model.layers`."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise InputError(f"{type(model).__name__} has no decoder layers at model.model.layers; LoRA training needs a "
                         "Llama-family causal LM (Llama, Mistral, Qwen2, Gemma)")
    return layers


def target_linears(model, modules: Sequence[str]) -> dict[str, list[nn.Linear]]:
    """{module: its Linear in every decoder layer} for target modules named as PEFT names them (q_proj, ...);
    InputError names the module and the layer that lacks it, and what the layer has."""
    layers = decoder_layers(model)
    found: dict[str, list[nn.Linear]] = {}
    for m in modules:
        if m not in MODULE_PARENTS:
            raise InputError(f"unknown target module {m!r}; a Llama-family decoder layer has {', '.join(MODULE_PARENTS)}")
        found[m] = []
        for i, layer in enumerate(layers):
            linear = getattr(getattr(layer, MODULE_PARENTS[m], None), m, None)
            if not isinstance(linear, nn.Linear):
                raise InputError(f"layer {i} of {type(model).__name__} has no Linear {MODULE_PARENTS[m]}.{m}; it has "
                                 f"{', '.join(_linears(layer)) or 'no Linear'}: choose target modules among those")
            found[m].append(linear)
    return found


def _linears(layer: nn.Module) -> list[str]:
    return [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]


class FunctionalLora:
    def __init__(self, model, modules: Sequence[str], scaling: float):
        self.modules = tuple(modules)
        self.scaling = scaling
        self._ab: AB | None = None
        linears = target_linears(model, self.modules)
        self.n_layers = len(decoder_layers(model))
        self.dims = {m: (ls[0].in_features, ls[0].out_features) for m, ls in linears.items()}  # (d_in, d_out)
        self._handles = [linear.register_forward_hook(self._hook(i, m))
                         for m, ls in linears.items() for i, linear in enumerate(ls)]

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
        for m in self.modules:
            a, b = ab[m]  # (B, N, r, d_in), (B, N, d_out, r)
            d_in, d_out = self.dims[m]
            if a.shape[1] != self.n_layers or b.shape[1] != self.n_layers or a.shape[-1] != d_in or b.shape[-2] != d_out:
                raise InputError(f"the adapter's {m} is {tuple(a.shape[1:])} / {tuple(b.shape[1:])} (A / B) but the model "
                                 f"has {self.n_layers} layers of {m} {d_in}→{d_out}; generate it for this base model")
        self._ab = ab
        try:
            yield
        finally:
            self._ab = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def read_peft(path: str | Path, modules: Sequence[str] | None = None, n_layers: int | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA directory (or its safetensors file) → {module: (A (1, N, r, d_in), B (1, N, d_out, r))}, for
    any target modules of a Llama-family model. `modules`: default, the adapter config's target_modules;
    `n_layers`: default, as many as the file has."""
    p = Path(path)
    file = p / ADAPTER_WEIGHTS if p.is_dir() else p
    if not file.is_file():
        raise InputError(f"{p}: no LoRA adapter there ({file.name} not found); train it with `loragen train lora`")
    weights = load_file(str(file))
    if modules is None:
        modules = peft_settings(p if p.is_dir() else p.parent)["target_modules"]
    keys = {}  # (module, layer, "A" | "B") → key
    for k in weights:
        hit = PEFT_KEY.fullmatch(k)
        if hit:
            keys[(hit["module"], int(hit["layer"]), hit["which"])] = k
    out = {}
    for m in modules:
        n = n_layers if n_layers is not None else 1 + max((i for mod, i, _ in keys if mod == m), default=-1)
        missing = [f"layer {i} lora_{w}" for i in range(n) for w in "AB" if (m, i, w) not in keys]
        if not n or missing:
            raise InputError(f"{p}: not a LoRA of {m} on {n_layers or 'any'} layers (missing {(missing or ['all'])[0]}); "
                             f"its modules: {sorted({mod for mod, _, _ in keys}) or 'none'}")
        a = torch.stack([weights[keys[(m, i, "A")]] for i in range(n)])  # (N, r, d_in)
        b = torch.stack([weights[keys[(m, i, "B")]] for i in range(n)])  # (N, d_out, r)
        out[m] = (a.float()[None], b.float()[None])
    return out


def peft_settings(path: str | Path) -> dict:
    """target_modules (a list), r, lora_alpha and use_rslora of the PEFT adapter in directory `path`."""
    import json

    file = Path(path) / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no {ADAPTER_CONFIG}; a PEFT LoRA directory has one beside its weights") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{file} is not JSON ({e})") from None
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise InputError(f"{file}: target_modules is {targets!r}, not a list of module names; pass the modules explicitly")
    missing = [k for k in ("r", "lora_alpha") if k not in cfg]
    if missing:
        raise InputError(f"{file} has no {' or '.join(missing)}; it is not a PEFT LoRA config")
    return {"target_modules": list(targets), "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "use_rslora": bool(cfg.get("use_rslora"))}


def peft_scaling(path: str | Path) -> float:
    """What PEFT multiplies B@A by for the adapter in directory `path`."""
    return lora_scaling(peft_settings(path))


def lora_scaling(config: Mapping) -> float:
    """What PEFT multiplies B@A by for an adapter_config: lora_alpha/sqrt(r) with rsLoRA, lora_alpha/r without."""
    import math

    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def stack(adapters: Sequence[AB]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapters with batch dim 1 each → one batch of them, in order."""
    return {m: (torch.cat([ad[m][0] for ad in adapters]), torch.cat([ad[m][1] for ad in adapters]))
            for m in adapters[0]}
