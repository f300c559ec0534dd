"""Typed, validated architecture config of a Text-to-LoRA hypernetwork.

A `HyperConfig` is everything needed to build the network and to name its output, with no weights: the
variant, the dims, the ordered target modules of the base model, the LoRA hyper-parameters, the task
encoder it expects and the base model it adapts. It validates itself once, at construction, and its
errors name the fix. `to_dict`/`from_dict` give the `config.json` of a native checkpoint.

`reader` chooses what the hypernetwork is conditioned on. None (every released T2L checkpoint, and the
default): one pooled, normalised sentence embedding (B, E) per text. A `ReaderSpec`: the encoder's
token-level states (B, T, E), read by cross-attention from learned latent queries (Perceiver-style, as in
Doc-to-LoRA), which keeps the word order and the small words a pooled embedding nearly erases ("add" vs
"subtract", "then reverse" vs "reverse, then").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from generator.errors import ConfigError

FORMAT_VERSION = 1
VARIANTS = ("L", "M", "S")
POOLINGS = ("cls", "mean")
NORMALIZATIONS = ("l2_sqrt_dim", "l2", "none")

# Where PEFT finds each projection inside a decoder layer of Llama-family models (Llama, Mistral, Gemma,
# Qwen2): attention projections under `self_attn`, feed-forward ones under `mlp`.
MODULE_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
T2L_ENCODER = "Alibaba-NLP/gte-large-en-v1.5"


@dataclass(frozen=True)
class ModuleSpec:
    """One target projection of the base model: `name` (e.g. q_proj) maps d_in features to d_out."""

    name: str
    d_in: int
    d_out: int

    @property
    def parent(self) -> str:
        return MODULE_PARENTS[self.name]


@dataclass(frozen=True)
class EncoderSpec:
    """How texts become task embeddings; a checkpoint declares it because it was trained on it."""

    name: str = DEFAULT_ENCODER  # hub id, or a local directory
    dim: int = 384  # E: must equal the hypernetwork's task embedding size
    pooling: str = "cls"  # T2L uses the first token's hidden state; "mean" averages unmasked tokens
    normalization: str = "l2_sqrt_dim"  # T2L: unit L2 norm times sqrt(E), so entries are of order one
    append_full_stop: bool = True  # T2L appends "." to a description ending in a letter
    max_length: int | None = None  # tokens per window; None = the tokenizer's own limit
    revision: str | None = None  # hub revision of the encoder, when loaded from the hub
    requires_remote_code: bool = False  # gte-large ships its modelling code: an operator opt-in

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("encoder.name must be a hub id or a local directory, got an empty value")
        if self.dim <= 0:
            raise ConfigError(f"encoder.dim must be positive, got {self.dim}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"encoder.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"encoder.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"encoder.max_length must be at least 8 tokens or null, got {self.max_length}")


@dataclass(frozen=True)
class ReaderSpec:
    """The token reader: Q learned latent queries of width W cross-attend to the task text's token states."""

    latents: int = 16  # Q: each latent can specialise (the operation, its operand, the order); 16 is plenty for one sentence
    width: int = 256  # W: the reader's own width; token states are projected E -> W, so it need not be E
    heads: int = 4  # attention heads of every cross- and self-attention; W must divide by it
    layers: int = 2  # blocks of (cross-attention to the tokens, self-attention among latents, MLP)
    max_tokens: int = 1024  # T cap per text: a long document's windows are concatenated up to this many tokens
    # the first token's state (a first-token encoder's pooled embedding) also feeds the task code through its
    # own Linear + LayerNorm, and the reader's part starts at zero: training starts as a pooled hypernetwork
    # and the reader adds what pooling loses
    pooled_skip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pooled_skip, bool):
            raise ConfigError(f"reader.pooled_skip must be true or false, got {self.pooled_skip!r}")
        for name in ("latents", "width", "heads", "layers", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"reader.{name} must be a positive integer, got {value!r}")
        if self.width % 2:
            raise ConfigError(f"reader.width must be even (token positions are coded as sine/cosine pairs), got {self.width}")
        if self.width % self.heads:
            fits = 2 * self.heads * max(1, -(-self.width // (2 * self.heads)))  # the next even multiple of heads
            raise ConfigError(
                f"reader.width ({self.width}) must be a multiple of reader.heads ({self.heads}): each head reads "
                f"width/heads features; change one of them, e.g. width {fits}"
            )
        if self.max_tokens < 8:
            raise ConfigError(f"reader.max_tokens must be at least 8 tokens, got {self.max_tokens}")


@dataclass(frozen=True)
class HyperConfig:
    """Architecture of one hypernetwork. Short names as in hypernet.py: E, D, H, N, r."""

    variant: str  # "L": a full head per module; "M": shared A/B head; "S": one rank row at a time
    task_emb_dim: int  # E, the task encoder's output size
    latent: int  # D; T2L's released Mistral checkpoint uses 128, Llama/Gemma 512
    head_in: int  # H, the width fed to the per-module heads (T2L: 4*D)
    n_layers: int  # N decoder layers of the base model; each gets its own A/B
    modules: tuple[ModuleSpec, ...]  # ordered: position = row of the module-type embedding
    r: int = 8
    lora_alpha: float = 16.0  # T2L keeps alpha 16 for every rank
    use_rslora: bool = True  # T2L scales B@A by alpha/sqrt(r), not alpha/r
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    base_model: str = ""  # canonical hub id of the base LLM: written into adapter_config.json
    base_model_revision: str | None = None
    reader: ReaderSpec | None = None  # None: conditioned on one pooled embedding; else on token states (see above)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS} (L, M or S), got {self.variant!r}")
        for name in ("task_emb_dim", "latent", "head_in", "n_layers", "r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.latent % 4:
            raise ConfigError(
                f"latent must be a multiple of 4 (task D/2 + depth D/4 + module D/4), got {self.latent}"
            )
        if self.variant == "S" and self.latent % 2:
            raise ConfigError(f"the S variant's rotary embedding needs an even latent, got {self.latent}")
        if not self.modules:
            raise ConfigError("modules must name at least one target module, e.g. q_proj and v_proj")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ConfigError(f"target modules must be distinct, got {names}")
        for m in self.modules:
            if m.name not in MODULE_PARENTS:
                raise ConfigError(
                    f"unknown target module {m.name!r}; supported: {', '.join(MODULE_PARENTS)}"
                )
            if m.d_in <= 0 or m.d_out <= 0:
                raise ConfigError(f"module {m.name} needs positive d_in/d_out, got {m.d_in}/{m.d_out}")
        if not self.lora_alpha > 0 or not math.isfinite(self.lora_alpha):
            raise ConfigError(f"lora_alpha must be a positive finite number, got {self.lora_alpha}")
        if self.encoder.dim != self.task_emb_dim:
            raise ConfigError(
                f"encoder {self.encoder.name} gives {self.encoder.dim}-dim embeddings but the hypernetwork "
                f"takes task_emb_dim={self.task_emb_dim}; use an encoder of that size"
            )
        if not self.base_model:
            raise ConfigError("base_model must be the canonical hub id of the base LLM, e.g. mistralai/Mistral-7B-Instruct-v0.2")
        if self.reader is not None and not isinstance(self.reader, ReaderSpec):
            raise ConfigError(f"reader must be a ReaderSpec or null, got {type(self.reader).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format version {self.format_version} is not supported by this loragen "
                f"(it reads version {FORMAT_VERSION}); upgrade loragen or re-convert the checkpoint"
            )

    @property
    def target_modules(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def scaling(self) -> float:
        """What PEFT multiplies B@A by when it applies the adapter."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def head_out(self, m: ModuleSpec) -> int:
        """Width S_m of module m's head output per row."""
        if self.variant == "L":
            return self.r * (m.d_in + m.d_out)
        p = max(m.d_in, m.d_out)
        return self.r * p if self.variant == "M" else p

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = [asdict(m) for m in self.modules]
        d["encoder"] = asdict(self.encoder)
        if self.reader is None:
            del d["reader"]  # a pooled config writes exactly what it always did: its hash and file are unchanged
        elif not self.reader.pooled_skip:
            del d["reader"]["pooled_skip"]  # nor does a reader config without the skip
        # format_version first so a reader can refuse a file before parsing the rest
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HyperConfig:
        check_keys(cls, d, ("variant", "task_emb_dim", "latent", "head_in", "n_layers", "modules"))
        try:
            d = dict(d)
            d["modules"] = tuple(ModuleSpec(**m) for m in d["modules"])
            d["encoder"] = EncoderSpec(**d.get("encoder", {}))
            reader = d.get("reader")
            if reader is not None and not isinstance(reader, dict):
                raise ConfigError(f"reader must be a JSON object of reader settings or null, got {type(reader).__name__}")
            d["reader"] = None if reader is None else ReaderSpec(**reader)
            return cls(**d)
        except TypeError as e:  # wrong or missing field inside modules/encoder/reader
            raise ConfigError(f"malformed config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def canonical_json(self) -> str:
        """Compact, key-sorted JSON: the form that is hashed into checkpoint identities."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def check_keys(cls: type, d: Any, required: Sequence[str], what: str = "config") -> None:
    """ConfigError unless `d` is a JSON object with every `required` key and no key the dataclass `cls` lacks."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; this loragen knows {sorted(known)}")
    missing = sorted(k for k in required if k not in d)
    if missing:
        raise ConfigError(f"{what} is missing required keys {missing}")


def modules_for_base(base_config: Any, names: list[str] | tuple[str, ...]) -> tuple[ModuleSpec, ...]:
    """ModuleSpecs of `names` for a Llama-family transformers config (Llama, Mistral, Gemma 2, Qwen2):
    q/o use n_heads*head_dim on their attention side, k/v n_kv_heads*head_dim (GQA)."""
    hidden = base_config.hidden_size
    n_heads = base_config.num_attention_heads
    n_kv = getattr(base_config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(base_config, "head_dim", None) or hidden // n_heads
    ffn = base_config.intermediate_size
    dims = {
        "q_proj": (hidden, n_heads * head_dim),
        "k_proj": (hidden, n_kv * head_dim),
        "v_proj": (hidden, n_kv * head_dim),
        "o_proj": (n_heads * head_dim, hidden),
        "gate_proj": (hidden, ffn),
        "up_proj": (hidden, ffn),
        "down_proj": (ffn, hidden),
    }
    unknown = [n for n in names if n not in dims]
    if unknown:
        raise ConfigError(f"unknown target modules {unknown}; supported: {', '.join(dims)}")
    return tuple(ModuleSpec(n, *dims[n]) for n in names)
