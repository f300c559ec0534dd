"""What the demo hypernetworks are conditioned on: the HyperConfig for the demo base model, and the task
embeddings of every description and document of the suite, encoded once by the checkpoint's encoder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from generator.config import EncoderSpec, HyperConfig, modules_for_base
from generator.train.basemodel import TARGET_MODULES
from generator.train.lora import ALPHA, R
from generator.train.suite import Suite

DEMO_BASE_ID = "loragen/demo-base"  # what generated adapters name as their base model


def demo_hyper_config(base_dir: str | Path, *, variant: str = "L", latent: int = 64, head_in: int = 128,
                      encoder: EncoderSpec | None = None) -> HyperConfig:
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(str(base_dir))
    enc = encoder or EncoderSpec()
    return HyperConfig(variant=variant, task_emb_dim=enc.dim, latent=latent, head_in=head_in,
                       n_layers=base.num_hidden_layers, modules=modules_for_base(base, TARGET_MODULES), r=R,
                       lora_alpha=float(ALPHA), use_rslora=True, encoder=enc, base_model=DEMO_BASE_ID)


class EmbeddingTable:
    """text → task embedding (E,), float32, computed in batches by the encoder the checkpoint declares."""

    def __init__(self, spec: EncoderSpec, texts: Iterable[str], batch_size: int = 64):
        from generator.encoder import TaskEncoder

        encoder = TaskEncoder.load(spec)
        unique = sorted(set(texts))
        rows = [encoder.encode(unique[i:i + batch_size]).float().cpu() for i in range(0, len(unique), batch_size)]
        self.index = {t: i for i, t in enumerate(unique)}
        self.matrix = torch.cat(rows) if rows else torch.empty(0, spec.dim)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.matrix[[self.index[t] for t in texts]]

    @classmethod
    def for_suite(cls, spec: EncoderSpec, suite: Suite) -> EmbeddingTable:
        texts = [t for group in (suite.train_descriptions, suite.eval_descriptions, suite.train_documents,
                                 suite.eval_documents) for v in group.values() for t in v]
        return cls(spec, texts + list(suite.unrelated))
