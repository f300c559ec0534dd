"""Import of released Doc-to-LoRA checkpoints (SakanaAI/doc-to-lora), without executing their pickles.

Layout, as the reference's training writes it:
    <run>/args.yaml                          training arguments: a YAML dump with Python tags (read, not executed)
    <run>/checkpoint-<step>/pytorch_model.bin   torch.save of one dict: the hypernetwork's tensors plus
                                             `base_model_name_or_path`, `hypernet_config`, `ctx_encoder_args`

A source is the run directory (its latest checkpoint-<step> is used), a checkpoint directory, or a directory
holding pytorch_model.bin itself. `pytorch_model.bin` is read with `torch.load(weights_only=True)`; the six
classes the file names are mapped onto plain containers of ours (`ALLOWED`), so nothing of ctx_to_lora or peft
is imported or run, and a file naming any other class is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from generator.config import ModuleSpec
from generator.d2l.config import D2LConfig, PerceiverSpec
from generator.errors import CheckpointError, ConfigError

WEIGHTS = "pytorch_model.bin"
ARGS = "args.yaml"
_STEP = re.compile(r"^checkpoint-(\d+)$")
_COMPILED_PREFIX = "_orig_mod."
NON_TENSOR_KEYS = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")
# what the reference fills in when an older checkpoint's config lacks a field (ModulatedPretrainedModel.from_state_dict)
CONFIG_DEFAULTS = {"num_pre_head_layers": 4, "use_per_rank_bias": False, "use_bias": True}


class Pickled:
    """A pickled dataclass as a plain record: the pickle creates it empty, then sets its fields."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"a pickled {type(self).__name__} holds {type(state).__name__}, expected its fields")
        self.__dict__.update(state)

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)


class HypernetConfig(Pickled): ...


class AggregatorConfig(Pickled): ...


class CtxEncoderArguments(Pickled): ...


class LoraConfig(Pickled): ...


class LoraRuntimeConfig(Pickled): ...


class PeftType:
    """peft's PeftType enum, rebuilt by calling the class with its value."""

    def __init__(self, value: str):
        self.value = value


# exactly the names a released checkpoint's pickle references, each onto a container above
ALLOWED = [
    (HypernetConfig, "ctx_to_lora.modeling.hypernet.HypernetConfig"),
    (AggregatorConfig, "ctx_to_lora.modeling.aggregator.AggregatorConfig"),
    (CtxEncoderArguments, "ctx_to_lora.configs.CtxEncoderArguments"),
    (LoraConfig, "peft.tuners.lora.config.LoraConfig"),
    (LoraRuntimeConfig, "peft.tuners.lora.config.LoraRuntimeConfig"),
    (PeftType, "peft.utils.peft_types.PeftType"),
    set,
]


def is_d2l_source(path: Path) -> bool:
    """Whether `path` looks like a released D2L run, checkpoint or weights directory."""
    return (path / WEIGHTS).is_file() or any(_STEP.match(p.name) and (p / WEIGHTS).is_file()
                                              for p in path.iterdir() if p.is_dir())


