"""Typed, validated architecture config of a Doc-to-LoRA (D2L) hypernetwork.

A `D2LConfig` is everything needed to build the network and to name its output, with no weights: the base
model it reads and adapts (its layer count and hidden size), the ordered target modules, the LoRA rank and
scale, and the Perceiver's and the per-layer heads' sizes. It validates itself once, at construction, and its
errors name the fix. `to_dict`/`from_dict` give the `config.json` of a native checkpoint, which carries
`"kind": "d2l"` so that a reader tells it from a T2L config before parsing the rest.

Short names as in generator/d2l/hypernet.py: L base decoder layers, H base hidden size, D latent size,
r rank, Q latent queries, nb Perceiver encoder blocks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from generator.config import MODULE_PARENTS, ModuleSpec, check_keys
from generator.errors import ConfigError

KIND = "d2l"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PerceiverSpec:
    """The Perceiver that reads one layer's activations of one chunk into M*r latent rows.

    The attention widths are fixed by the reference's code, not by the latent size: 16 query heads and 4
    key/value heads of 128, whatever D is. They are kept as fields so that a checkpoint states them."""

    latent_queries: int = 8  # Q: the encoder's learned queries (the released recipe's n_latent_queries)
    blocks: int = 9  # nb: encoder cross-attention layers (num_blocks; the decoder always has one)
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("latent_queries", "blocks", "heads", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"perceiver.{name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"perceiver.heads ({self.heads}) must be a multiple of perceiver.kv_heads "
                              f"({self.kv_heads}): each key/value head serves heads/kv_heads query heads")
        if not (isinstance(self.rms_eps, float) and 0 < self.rms_eps < 1):
            raise ConfigError(f"perceiver.rms_eps must be a small positive number, got {self.rms_eps!r}")


@dataclass(frozen=True)
class D2LConfig:
    """Architecture of one Doc-to-LoRA hypernetwork and the base model it reads."""

    base_model: str  # hub id (or directory) of the base LLM: it reads the document and receives the adapter
    n_layers: int  # L decoder layers of the base; layer l's adapter is made from the activation entering it
    hidden: int  # H, the base's hidden size: the width of every activation the Perceiver reads
    modules: tuple[ModuleSpec, ...]  # target modules, in sorted name order (the reference's order)
    r: int = 8  # rank of one chunk's LoRA; a document of n chunks gets (n + 1) * r with the bias LoRA
    # the scale D2L applies to x A^T B as is, never divided by a rank: 2 * r^1.5 in the released recipe
    lora_alpha: float = 2 * 8**1.5
    latent: int = 512  # D, the Perceiver's width and the heads' input
    pre_head_layers: int = 1  # residual per-layer MLP blocks before the heads (num_pre_head_layers)
    use_bias: bool = True  # a learned, document-independent LoRA appended to every document's
    perceiver: PerceiverSpec = field(default_factory=PerceiverSpec)
    # tokens per chunk of a long document by default (max_ctx_chunk_len); 0: the whole document is one chunk, as
    # the reference's evaluation does. A request or the server's setting can override it.
    chunk_tokens: int = 0
    # the released training recipe reads activations from a 4-bit copy of the base; loragen reads them from the
    # float base, so such a checkpoint's adapters differ a little from the reference's GPU output
    trained_on_quantized_base: bool = False
    base_model_revision: str | None = None
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind != KIND:
            raise ConfigError(f"a D2L config has kind {KIND!r}, got {self.kind!r}")
        if not self.base_model or not isinstance(self.base_model, str):
            raise ConfigError("base_model must name the base LLM (hub id or directory), e.g. Qwen/Qwen3-4B-Instruct-2507")
        for name in ("n_layers", "hidden", "r", "latent", "pre_head_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_layers < 2:
            raise ConfigError(f"n_layers must be at least 2 (the context encoder is the base without its last "
                              f"layer), got {self.n_layers}")
        if not isinstance(self.chunk_tokens, int) or isinstance(self.chunk_tokens, bool) or self.chunk_tokens < 0:
            raise ConfigError(f"chunk_tokens must be 0 (no chunking) or a positive token count, got {self.chunk_tokens!r}")
        if not self.modules:
            raise ConfigError("modules must name at least one target module, e.g. down_proj")
        names = [m.name for m in self.modules]
        if names != sorted(set(names)):
            raise ConfigError(f"target modules must be distinct and in sorted name order (D2L's order), got {names}")
        for m in self.modules:
            if m.name not in MODULE_PARENTS:
                raise ConfigError(f"unknown target module {m.name!r}; supported: {', '.join(MODULE_PARENTS)}")
            if m.d_in <= 0 or m.d_out <= 0:
                raise ConfigError(f"module {m.name} needs positive d_in/d_out, got {m.d_in}/{m.d_out}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        if not isinstance(self.perceiver, PerceiverSpec):
            raise ConfigError(f"perceiver must be a PerceiverSpec, got {type(self.perceiver).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"D2L checkpoint format version {self.format_version} is not supported by this loragen "
                              f"(it reads version {FORMAT_VERSION}); upgrade loragen or re-convert the checkpoint")

    @property
    def target_modules(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def head_out(self) -> int:
        """P: one head row holds A's row (d_in) then B's row (d_out), padded to the widest module."""
        return max(m.d_in + m.d_out for m in self.modules)

    def combined_rank(self, n_chunks: int) -> int:
        """The rank of a document's adapter: every chunk's r rows, then the bias LoRA's."""
        return (n_chunks + int(self.use_bias)) * self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = [asdict(m) for m in self.modules]
        # kind and format_version first, so that a reader can dispatch or refuse before parsing the rest
        return {"kind": d.pop("kind"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> D2LConfig:
        check_keys(cls, d, ("base_model", "n_layers", "hidden", "modules"), "D2L config")
        try:
            d = dict(d)
            d["modules"] = tuple(ModuleSpec(**m) for m in d["modules"])
            perceiver = d.get("perceiver", {})
            if not isinstance(perceiver, dict):
                raise ConfigError(f"perceiver must be a JSON object, got {type(perceiver).__name__}")
            d["perceiver"] = PerceiverSpec(**perceiver)
            return cls(**d)
        except TypeError as e:  # wrong or missing field inside modules/perceiver
            raise ConfigError(f"malformed D2L config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def canonical_json(self) -> str:
        """Compact, key-sorted JSON: the form that is hashed into checkpoint identities."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
