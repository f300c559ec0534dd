"""What the hypernetworks are conditioned on: the HyperConfig for a base model (the dims of its target
modules, the LoRA settings, the base model id adapters name), and the task embeddings of texts, encoded
once by the checkpoint's encoder.

A training table (`training_table(config, suite)`) holds only the texts training may show the hypernetwork
(`Suite.training_texts()`: the seen tasks' training descriptions and documents), so an evaluation phrasing
or a held-out task's text cannot even be looked up while training; evaluation builds a table of the texts
it conditions on.

A checkpoint with a token reader (`HyperConfig.reader`) is conditioned on token states, not on one pooled
embedding: its table is a `TokenTable`, with the same lookup interface (`table(texts)`, `index`, `digest`,
`adapters`), that returns `TokenStates` (B, T, E) + mask and stores every text's states
packed in float16 (half the memory; ~30k universe texts of ~25 tokens at E=384 take about 0.6 GB).
`training_table(config, suite)` builds whichever kind `config` needs, and `table.adapters(net, texts)`
runs a hypernetwork on what the table holds, so training code needs no branch of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from generator.config import EncoderSpec, HyperConfig, ReaderSpec, modules_for_base
from generator.encoder import TokenStates
from generator.errors import InputError
from generator.hypernet import HyperLoRA
from generator.train.basemodel import is_demo_base
from generator.train.lora import DEFAULT_LORA, LoraSettings
from generator.train.suite import Suite

DEMO_BASE_ID = "loragen/demo-base"  # what adapters generated for the demo base name as their base model
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells a model id


def base_id(base_dir: str | Path) -> str:
    """The id generated adapters name as their base model, when --base-id is not given: the demo id for a base
    written by `loragen train base`, else the hub id its config.json was saved from (`_name_or_path`, when it
    reads as org/name rather than a path), else the directory's name."""
    base = Path(base_dir)
    if is_demo_base(base):
        return DEMO_BASE_ID
    try:
        saved_from = json.loads((base / "config.json").read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        saved_from = ""
    if isinstance(saved_from, str) and HUB_ID.fullmatch(saved_from):
        return saved_from
    return base.resolve().name


def hyper_config(base_dir: str | Path, *, lora: LoraSettings = DEFAULT_LORA, base_model: str | None = None,
                 variant: str = "L", latent: int = 64, head_in: int = 128, encoder: EncoderSpec | None = None,
                 reader: ReaderSpec | None = None) -> HyperConfig:
    """The HyperConfig of a hypernetwork for the Llama-family base model in `base_dir`: module dims and layer
    count from its config.json, LoRA settings from `lora`, `base_model` (default: `base_id(base_dir)`), and a
    token reader if `reader` is given (else one pooled embedding per text)."""
    from transformers import AutoConfig

    try:
        base = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # one line
        raise InputError(f"base model {base_dir}: its config.json cannot be read by transformers ({reason}); give --base a "
                         "Hugging Face model directory") from None
    if not all(hasattr(base, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")):
        raise InputError(f"base model {base_dir} ({base.model_type}) is not a Llama-family decoder (Llama, Mistral, Qwen2, "
                         "Gemma): its config lacks num_hidden_layers / hidden_size / num_attention_heads / intermediate_size")
    enc = encoder or EncoderSpec()
    return HyperConfig(variant=variant, task_emb_dim=enc.dim, latent=latent, head_in=head_in, n_layers=base.num_hidden_layers,
                       modules=modules_for_base(base, lora.target_modules), r=lora.r, lora_alpha=float(lora.alpha),
                       use_rslora=True, encoder=enc, base_model=base_id(base_dir) if base_model is None else base_model,
                       reader=reader)


def demo_hyper_config(base_dir: str | Path, *, variant: str = "L", latent: int = 64, head_in: int = 128,
                      encoder: EncoderSpec | None = None, reader: ReaderSpec | None = None) -> HyperConfig:
    """The demo bundle's HyperConfig: default LoRA settings, adapters named for the demo base."""
    return hyper_config(base_dir, base_model=DEMO_BASE_ID, variant=variant, latent=latent, head_in=head_in, encoder=encoder,
                        reader=reader)


class EmbeddingTable:
    """text → task embedding (E,), float32, computed in batches by the encoder the checkpoint declares.
    Looking up a text the table was not built with is a KeyError that names the text."""

    def __init__(self, spec: EncoderSpec, texts: Iterable[str], batch_size: int = 64):
        from generator.encoder import TaskEncoder

        encoder = TaskEncoder.load(spec)
        unique = sorted(set(texts))
        self.index = {t: i for i, t in enumerate(unique)}
        # all at once: the encoder batches texts of similar length together (a third of the time of batches
        # in alphabetical order, which pad short texts to long ones)
        empty = torch.empty(0, spec.dim)
        self.matrix = encoder.encode(unique, batch_size=batch_size).float().cpu() if unique else empty  # (texts, E)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), E) embeddings of texts the table holds."""
        _missing(self.index, texts)
        return self.matrix[[self.index[t] for t in texts]]

    def adapters(self, net: HyperLoRA, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """What `net` (a pooled hypernetwork) generates for texts the table holds."""
        return net(self(texts))

    @property
    def digest(self) -> str:
        """sha256 of the table's texts (what a training log records): `texts_digest` of the same set."""
        return texts_digest(self.index)


def _missing(index: dict[str, int], texts: list[str]) -> None:
    missing = [t for t in texts if t not in index]
    if missing:
        raise KeyError(f"{missing[0]!r} is not in this embedding table ({len(index)} texts); a training table "
                       "holds only the seen tasks' training descriptions and documents")


class TokenTable:
    """text → token states (T_i, E) for a reader checkpoint, computed in batches by the encoder the checkpoint
    declares, cut at `reader.max_tokens`, stored packed in float16. Looking up a text the table was not built
    with is a KeyError that names the text."""

    def __init__(self, spec: EncoderSpec, reader: ReaderSpec, texts: Iterable[str], batch_size: int = 64):
        from generator.encoder import TaskEncoder

        encoder = TaskEncoder.load(spec)
        unique = sorted(set(texts))
        rows = []
        for i in range(0, len(unique), batch_size):
            states, mask = encoder.token_states(unique[i:i + batch_size], max_tokens=reader.max_tokens)  # (b, T, E), (b, T)
            rows += [s[m].to(torch.float16) for s, m in zip(states, mask, strict=True)]  # (T_i, E) each
        self.dim = spec.dim
        self.index = {t: i for i, t in enumerate(unique)}
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (texts + 1,)
        self.packed = torch.cat(rows) if rows else torch.empty(0, spec.dim, dtype=torch.float16)  # (sum T_i, E)

    def __call__(self, texts: list[str]) -> TokenStates:
        """Token states (len(texts), T, E) float32, right-padded to the longest, and the (len(texts), T) mask."""
        _missing(self.index, texts)
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in (self.index[t] for t in texts)]
        return TokenStates.pad([self.packed[a:b].float() for a, b in spans], self.dim)

    def adapters(self, net: HyperLoRA, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """What `net` (a hypernetwork with a token reader) generates for texts the table holds."""
        states, mask = self(texts)
        return net.forward_tokens(states, mask)

    @property
    def digest(self) -> str:
        """sha256 of the table's texts (what a training log records): `texts_digest` of the same set."""
        return texts_digest(self.index)


Table = EmbeddingTable | TokenTable


def table_for(config: HyperConfig, texts: Iterable[str]) -> Table:
    """The table a hypernetwork of `config` is conditioned through: token states for a reader, else embeddings."""
    return EmbeddingTable(config.encoder, texts) if config.reader is None else TokenTable(config.encoder, config.reader, texts)


def training_table(config: HyperConfig, suite: Suite) -> Table:
    """`table_for(config, ...)` of only what training may condition on: `suite.training_texts()`."""
    return table_for(config, suite.training_texts())


def check_table(config: HyperConfig, table: Table) -> None:
    """InputError unless `table` holds what a hypernetwork of `config` is conditioned on."""
    if config.reader is not None and not isinstance(table, TokenTable):
        raise InputError("this hypernetwork has a token reader: condition it through a TokenTable (training_table(config, "
                         "suite)), not pooled embeddings")
    if config.reader is None and not isinstance(table, EmbeddingTable):
        raise InputError("this hypernetwork takes pooled embeddings: condition it through an EmbeddingTable, not token states")


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over a set of texts, independent of their order."""
    h = hashlib.sha256()
    for t in sorted(set(texts)):
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()
