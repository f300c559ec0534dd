"""Stacking adapters: several LoRA adapters of one base model and one set of modules, each with a weight, as
one adapter whose ranks are theirs side by side (Doc-to-LoRA's chunk combination, generalised: one adapter
per document, stacked).

Dimension names:
    n    adapters stacked (2 to MAX_STACK)         i     one of them
    r_i  adapter i's rank                          r     sum of the r_i: the stacked rank
    R    r zero-padded up to a rank vLLM accepts (`padded_rank`)
    d_in, d_out  features of the adapted Linear; every adapter must agree on them for every (layer, module)

Adapter i adds s_i * B_i A_i x to a target Linear's output, with A_i [r_i, d_in], B_i [d_out, r_i] and PEFT's
scaling s_i = lora_alpha_i / r_i (lora_alpha_i / sqrt(r_i) with use_rslora). With weight w_i, the stacked
adapter's update is exactly

    sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ... | w_n s_n B_n | 0] @ [A_1; ...; A_n; 0]

so lora_A = the A_i concatenated along the rank (rows, [R, d_in]) and lora_B = the w_i s_i B_i concatenated
along the rank (columns, [d_out, R]); the R - r zero rows of A and zero columns of B add nothing. The scalings
are folded into B, so the stacked adapter has lora_alpha = R and use_rslora off: PEFT's scaling is 1. Each
w_i s_i B_i is computed in float64 and rounded once to the output dtype; A_i is copied as is.

Adapters are read from their safetensors bytes, whose `__metadata__["adapter_config"]` is the PEFT config
(as `LoraAdapter.metadata()` writes it, and `POST /generate` answers). No HTTP here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import torch
from safetensors.torch import load as load_safetensors

from generator import __version__
from generator.adapter import DTYPES, LoraAdapter, lora_config_dict, padded_rank, parse_dtype, read_safetensors_metadata
from generator.errors import InputError

MIN_STACK = 2  # one adapter stacked alone is itself
# bounds the memory and time of one request (32 adapters of rank 16 make rank 512, the largest vLLM takes)
MAX_STACK = 32
_A, _B = ".lora_A.weight", ".lora_B.weight"


def check_weights(weights: Sequence[float]) -> list[float]:
    """The weights as floats, if there are MIN_STACK to MAX_STACK of them and each is a finite number.
    Cheap: the service checks a request with it before fetching any adapter."""
    n = len(weights)
    if not MIN_STACK <= n <= MAX_STACK:
        raise InputError(f"{n} adapter{'s' if n != 1 else ''} to stack; give {MIN_STACK} to {MAX_STACK}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise InputError(f"adapters[{i}]: the weight must be a number, got {type(w).__name__}")
        if not math.isfinite(w):
            raise InputError(f"adapters[{i}]: the weight is {w}; every weight must be a finite number")
        out.append(float(w))
    return out


def stack_adapters(files: Sequence[bytes], weights: Sequence[float], ids: Sequence[str] | None = None, *,
                   dtype: str | None = None) -> LoraAdapter:
    """One adapter computing sum_i weights[i] * (adapter i's update), from the safetensors bytes of each.

    `ids` name the sources in the provenance and in errors (default: the sha256 of each file's bytes);
    `dtype` the output's (default: the sources' common dtype, else float32). InputError, naming the adapters
    and what differs, for sources that do not stack."""
    if len(files) != len(weights):
        raise InputError(f"{len(weights)} weights for {len(files)} adapters; give one weight per adapter")
    weights = check_weights(weights)
    if ids is None:
        ids = [hashlib.sha256(f).hexdigest() for f in files]
    elif len(ids) != len(files):
        raise InputError(f"{len(ids)} ids for {len(files)} adapters; give one id per adapter, or none")
    sources = [_Source.read(f, _name(i, ids[i])) for i, f in enumerate(files)]
    first = sources[0]
    for src in sources[1:]:
        _check_same(first, src)
    out = parse_dtype(dtype) if dtype is not None else _common_dtype(sources)
    rank = sum(s.r for s in sources)
    r_pad = padded_rank(rank)
    scales = [w * s.scaling for w, s in zip(weights, sources, strict=True)]  # w_i s_i, in Python's float64
    tensors = {}
    for prefix, (d_in, d_out) in sorted(first.dims.items()):
        a = torch.zeros(r_pad, d_in, dtype=out)  # (R, d_in)
        b = torch.zeros(d_out, r_pad, dtype=out)  # (d_out, R)
        start = 0
        for src, scale in zip(sources, scales, strict=True):
            a[start : start + src.r] = src.tensors[prefix + _A]
            b[:, start : start + src.r] = src.tensors[prefix + _B].double() * scale  # (d_out, r_i), rounded once
            start += src.r
        tensors[prefix + _A], tensors[prefix + _B] = a, b
    config = lora_config_dict(first.base_model, first.config.get("revision"), r_pad, r_pad, False,
                              first.config["target_modules"])
    dtype_name = next(k for k, v in DTYPES.items() if v == out)
    provenance = {"kind": "stack", "sources": json.dumps(list(ids), separators=(",", ":")),
                  "weights": json.dumps(weights, separators=(",", ":")),
                  "rank": str(rank), "dtype": dtype_name, "base_model": first.base_model, "loragen_version": __version__}
    adapter = LoraAdapter(tensors, config, provenance)
    if not adapter.all_finite():
        raise InputError(f"the stacked adapter has non-finite weights in {dtype_name}: the sources hold non-finite "
                         "values, or a weight times a source's scaling overflows; use smaller weights, or float32")
    return adapter


def _name(i: int, source_id: str) -> str:
    return f"adapters[{i}] ({source_id[:12]})"


class _Source:
    """One adapter to stack: its LoRA tensors, PEFT config, rank, scaling, and (d_in, d_out) per module."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], config: dict):
        self.name, self.tensors, self.config = name, tensors, config
        self.base_model = config.get("base_model_name_or_path")
        modules = config.get("target_modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise InputError(f"{name}: target_modules in its adapter_config is {modules!r}, not a list of module "
                             "names; stack adapter files that loragen wrote")
        self.r, self.scaling = self._rank_and_scaling()
        self.dims = self._dims()  # module prefix → (d_in, d_out)

    @classmethod
    def read(cls, data: bytes, name: str) -> _Source:
        try:
            meta = read_safetensors_metadata(data)
            tensors = load_safetensors(bytes(data))
        except Exception as e:  # struct, JSON, UTF-8 and safetensors' own errors: all "not a safetensors file"
            raise InputError(f"{name} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if "adapter_config" not in meta:
            raise InputError(f"{name} carries no adapter_config in its safetensors metadata; stack adapter files "
                             "that loragen wrote (POST /generate, `loragen generate`)")
        try:
            config = json.loads(meta["adapter_config"])
        except json.JSONDecodeError:
            raise InputError(f"{name}: the adapter_config in its metadata is not valid JSON") from None
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{name} is not a LoRA adapter (peft_type {config.get('peft_type')!r}); only LoRA stacks"
                             if isinstance(config, dict) else f"{name}: its adapter_config is not a JSON object")
        return cls(name, tensors, config)

    def _rank_and_scaling(self) -> tuple[int, float]:
        c = self.config
        if c.get("use_dora"):
            raise InputError(f"{self.name} is a DoRA adapter (use_dora): its magnitude vectors do not stack; "
                             "stack plain LoRA adapters")
        for field in ("rank_pattern", "alpha_pattern"):
            if c.get(field):
                raise InputError(f"{self.name} has a non-empty {field}: its modules differ in rank or alpha, which "
                                 "stacking does not support; stack adapters with one r and lora_alpha")
        r, alpha = c.get("r"), c.get("lora_alpha")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise InputError(f"{self.name}: r in its adapter_config is {r!r}, not a positive integer")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise InputError(f"{self.name}: lora_alpha in its adapter_config is {alpha!r}, not a finite number")
        return r, alpha / (math.sqrt(r) if c.get("use_rslora") else r)

    def _dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every module, checking that the file holds LoRA pairs of rank r and nothing else."""
        dims = {}
        for key in self.tensors:
            if not key.endswith((_A, _B)):
                raise InputError(f"{self.name} holds {key}, which is not a lora_A or lora_B weight: biases, "
                                 "modules_to_save and embedding LoRAs do not stack")
            prefix = key[: -len(_A)]
            a, b = self.tensors.get(prefix + _A), self.tensors.get(prefix + _B)
            if a is None or b is None:
                raise InputError(f"{self.name} holds {key} without its {'lora_B' if b is None else 'lora_A'} pair")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise InputError(f"{self.name}: {prefix} holds {a.dtype}/{b.dtype} weights; LoRA weights are floats")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.r or b.shape[1] != self.r:
                raise InputError(f"{self.name}: {prefix} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                                 f"not [r, d_in] and [d_out, r] with its r = {self.r}")
            dims[prefix] = (a.shape[1], b.shape[0])
        if not dims:
            raise InputError(f"{self.name} holds no LoRA weights")
        return dims


def _check_same(first: _Source, other: _Source) -> None:
    """InputError naming what differs between `other` and the first adapter, if anything that stacking needs."""
    a, b = first.config, other.config
    for field, what in (("base_model_name_or_path", "base models"), ("revision", "base model revisions")):
        if a.get(field) != b.get(field):
            raise InputError(f"{first.name} and {other.name} are for different {what}: {a.get(field)!r} vs "
                             f"{b.get(field)!r}; only adapters of one base model stack")
    if set(a["target_modules"]) != set(b["target_modules"]):  # the order of the list means nothing
        raise InputError(f"{first.name} and {other.name} have different target_modules: {a.get('target_modules')!r} "
                         f"vs {b.get('target_modules')!r}; only adapters of the same modules stack")
    if first.dims.keys() != other.dims.keys():
        only = sorted(first.dims.keys() - other.dims.keys()) or sorted(other.dims.keys() - first.dims.keys())
        raise InputError(f"{first.name} and {other.name} adapt different layers or modules ({len(first.dims)} vs "
                         f"{len(other.dims)} modules; {only[0]} is in one only); only adapters of the same modules stack")
    for prefix, (d_in, d_out) in first.dims.items():
        if other.dims[prefix] != (d_in, d_out):
            o_in, o_out = other.dims[prefix]
            raise InputError(f"{first.name} and {other.name} differ in shape at {prefix}: d_in {d_in}, d_out {d_out} vs "
                             f"d_in {o_in}, d_out {o_out}; they are not for the same base model")




def _common_dtype(sources: Sequence[_Source]) -> torch.dtype:
    """The dtype every source tensor has, if it is one an adapter is written in; else float32."""
    dtypes = {t.dtype for s in sources for t in s.tensors.values()}
    common = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return common if common in DTYPES.values() else torch.float32
