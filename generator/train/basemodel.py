"""The demo base LLM: a tiny Llama with its own tokenizer, pretrained to follow instructions.

Text layout, shared by every trainer and by evaluation:
    <s>{instruction}\nIn: {x}\nOut: {y}\nIn: {x2}\nOut: {y2}\n      instruction-prefixed (pretraining)
    <s>In: {x}\nOut: {y}\n                                            no instruction (adapters must pick the task)
The tokenizer is a small BPE learned from the training descriptions (so an instruction is a few word
tokens, not dozens of characters), and task data is written one character per token (the codec spaces
data characters out; spaces are not tokens), so string operations see every character. Loss is taken
on completion tokens only (each `{y}\n`); decoding stops at the newline. The model is saved in Hugging
Face format (config.json, model.safetensors, tokenizer.json): PEFT, transformers and vLLM load it as any
other Llama. The layout is the `spaced` prompt format (generator/train/prompting.py; `Codec` is its class).

`load_base` loads this base or any other Hugging Face causal LM directory with the prompt format
`--template` names; `is_demo_base` says which bases `auto` writes in the demo layout.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from generator.errors import InputError
from generator.train import prompting
from generator.train.loop import LOG, LoopConfig, train_loop
from generator.train.prompting import PromptFormat, Spaced, decode_greedy, prompt_format, spaced, spaced_prompt
from generator.train.suite import Suite

__all__ = ["BOS", "CHARS", "EOS", "PAD", "SPECIAL", "TARGET_MODULES", "UNK", "VOCAB_SIZE", "Codec", "base_config",
           "build_tokenizer", "canonical", "collate", "completion_loss", "greedy", "is_demo_base", "load_base", "pretrain_base",
           "prompt", "spaced"]

CHARS = string.ascii_letters + string.digits + "\n.,;:!?'\"-+*/=()[]<>_#&%@$"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
TARGET_MODULES = ("q_proj", "v_proj")
VOCAB_SIZE = 700
PRETRAINING = "base pretraining"  # the name of pretrain_base's training log: how a demo base is recognised
Codec = Spaced  # text ↔ ids for the demo layout (generator/train/prompting.py); the tokenizer does the mapping


def build_tokenizer(corpus: Iterable[str] = ()):
    """BPE over `corpus` (whitespace splits pre-tokens and is dropped; newlines and punctuation are
    tokens of their own), on top of every single character of CHARS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL), initial_alphabet=list(CHARS),
                                  show_progress=False)
    layout = ["In: Out:"] * 100  # the layout's own words are single tokens whatever the corpus
    tok.train_from_iterator(sorted(set(corpus)) + layout, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=512, padding_side="left")


def base_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


def canonical(text: str) -> str:
    """What exact match compares in the demo layout: the characters, without the spacing between tokens."""
    return Spaced.canonical(text)


def prompt(x: str, instruction: str | None = None) -> str:
    """The text of a decoding prompt in the demo layout (greedy puts BOS before it)."""
    return spaced_prompt(x, instruction)


