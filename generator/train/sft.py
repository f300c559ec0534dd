"""SFT training (T2L): end to end through a frozen causal LM. The hypernetwork turns each sample's task
description (or document) into a LoRA, the LoRA is applied functionally inside the LM's forward pass
(forward hooks, see functional.py; the model is never re-wrapped), and the loss is the LM's cross-entropy
on completion tokens only. Every batch mixes samples of many tasks, each with its own adapter.

The heads of variant L start with their B columns at zero, so every generated adapter starts as a no-op
(as a freshly initialised LoRA does) and training begins from the base model's own behaviour."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from generator.checkpoint import Checkpoint
from generator.config import HyperConfig
from generator.errors import InputError
from generator.hypernet import HyperLoRA, build_hypernet
from generator.train.basemodel import load_base
from generator.train.conditioning import Table, check_table, training_table
from generator.train.functional import FunctionalLora
from generator.train.loop import LoopConfig, train_loop
from generator.train.prompting import PromptFormat, bucketed_completion_loss
from generator.train.suite import Suite

# passes per SFT batch: batches of one-example samples padded to their longest are ~44% padding; two length
# buckets leave ~18% and make a step 0.81x as long, more cost more per pass (benchmarks/sft_step.py)
SFT_BUCKETS = 2


def zero_b_heads(net: HyperLoRA) -> None:
    """Zero the weights and biases that emit B in every variant-L head: generated adapters start as no-ops."""
    c = net.config
    if c.variant != "L":
        raise InputError(f"SFT from a no-op start needs variant L, got {c.variant}")
    with torch.no_grad():
        for m in c.modules:
            head = net.heads[m.name]
            head.weight[c.r * m.d_in:].zero_()
            head.bias[c.r * m.d_in:].zero_()


def check_dropout(dropout: float) -> None:
    """Training-time dropout of a hypernetwork: on its input mixer (the task code beside the layer and module
    codes), in its residual blocks and in a token reader; a regulariser only, never part of the checkpoint
    (generation runs in eval mode). InputError unless 0 <= dropout < 1."""
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be at least 0 and below 1, got {dropout}")


def train_sft(config: HyperConfig, suite: Suite, base_dir: str | Path, out_dir: str | Path, cfg: LoopConfig, *,
              batch_size: int = 32, pack: int = 2, document_share: float = 0.3, table: Table | None = None,
              template: str = "auto", dropout: float = 0.0, buckets: int = SFT_BUCKETS) -> dict:
    """Train on the suite's seen tasks; conditioning is a training description, or with probability
    `document_share` a training document (so documents work as input too). Examples are written in the
    prompt format `template` names for the base (see prompting.py), `pack` examples per sample (1: as a
    served prompt, one input and no earlier pair of the task). Default table: the training table, of
    token states when `config` has a token reader (config.reader), else of pooled embeddings. `dropout`:
    inside the hypernetwork while it trains (see `check_dropout`). `buckets`: each batch runs through the base
    model in up to that many passes of similar-length samples (`length_buckets`), the same loss with less
    padding."""
    check_dropout(dropout)
    model, fmt = load_base(base_dir, template)
    tasks = suite.seen
    table = table or training_table(config, suite)
    check_table(config, table)
    torch.manual_seed(cfg.seed)
    net = build_hypernet(config, dropout)
    zero_b_heads(net)
    lora = FunctionalLora(model, config.target_modules, config.scaling)

    def loss_at(step, rng):
        texts, seqs = draw_batch(suite, fmt, tasks, rng, batch_size=batch_size, pack=pack, document_share=document_share)
        return batch_loss(net, table, lora, model, fmt, texts, seqs, buckets)

    try:
        provenance = {"prompt_format": fmt.name, "base_model": config.base_model,
                      "table": {"texts": len(table.index), "sha256": table.digest}}  # what training could condition on
        log = train_loop(net, loss_at, cfg, out_dir, name="T2L SFT",
                         extra_log={"tasks": tasks, "document_share": document_share, "dropout": dropout,
                                    "batch_size": batch_size, "pack": pack, "buckets": buckets, **provenance})
    finally:
        lora.remove()
    Checkpoint.from_module(net, source=str(out_dir)).save(out_dir)
    return log


def draw_batch(suite: Suite, fmt: PromptFormat, tasks: Sequence[str], rng: random.Random, *, batch_size: int, pack: int,
               document_share: float) -> tuple[list[str], list[tuple[list[int], list[bool]]]]:
    """One SFT batch: per sample a task, its conditioning text (a training description, or with probability
    `document_share` a training document where the task has any) and a sequence of `pack` of its examples."""
    texts, seqs = [], []
    for _ in range(batch_size):
        t = rng.choice(tasks)
        docs = suite.train_documents.get(t)  # a task of a task file may have none
        pool = docs if rng.random() < document_share and docs else suite.train_descriptions[t]
        texts.append(rng.choice(pool))
        seqs.append(fmt.sequence([rng.choice(suite.train_examples[t]) for _ in range(pack)]))
    return texts, seqs


def batch_loss(net: HyperLoRA, table: Table, lora: FunctionalLora, model, fmt: PromptFormat, texts: Sequence[str],
               seqs: Sequence[tuple[list[int], list[bool]]], buckets: int) -> torch.Tensor:
    """The completion loss of a batch, each sample through the adapter the hypernetwork generates from its
    text, in up to `buckets` passes of similar-length samples."""
    ab = table.adapters(net, texts)  # (batch, ...) per module: sample i's adapter at i
    return bucketed_completion_loss(model, fmt, seqs, buckets,
                                    lambda idx: lora.use({m: (a[idx], b[idx]) for m, (a, b) in ab.items()}))
