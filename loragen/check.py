"""Check that a LoRA adapter in PEFT's format will load, and load as the adapter it is, where it is going.

    from loragen.check import check_adapter

    problems = check_adapter("brackets-lora", consumer="vllm", max_lora_rank=16)   # [] when it is fine

An adapter is a PEFT directory (adapter_config.json + adapter_model.safetensors) or one safetensors file whose
`__metadata__["adapter_config"]` carries the config, as `generator.adapter` writes it (and `POST /generate`
answers). Only the safetensors header is read, by hand (an 8-byte little-endian length, then JSON), never the
weights: no torch here, so the check runs beside any inference stack, in milliseconds, on adapters of any size.

Names: r the adapter's rank, d_in / d_out the target Linear's input / output size. PEFT's keys are
`base_model.model.<module>.lora_A.weight` (r, d_in) and `base_model.model.<module>.lora_B.weight` (d_out, r).

Consumers, and why each check is there:
- peft   a plain LoRA in PEFT's layout: the baseline every consumer shares. Keys, A/B shapes against r (or
         rank_pattern), target_modules against the weights, floating-point dtypes, and none of the extras
         that make it more than a LoRA: DoRA, modules_to_save, trained biases. PEFT itself loads those,
         but vLLM refuses them and LoRAX silently drops them, and loragen never writes them.
- vllm   the above, and what vLLM 0.33 checks or needs: no LoRA features its PEFTHelper refuses
         (`_validate_features`), r <= --max-lora-rank (vLLM accepts only the values in
         VLLM_MAX_LORA_RANKS), tensors in float32/float16/bfloat16, and a hub id as base_model_name_or_path,
         which is what vLLM's resolvers match against the served model's name.
- lorax  the above but the rank bound (LoRAX pads any rank), and what LoRAX's LoraConfig ignores: it reads
         r, lora_alpha, use_rslora and target_modules only, and only `lora_A.weight` / `lora_B.weight` keys,
         so rank_pattern, alpha_pattern and embedding LoRAs would be dropped without a word.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONSUMERS = ("peft", "vllm", "lorax")
ADAPTER_CONFIG = "adapter_config.json"  # the names PEFT's from_pretrained reads
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The values vLLM accepts for --max-lora-rank: `MaxLoRARanks` in vllm/config/lora.py of vLLM 0.33.0
# (tests/test_check_adapter.py compares it with the installed vLLM's, where there is one).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# LoRA features vLLM's PEFTHelper._validate_features refuses (vLLM 0.33.0), and the PEFT inits that change the
# base model's weights when PEFT loads the adapter; LoRAX reads none of these fields, so it would drop them.
_UNSUPPORTED_FEATURES = {
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
_INITS_THAT_CHANGE_THE_BASE = ("pissa", "olora", "loftq", "corda")  # init_lora_weights values (and pissa_niter_*)

# safetensors' dtypes and their sizes in bytes (the format's own list)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_PEFT_FLOATS = ("F64", "F32", "F16", "BF16")  # what PEFT loads as LoRA weights
_SERVING_FLOATS = ("F32", "F16", "BF16")  # what vLLM (lora_dtype float16/bfloat16/the model's) and LoRAX cast from
_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers

# base_model.model.<module>.lora_A.weight, and PEFT's embedding LoRA (a parameter, so no `.weight`)
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.weight|(?P<embedding>lora_embedding_[AB]))")
# a Hugging Face hub id: owner/name, as huggingface_hub's validate_repo_id accepts them
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)


class UnreadableAdapter(ValueError):
    """The input is not an adapter this can check at all: a missing file, not safetensors, a config that is not
    JSON. One line, naming the file and what to give instead."""


@dataclass(frozen=True)
class CheckResult:
    """What `run_check` found: the problems (one line each; none: the adapter is fine for the consumer) and a
    one-line summary of the adapter."""

    problems: list[str]
    summary: str


def check_adapter(path_or_bytes: str | os.PathLike[str] | bytes, consumer: str = "peft",
                  max_lora_rank: int | None = None) -> list[str]:
    """The problems that keep an adapter from loading (as itself) into `consumer`: peft, vllm or lorax; [] when
    there are none. `path_or_bytes`: a PEFT directory, a .safetensors file, or a safetensors file's bytes.
    `max_lora_rank`: the server's --max-lora-rank (vLLM; one of VLLM_MAX_LORA_RANKS), to check r against it.
    Raises UnreadableAdapter for input that is not an adapter, ValueError for a bad consumer or max_lora_rank."""
    return run_check(path_or_bytes, consumer, max_lora_rank).problems


def run_check(path_or_bytes: str | os.PathLike[str] | bytes, consumer: str = "peft",
              max_lora_rank: int | None = None) -> CheckResult:
    """`check_adapter`, with a summary of the adapter for a report."""
    _check_arguments(consumer, max_lora_rank)
    adapter = _read(path_or_bytes)
    problems = _config_problems(adapter.config, consumer)
    problems += _weight_problems(adapter, consumer)
    if consumer == "vllm":
        problems += _rank_problems(adapter, max_lora_rank)
    elif max_lora_rank is not None and adapter.max_rank > max_lora_rank:
        problems.append(f"r {adapter.max_rank} is above --max-lora-rank {max_lora_rank}")
    return CheckResult(problems, adapter.summary())


# ---- reading -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]


@dataclass
class _Adapter:
    """What the check reads of an adapter: its config, its tensors' names, dtypes and shapes."""

    config: dict[str, Any]
    tensors: list[_Tensor]
    max_rank: int = field(init=False)

    def __post_init__(self) -> None:
        ranks = [self.config.get("r"), *(_mapping(self.config.get("rank_pattern")) or {}).values()]
        self.max_rank = max((r for r in ranks if _is_int(r)), default=0)

    def summary(self) -> str:
        dtypes = sorted({_DTYPE_NAMES.get(t.dtype, t.dtype) for t in self.tensors})
        targets = self.config.get("target_modules")
        targets = ", ".join(map(str, targets)) if isinstance(targets, list) else repr(targets)
        return (f"r {self.config.get('r')}, lora_alpha {self.config.get('lora_alpha')}, target modules {targets}, "
                f"{len(self.tensors)} tensors ({', '.join(dtypes) or 'none'}), "
                f"base {self.config.get('base_model_name_or_path')}")