def collate(seqs: Sequence[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and completion mask (B, T)."""
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens only, of a batch from `collate`."""
    return prompting.completion_loss(model, ids, mask, (ids != PAD).long())


def greedy(model, codec: Codec, prompts: Sequence[str], max_new: int = 16) -> list[str]:
    """Greedy completions of a left-padded batch of prompts (KV cache), each cut at its first newline and
    written as the concatenation of its tokens (data characters without spacing).
    Any forward hooks on the model (a functional LoRA) see the batch in this order."""
    rows = [[BOS] + codec.encode(p) for p in prompts]
    cut = decode_greedy(model, rows, pad_id=PAD, stop_ids=frozenset({codec.newline, EOS}), max_new=max_new)
    return [codec.answer(row) for row in cut]


def is_demo_base(path: str | Path) -> bool:
    """Whether `path` was written by `loragen train base` (pretrain_base): its train_log.json is the log of
    the "base pretraining" stage. Such a base reads the spaced demo layout; every other base does not."""
    log = Path(path) / LOG
    if not log.is_file():
        return False
    try:
        return json.loads(log.read_text(encoding="utf-8")).get("name") == PRETRAINING
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False  # some other tool's train_log.json


def load_base(path: str | Path, template: str = "auto") -> tuple[torch.nn.Module, PromptFormat]:
    """(model, prompt format) of a saved Hugging Face causal LM directory with its tokenizer, the model in
    eval mode and frozen. `template` is what --template says (see generator/train/prompting.py); for the demo
    base, 'auto' gives the spaced format, whose class is `Codec`. Never runs code shipped with the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per tiny model drowns the training bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"base model {path}: no tokenizer AutoTokenizer can load ({_first_line(e)}); save the "
                         "tokenizer beside the model with tokenizer.save_pretrained(DIR)") from None
    fmt = prompt_format(template, tokenizer, demo_base=is_demo_base(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"base model {path} is not a causal LM transformers can load without remote code "
                         f"({_first_line(e)}); give --base a Llama-family model directory (config.json + weights)") from None
    model.eval().requires_grad_(False)
    return model, fmt


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def pretrain_base(suite: Suite, out_dir: str | Path, cfg: LoopConfig, *, batch_size: int = 32, pack: int = 3,
                  hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384, focus: float = 0.0) -> dict:
    """Pretrain a fresh tiny Llama on instruction-prefixed examples of every task (seen and held out),
    each prefixed by one of the task's base instructions (`Suite.base_instructions`: the suite's training
    descriptions, or a universe's task programs), never an evaluation text; save it with its tokenizer in
    Hugging Face format.

    `focus` (0 to 1) spends that share of the training sequences on the tasks the model gets wrong: every
    `FOCUS_EVERY` steps (and at a resumed start, so a resumed run samples as an uninterrupted one) each
    task's completion loss is measured on a fixed probe of its training examples, and tasks are drawn in
    proportion to it for that share, uniformly for the rest. Tasks already learned stop taking steps from
    the ones that are not. 0 draws every task uniformly.

    Each step's sequences are packed several to a row (`prompting.pack`): the same loss as one padded row
    per sequence, in about two thirds of the time."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for a 4 MB model are noise
    out = Path(out_dir)
    tokenizer = build_tokenizer(d for task in suite.tasks for d in suite.base_instructions(task))
    codec = Codec(tokenizer)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(base_config(len(tokenizer), hidden, layers, heads, intermediate))

    if not 0.0 <= focus <= 1.0:
        raise InputError(f"focus must be between 0 and 1, got {focus}")
    tasks = list(suite.tasks)
    weights: list[float] | None = None  # task sampling weights of the current focus period
    refresh = cfg.ckpt_every or FOCUS_EVERY  # a period starts at every resume point

    packed = prompting.honours_packing(model, PAD)

    def loss_at(step, rng):
        nonlocal weights
        if focus and (weights is None or step % refresh == 0):
            weights = _focus_weights(model, codec, suite, tasks, focus, pack, packed=packed)
        seqs = []
        cumulative = list(itertools.accumulate(weights)) if weights else None  # rng.choices(tasks, weights), once
        for _ in range(batch_size):
            task = rng.choices(tasks, cum_weights=cumulative)[0] if weights else rng.choice(tasks)
            pairs = [rng.choice(suite.train_examples[task]) for _ in range(pack)]
            seqs.append(codec.sequence(pairs, rng.choice(suite.base_instructions(task))))
        if packed:
            return prompting.packed_loss(model, prompting.pack(seqs, PAD))
        return completion_loss(model, *collate(seqs))

    log = train_loop(model, loss_at, cfg, out, name=PRETRAINING,
                     extra_log={"params": sum(p.numel() for p in model.parameters()), "focus": focus,
                                "packed": packed})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return log




FOCUS_EVERY = 250  # steps between focus measurements when the loop writes no periodic checkpoint
FOCUS_PROBE = 4  # training examples per task in a focus measurement


@torch.no_grad()
def _focus_weights(model, codec: Codec, suite: Suite, tasks: list[str], focus: float, pack: int, *,
                   batch_size: int = 128, packed: bool = False) -> list[float]:
    """Sampling weights over `tasks`: (1 - focus) uniform plus `focus` in proportion to each task's mean
    completion loss on a fixed probe (its first FOCUS_PROBE training examples, its first instruction).
    A function of the model's weights only, so a resumed run recomputes exactly what it had."""
    import torch.nn.functional as F

    seqs, owner = [], []
    for i, task in enumerate(tasks):
        examples = suite.train_examples[task]
        for j in range(FOCUS_PROBE):
            pairs = [examples[(j * pack + k) % len(examples)] for k in range(pack)]
            seqs.append(codec.sequence(pairs, suite.base_instructions(task)[0]))
            owner.append(i)
    totals = torch.zeros(len(tasks), dtype=torch.float64)
    counts = torch.zeros(len(tasks), dtype=torch.float64)
    for a in range(0, len(seqs), batch_size):
        chunk = seqs[a:a + batch_size]
        if packed:  # several sequences per row (prompting.pack): which one each token is of
            batch = prompting.pack(chunk, PAD)
            ids, target, which = batch.ids, batch.mask[:, 1:], batch.seq[:, 1:].clamp(min=0)
            logits = prompting.packed_logits(model, batch)[:, :-1]
        else:
            ids, mask = collate(chunk)
            target, which = mask[:, 1:], torch.arange(len(chunk))[:, None].expand(-1, ids.shape[1] - 1)
            logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * target  # (b, T-1)
        rows = torch.tensor(owner[a:a + batch_size])[which]  # (b, T-1): the task of each predicted token
        totals.index_add_(0, rows.flatten(), nll.flatten().double())
        counts.index_add_(0, rows.flatten(), target.flatten().double())
    loss = totals / counts.clamp(min=1)
    share = loss / loss.sum() if float(loss.sum()) > 0 else torch.full_like(loss, 1 / len(tasks))
    return ((1 - focus) / len(tasks) + focus * share).tolist()
