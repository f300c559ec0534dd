"""The demo base LLM: a tiny Llama with its own tokenizer, pretrained to follow instructions.

Text layout, shared by every trainer and by evaluation:
    <s>{instruction}\nIn: {x}\nOut: {y}\nIn: {x2}\nOut: {y2}\n      instruction-prefixed (pretraining)
    <s>In: {x}\nOut: {y}\n                                            no instruction (adapters must pick the task)
The tokenizer is a small BPE learned from the training descriptions (so an instruction is a few word
tokens, not dozens of characters), and task data is written one character per token (the codec spaces
data characters out; spaces are not tokens), so string operations see every character. Loss is taken
on completion tokens only (each `{y}\n`); decoding stops at the newline. The model is saved in Hugging
Face format (config.json, model.safetensors, tokenizer.json): PEFT, transformers and vLLM load it as any
other Llama.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from generator.train.loop import LoopConfig, train_loop
from generator.train.suite import Suite

CHARS = string.ascii_letters + string.digits + "\n.,;:!?'\"-+*/=()[]<>_#&%@$"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
TARGET_MODULES = ("q_proj", "v_proj")
VOCAB_SIZE = 700


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


def spaced(data: str) -> str:
    """Task data one character per token: every character its own pre-token."""
    return " ".join(data.replace(" ", ""))


def canonical(text: str) -> str:
    """What exact match compares: the characters, without the spacing between tokens."""
    return text.replace(" ", "")


def base_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


class Codec:
    """Text ↔ ids for the demo layout; the tokenizer does the mapping."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.newline = tokenizer.convert_tokens_to_ids("\n")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sequence(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> tuple[list[int], list[bool]]:
        """ids and the completion mask (True on each `{y}\\n`) of one training sequence."""
        ids, mask = [BOS], [False]
        if instruction:
            head = self.encode(instruction + "\n")
            ids += head
            mask += [False] * len(head)
        for x, y in pairs:
            p, c = self.encode(f"In: {spaced(x)}\nOut: "), self.encode(spaced(y) + "\n")
            ids += p + c
            mask += [False] * len(p) + [True] * len(c)
        return ids, mask


def prompt(x: str, instruction: str | None = None) -> str:
    return (f"{instruction}\n" if instruction else "") + f"In: {spaced(x)}\nOut: "


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
    """Mean next-token cross-entropy over completion tokens only."""
    logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1]
    target = mask[:, 1:]
    return F.cross_entropy(logits[target], ids[:, 1:][target])


@torch.no_grad()
def greedy(model, codec: Codec, prompts: Sequence[str], max_new: int = 16) -> list[str]:
    """Greedy completions of a left-padded batch of prompts (KV cache), each cut at its first newline and
    written as the concatenation of its tokens (data characters without spacing).
    Any forward hooks on the model (a functional LoRA) see the batch in this order."""
    rows = [[BOS] + codec.encode(p) for p in prompts]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), PAD, dtype=torch.long)
    att = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        att[i, t - len(r):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache_kw = _cache_kwarg(model)
    nxt = out.logits[:, -1].argmax(-1)
    gen, done = [], torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new):
        gen.append(nxt)
        done |= (nxt == codec.newline) | (nxt == EOS)
        if bool(done.all()):
            break
        att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        past = getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, use_cache=True, **{cache_kw: past})
        nxt = out.logits[:, -1].argmax(-1)
    texts = []
    for row in torch.stack(gen, dim=1).tolist():
        cut = [i for i, v in enumerate(row) if v in (codec.newline, EOS)]
        texts.append("".join(codec.tokenizer.convert_ids_to_tokens(row[: cut[0]] if cut else row)))
    return texts


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed past_key_values to cache; older releases know only the former."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes kwargs on
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def load_base(path: str | Path):
    """(model, Codec) of a saved demo base model directory, in eval mode, frozen."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per tiny model drowns the training bars
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, Codec(AutoTokenizer.from_pretrained(str(path)))


def pretrain_base(suite: Suite, out_dir: str | Path, cfg: LoopConfig, *, batch_size: int = 32, pack: int = 3,
                  hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384) -> dict:
    """Pretrain a fresh tiny Llama on instruction-prefixed examples of every task (seen and held out),
    using training descriptions only; save it with its tokenizer in Hugging Face format."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for a 4 MB model are noise
    out = Path(out_dir)
    tokenizer = build_tokenizer(d for texts in suite.train_descriptions.values() for d in texts)
    codec = Codec(tokenizer)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(base_config(len(tokenizer), hidden, layers, heads, intermediate))

    def loss_at(step, rng):
        seqs = []
        for _ in range(batch_size):
            task = rng.choice(suite.tasks)
            pairs = [rng.choice(suite.train_examples[task]) for _ in range(pack)]
            seqs.append(codec.sequence(pairs, rng.choice(suite.train_descriptions[task])))
        return completion_loss(model, *collate(seqs))

    log = train_loop(model, loss_at, cfg, out, name="base pretraining",
                     extra_log={"params": sum(p.numel() for p in model.parameters())})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return log