def _read(source: str | os.PathLike[str] | bytes) -> _Adapter:
    if isinstance(source, bytes | bytearray | memoryview):
        header = _parse_header(bytes(source[:8]), lambda n: bytes(source[8 : 8 + n]), len(source), "the adapter bytes")
        return _Adapter(_config_from_metadata(header, "the adapter bytes"), _tensors(header))
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"expected a path or a safetensors file's bytes, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        weights, config_path = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
        if not weights.is_file():
            other = [p.name for p in path.iterdir() if p.name in ("adapter_model.bin", "adapter_model.pt")]
            raise UnreadableAdapter(f"{path}: no {ADAPTER_WEIGHTS} in the directory"
                                    + (f" (it has {other[0]}: only safetensors adapters are checked)" if other else
                                       ": give a PEFT adapter directory or a .safetensors file"))
        if not config_path.is_file():
            raise UnreadableAdapter(f"{path}: no {ADAPTER_CONFIG} in the directory: a PEFT adapter directory holds "
                                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        header = _read_header_file(weights)
        return _Adapter(_config_from_json(config_path), _tensors(header))
    if not path.exists():
        raise UnreadableAdapter(f"{path}: no such file or directory")
    header = _read_header_file(path)
    return _Adapter(_config_from_metadata(header, str(path)), _tensors(header))


def _read_header_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _parse_header(f.read(8), f.read, size, str(path))
    except OSError as e:
        raise UnreadableAdapter(f"{path}: cannot read it: {e.strerror or e}") from None


def _parse_header(first8: bytes, read, size: int, where: str) -> dict[str, Any]:
    """The safetensors header, checked as safetensors checks it: an 8-byte little-endian length, a JSON object of
    tensors {dtype, shape, data_offsets} whose byte ranges tile the data after the header exactly."""
    not_st = f"{where}: not a safetensors file"
    if len(first8) < 8:
        raise UnreadableAdapter(f"{not_st}: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", first8)
    if n > _MAX_HEADER_BYTES or 8 + n > size:
        raise UnreadableAdapter(f"{not_st}: its first 8 bytes announce a {n}-byte header in a {size}-byte file")
    try:
        header = json.loads(read(n))
    except (UnicodeDecodeError, ValueError):
        raise UnreadableAdapter(f"{not_st}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise UnreadableAdapter(f"{not_st}: its header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnreadableAdapter(f"{not_st}: its __metadata__ is not a map of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _DTYPE_BYTES
              and isinstance(info.get("shape"), list)
              and all(_is_int(d) and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
              and len(info["data_offsets"]) == 2 and all(_is_int(o) for o in info["data_offsets"]))
        if not ok:
            raise UnreadableAdapter(f"{not_st}: tensor {name!r} is not described by a known dtype, a shape and two "
                                    f"data offsets ({str(info)[:120]})")
        begin, end = info["data_offsets"]
        if end - begin != math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]:
            raise UnreadableAdapter(f"{not_st}: tensor {name!r} of {info['dtype']} {info['shape']} spans {end - begin} "
                                    "bytes, not its size")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise UnreadableAdapter(f"{not_st}: tensor {name!r} starts at byte {begin} of the data, not {position}: "
                                    "the data is cut, padded or overlapping")
        position = end
    if position != size - 8 - n:
        raise UnreadableAdapter(f"{not_st}: its tensors hold {position} bytes, the file {size - 8 - n} after the header")
    return header


def _tensors(header: dict[str, Any]) -> list[_Tensor]:
    return [_Tensor(name, info["dtype"], tuple(info["shape"])) for name, info in header.items() if name != "__metadata__"]


def _config_from_metadata(header: dict[str, Any], where: str) -> dict[str, Any]:
    raw = header.get("__metadata__", {}).get("adapter_config")
    if raw is None:
        raise UnreadableAdapter(f"{where}: the safetensors file carries no adapter_config in its metadata (only loragen's "
                                f"do): give the PEFT directory, with its {ADAPTER_CONFIG}, instead")
    return _config_object(raw, f"{where}: the adapter_config in its metadata")


def _config_from_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UnreadableAdapter(f"{path}: cannot read it: {e.strerror or e}") from None
    return _config_object(raw, str(path))


def _config_object(raw: str | bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise UnreadableAdapter(f"{where} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UnreadableAdapter(f"{where} is not a JSON object")
    return config


# ---- the checks --------------------------------------------------------------------------------------------------


def _check_arguments(consumer: str, max_lora_rank: int | None) -> None:
    if consumer not in CONSUMERS:
        raise ValueError(f"unknown consumer {consumer!r}; choose one of {', '.join(CONSUMERS)}")
    if max_lora_rank is None:
        return
    if not _is_int(max_lora_rank) or max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be a whole number >= 1, got {max_lora_rank!r}")
    if consumer == "vllm" and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"vLLM accepts --max-lora-rank {', '.join(map(str, VLLM_MAX_LORA_RANKS))} only, not "
                         f"{max_lora_rank}: give the value the vLLM server runs with")


def _config_problems(config: dict[str, Any], consumer: str) -> list[str]:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA': not a LoRA adapter")
    r = config.get("r")
    if not _is_int(r) or r < 1:
        problems.append(f"r is {r!r}: the rank must be a whole number >= 1")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        problems.append(f"lora_alpha is {alpha!r}: it must be a number")
    targets = config.get("target_modules")
    if _targets(targets) is None:
        problems.append(f"target_modules is {targets!r}: it must name the adapted modules (a list of names, or a "
                        "regular expression)")
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name) not in (None, {}) and _mapping(config.get(name)) is None:
            problems.append(f"{name} is {config.get(name)!r}: it must be a map from module name to a number")
    if config.get("use_dora"):
        problems.append("use_dora is true: a DoRA adapter, not a plain LoRA (vLLM refuses DoRA, LoRAX ignores its "
                        "magnitudes); export it without DoRA")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']!r}: the adapter carries whole trained modules "
                        "besides its LoRA weights (vLLM refuses them for a causal LM, LoRAX drops them)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}: the adapter trains biases (vLLM refuses them, LoRAX drops "
                        "them); a plain LoRA has bias 'none'")
    if config.get("lora_bias"):
        problems.append("lora_bias is true: the adapter trains a bias on lora_B (vLLM refuses it, LoRAX drops it)")
    if consumer in ("vllm", "lorax"):
        problems += _serving_config_problems(config, consumer)
    return problems


def _serving_config_problems(config: dict[str, Any], consumer: str) -> list[str]:
    """What vLLM refuses and LoRAX would silently drop; and the base model's name, which both match on."""
    who = "vLLM refuses it" if consumer == "vllm" else "LoRAX ignores it"
    problems = [f"{config_name} is set: {what}, which {who}"
                for config_name, what in _UNSUPPORTED_FEATURES.items() if config.get(config_name)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_INITS_THAT_CHANGE_THE_BASE):
        problems.append(f"init_lora_weights is {init!r}: this init changes the base model's weights when PEFT loads the "
                        f"adapter, which {who}; convert it to a plain LoRA first")
    if consumer == "lorax":
        for name in ("rank_pattern", "alpha_pattern"):
            if _mapping(config.get(name)):
                problems.append(f"{name} is {config[name]!r}: LoRAX scales every module by r and lora_alpha alone, "
                                f"so per-module values would be ignored")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        problems.append("base_model_name_or_path is missing: name the base model's hub id (owner/name) there")
    elif not _is_hub_id(base):
        what = "a local path, not a hub id" if _looks_local(base) else "not a hub id"
        problems.append(f"base_model_name_or_path {base!r} is {what}: vLLM's resolvers and LoRAX match an adapter to "
                        "the served model by the base model's hub id (owner/name, e.g. mistralai/Mistral-7B-Instruct-v0.2); "
                        "write that there (loragen generate --base-model ID)")
    return problems


def _weight_problems(adapter: _Adapter, consumer: str) -> list[str]:
    config, problems = adapter.config, []
    floats = _PEFT_FLOATS if consumer == "peft" else _SERVING_FLOATS
    odd_dtypes = sorted({t.dtype for t in adapter.tensors if t.dtype not in floats})
    if odd_dtypes:
        names = ", ".join(_DTYPE_NAMES[d] for d in floats)
        problems.append(f"tensors of dtype {', '.join(odd_dtypes)}: LoRA weights {'here ' if consumer != 'peft' else ''}"
                        f"must be {names}")
    pairs: dict[str, dict[str, _Tensor]] = {}
    extra: list[str] = []
    for t in adapter.tensors:
        m = _KEY.fullmatch(t.name)
        if m is None:
            extra.append(t.name)
            continue
        which = (m["linear"] or m["embedding"])[-1]  # "A" or "B"
        if m["embedding"] and consumer == "lorax":
            problems.append(f"{t.name}: an embedding LoRA, which LoRAX does not load (it reads lora_A.weight and "
                            "lora_B.weight of linear layers only)")
        pairs.setdefault(m["module"], {})[which] = t
    problems += _extra_key_problems(extra)
    if not pairs and not extra:
        problems.append("no LoRA weights: the file holds no base_model.model.<module>.lora_A.weight / lora_B.weight")
    r = config.get("r")
    if not _is_int(r):
        return problems  # reported with the config; shapes cannot be checked against it
    rank_pattern = _mapping(config.get("rank_pattern")) or {}
    targets = _targets(config.get("target_modules"))
    matched: set[str] = set()
    for module, ab in sorted(pairs.items()):
        missing = [f"lora_{w}" for w in "AB" if w not in ab]
        if missing:
            problems.append(f"{module}: has no {' and no '.join(missing)} (each adapted module needs both)")
            continue
        rank = _pattern_value(rank_pattern, module, r)
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} must both be 2-D, (r, d_in) and (d_out, r)")
        elif a[0] != rank or b[1] != rank:
            source = "rank_pattern" if rank != r else "r"
            problems.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} do not have rank {rank} ({source} in the "
                            f"config): lora_A is (r, d_in), lora_B (d_out, r)")
        hit = _target_match(targets, module)
        if hit is None and targets is not None:
            problems.append(f"{module}: has LoRA weights, but target_modules {targets!r} does not name it")
        else:
            matched.add(hit)
    if isinstance(targets, list) and pairs:
        unused = [t for t in targets if t not in matched]
        if unused:
            problems.append(f"target_modules names {', '.join(unused)}, but the file has no weights for "
                            f"{'it' if len(unused) == 1 else 'them'}")
    return problems


