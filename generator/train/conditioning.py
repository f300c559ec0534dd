"""What the hypernetworks are conditioned on: the HyperConfig for a base model (the dims of its target
modules, the LoRA settings, the base model id adapters name), and the task embeddings of texts, encoded
once by the checkpoint's encoder.

A training table holds only the texts training may show the hypernetwork (`Suite.training_texts()`: the
seen tasks' training descriptions and documents), so an evaluation phrasing or a held-out task's text
cannot even be looked up while training; evaluation builds the full table (`EmbeddingTable.for_suite`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from generator.config import EncoderSpec, HyperConfig, modules_for_base
from generator.errors import InputError
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
                 variant: str = "L", latent: int = 64, head_in: int = 128, encoder: EncoderSpec | None = None) -> HyperConfig:
    """The HyperConfig of a hypernetwork for the Llama-family base model in `base_dir`: module dims and layer
    count from its config.json, LoRA settings from `lora`, `base_model` (default: `base_id(base_dir)`)."""
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
                       use_rslora=True, encoder=enc, base_model=base_id(base_dir) if base_model is None else base_model)


def demo_hyper_config(base_dir: str | Path, *, variant: str = "L", latent: int = 64, head_in: int = 128,
                      encoder: EncoderSpec | None = None) -> HyperConfig:
    """The demo bundle's HyperConfig: default LoRA settings, adapters named for the demo base."""
    return hyper_config(base_dir, base_model=DEMO_BASE_ID, variant=variant, latent=latent, head_in=head_in, encoder=encoder)


class EmbeddingTable:
    """text → task embedding (E,), float32, computed in batches by the encoder the checkpoint declares.
    Looking up a text the table was not built with is a KeyError that names the text."""

    def __init__(self, spec: EncoderSpec, texts: Iterable[str], batch_size: int = 64):
        from generator.encoder import TaskEncoder

        encoder = TaskEncoder.load(spec)
        unique = sorted(set(texts))
        rows = [encoder.encode(unique[i:i + batch_size]).float().cpu() for i in range(0, len(unique), batch_size)]
        self.index = {t: i for i, t in enumerate(unique)}
        self.matrix = torch.cat(rows) if rows else torch.empty(0, spec.dim)  # (texts, E)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), E) embeddings of texts the table holds."""
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise KeyError(f"{missing[0]!r} is not in this embedding table ({len(self.index)} texts); a training table "
                           "holds only the seen tasks' training descriptions and documents")
        return self.matrix[[self.index[t] for t in texts]]

    @property
    def digest(self) -> str:
        """sha256 of the table's texts (what a training log records): `texts_digest` of the same set."""
        return texts_digest(self.index)

    @classmethod
    def for_training(cls, spec: EncoderSpec, suite: Suite) -> EmbeddingTable:
        """Only what training may condition on: `suite.training_texts()`."""
        return cls(spec, suite.training_texts())

    @classmethod
    def for_suite(cls, spec: EncoderSpec, suite: Suite) -> EmbeddingTable:
        """Every description and document of the suite, and its unrelated controls: evaluation's table."""
        texts = [t for group in (suite.train_descriptions, suite.eval_descriptions, suite.train_documents,
                                 suite.eval_documents) for v in group.values() for t in v]
        return cls(spec, texts + list(suite.unrelated))


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over a set of texts, independent of their order."""
    h = hashlib.sha256()
    for t in sorted(set(texts)):
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()