def locate(path: Path) -> tuple[Path, Path | None]:
    """(pytorch_model.bin, args.yaml or None) of a run, checkpoint or weights directory."""
    if (path / WEIGHTS).is_file():
        weights = path / WEIGHTS
    else:
        steps = sorted((int(m[1]), p) for p in path.iterdir() if p.is_dir() and (m := _STEP.match(p.name))
                       and (p / WEIGHTS).is_file())
        if not steps:
            raise CheckpointError(f"{path} holds no {WEIGHTS} and no checkpoint-<step>/{WEIGHTS}")
        weights = steps[-1][1] / WEIGHTS  # the latest step, as the reference's released checkpoints are used
    args = next((d / ARGS for d in (weights.parent, weights.parent.parent) if (d / ARGS).is_file()), None)
    return weights, args


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, unpickled with weights_only=True and only ALLOWED's classes."""
    try:
        with torch.serialization.safe_globals(ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a hostile class, a truncated zip, not a torch file: all refused the same way
        raise CheckpointError(f"refusing {path}: not a Doc-to-LoRA checkpoint loadable with weights_only=True and "
                              f"its known config classes ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected the hypernetwork's state dict")
    return dict(obj)


class _ArgsLoader(yaml.SafeLoader):
    """safe_load, plus the Python tags the reference's YAML dump writes for enum values: each becomes the plain
    value it wraps (e.g. `!!python/object/apply:...IntervalStrategy ['no']` → 'no'); no object is built."""


def _plain(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        values = loader.construct_sequence(node, deep=True)
        return values[0] if len(values) == 1 else values
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_ArgsLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def read_args(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ArgsLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a YAML mapping of training arguments")
    return data


def import_d2l(path: Path) -> tuple[D2LConfig, dict[str, torch.Tensor]]:
    """A released run, checkpoint or weights directory → (config, tensors under the reference's names)."""
    weights, args_path = locate(path)
    raw = read_state(weights)
    args = read_args(args_path) if args_path is not None else {}
    missing = [k for k in NON_TENSOR_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{weights} lacks {missing}: not a Doc-to-LoRA checkpoint (ModulatedPretrainedModel)")
    base, hc, ctx = (raw.pop(k) for k in NON_TENSOR_KEYS)
    tensors = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{weights} holds a non-tensor entry {k!r} ({type(v).__name__})")
        tensors[k.removeprefix(_COMPILED_PREFIX)] = v
    try:
        config = _config(base, hc, ctx, args)
    except ConfigError as e:
        raise CheckpointError(f"{weights} does not describe a Doc-to-LoRA hypernetwork loragen can run: {e}") from None
    return config, tensors


def _config(base: Any, hc: Any, ctx: Any, args: Mapping[str, Any]) -> D2LConfig:
    if not isinstance(hc, HypernetConfig) or not isinstance(ctx, CtxEncoderArguments):
        raise ConfigError("hypernet_config / ctx_encoder_args are not the reference's config classes")
    lora, agg = hc.get("lora_config"), hc.get("aggregator_config")
    if not isinstance(lora, LoraConfig) or not isinstance(agg, AggregatorConfig):
        raise ConfigError("hypernet_config lacks its lora_config or aggregator_config")
    need = {  # the released recipe; any other setting is a different architecture
        "per_rank_gen": (hc.get("per_rank_gen"), True),
        "use_light_weight_lora": (hc.get("use_light_weight_lora"), False),
        "use_per_rank_bias": (hc.get("use_per_rank_bias", CONFIG_DEFAULTS["use_per_rank_bias"]), False),
        "use_token_mixing": (hc.get("use_token_mixing"), False),
        "per_layer_processing": (hc.get("per_layer_processing"), True),
        "extra_modules": (bool(hc.get("extra_modules")), False),
        "aggregator_type": (agg.get("aggregator_type"), "perceiver"),
        "num_self_attn_per_block": (agg.get("num_self_attn_per_block"), 0),
        "shared_weights": (agg.get("shared_weights"), False),
        "layer_to_layer_ctx_encoder": (agg.get("layer_to_layer_ctx_encoder"), True),
        "ctx_encoder_type": (ctx.get("ctx_encoder_type"), "per_layer_activations"),
        "ctx_encoder_model_name_or_path": (ctx.get("ctx_encoder_model_name_or_path"), None),
        "ctx_encoder_last_layer": (ctx.get("ctx_encoder_last_layer"), None),
    }
    for name, (got, want) in need.items():
        if got != want:
            raise ConfigError(f"{name} is {got!r}; loragen runs the released recipe, where it is {want!r}")
    peft_type = lora.get("peft_type")
    if getattr(peft_type, "value", peft_type) != "LORA":
        raise ConfigError(f"lora_config.peft_type is {getattr(peft_type, 'value', peft_type)!r}, expected LORA")
    layer_indices = hc.get("layer_indices")
    indices = layer_indices.tolist() if isinstance(layer_indices, torch.Tensor) else list(layer_indices or [])
    if indices != list(range(len(indices))):
        raise ConfigError(f"layer_indices {indices} do not cover the base's layers 0..L-1 in order")
    d_in, d_out = hc.get("feature_sizes") or ({}, {})
    targets = sorted(lora.get("target_modules") or ())
    if not targets or any(t not in d_in or t not in d_out for t in targets):
        raise ConfigError(f"target modules {targets} and feature sizes {d_in}/{d_out} disagree")
    base_name = base if isinstance(base, str) and base else lora.get("base_model_name_or_path") or ""
    config = D2LConfig(
        base_model=base_name or str(args.get("model_name_or_path") or ""),
        n_layers=len(indices),
        hidden=hc.get("base_hidden_size"),
        modules=tuple(ModuleSpec(t, int(d_in[t]), int(d_out[t])) for t in targets),
        r=lora.get("r"),
        lora_alpha=float(lora.get("lora_alpha")),
        latent=hc.get("latent_size"),
        pre_head_layers=hc.get("num_pre_head_layers", CONFIG_DEFAULTS["num_pre_head_layers"]),
        use_bias=bool(hc.get("use_bias", CONFIG_DEFAULTS["use_bias"])),
        perceiver=PerceiverSpec(latent_queries=agg.get("n_latent_queries"), blocks=agg.get("num_blocks")),
        trained_on_quantized_base=bool(ctx.get("quantize_ctx_encoder", False)),
        base_model_revision=lora.get("revision"),
    )
    for key, value in (("lora_r", config.r), ("latent_size", config.latent)):
        if key in args and args[key] != value:
            raise ConfigError(f"args.yaml says {key} {args[key]}, the checkpoint's config says {value}")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