def _extra_key_problems(extra: list[str]) -> list[str]:
    """Keys that are not LoRA A/B weights, reported by what they are."""
    problems = []
    kinds = {
        "lora_magnitude_vector": "DoRA magnitude vectors (a DoRA adapter, not a plain LoRA)",
        "modules_to_save": "modules_to_save weights (whole trained modules, not LoRA weights)",
        "bias": "trained biases",
    }
    for marker, what in kinds.items():
        found = [k for k in extra if marker in k.split(".")]
        if found:
            problems.append(f"{len(found)} tensors of {what}, e.g. {found[0]}")
            extra = [k for k in extra if k not in found]
    if extra:
        problems.append(f"{len(extra)} tensors that are not LoRA weights, e.g. {extra[0]}: PEFT's keys are "
                        "base_model.model.<module>.lora_A.weight and .lora_B.weight (saved without the adapter's name)")
    return problems


def _rank_problems(adapter: _Adapter, max_lora_rank: int | None) -> list[str]:
    rank = adapter.max_rank
    bound = max_lora_rank if max_lora_rank is not None else VLLM_MAX_LORA_RANKS[-1]
    if rank <= bound:
        return []
    fits = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
    if max_lora_rank is None:
        return [f"r {rank} is above {bound}, the largest --max-lora-rank vLLM accepts"]
    remedy = f"start vLLM with --max-lora-rank {fits[0]}" if fits else "vLLM cannot serve it"
    return [f"r {rank} is above --max-lora-rank {max_lora_rank}: {remedy}"]


# ---- helpers -----------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _mapping(x: Any) -> Mapping[str, Any] | None:
    if isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                                   for k, v in x.items()):
        return x
    return None


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (get_pattern_key; vLLM's PEFTHelper follows it): a key matches a module name it ends, at a `.`
    boundary; the first match wins."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue  # not a pattern PEFT could have matched either
    return default


def _targets(targets: Any) -> str | list[str] | None:
    """target_modules when it is what PEFT takes (a regular expression, or a list of names); else None."""
    if isinstance(targets, str) and targets:
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return targets
    return None


def _target_match(targets: str | list[str] | None, module: str) -> str | None:
    """Which target_modules entry names `module` (PEFT: a list matches the name or its last dotted parts; a string
    is a regular expression the whole name must match), or None."""
    if isinstance(targets, str):
        try:
            return targets if re.fullmatch(targets, module) else None
        except re.error:
            return None
    for t in targets or ():
        if module == t or module.endswith("." + t):
            return t
    return None


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or ":" in name


def _is_hub_id(name: str) -> bool:
    return (_HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name
            and not name.endswith(".git") and len(name) <= 96)
