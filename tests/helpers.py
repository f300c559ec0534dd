"""Builders shared by tests, and polling: tests wait for observable state under a deadline, never by sleeping."""

import asyncio
import inspect
import time

import torch

from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec, HyperConfig, ModuleSpec
from generator.hypernet import build_hypernet


def tiny_checkpoint(variant: str = "L", seed: int = 0, modules=None, n_layers: int = 2, e: int = 16) -> Checkpoint:
    """A small random hypernetwork: q 32→32, v 32→16 unless `modules` says otherwise."""
    torch.manual_seed(seed)
    config = HyperConfig(
        variant=variant, task_emb_dim=e, latent=16, head_in=32, n_layers=n_layers,
        modules=modules or (ModuleSpec("q_proj", 32, 32), ModuleSpec("v_proj", 32, 16)),
        r=2, encoder=EncoderSpec(dim=e), base_model="tiny-random/llama",
    )
    return Checkpoint.from_module(build_hypernet(config), source="tiny")


# A five-task collection of word tasks for training tests (tests/test_custom_base.py, tests/test_reader.py)
WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "ocean", "zebra")
TASKS = (  # name, descriptions (4: one is kept for evaluation), what the task does
    ("reverse", ("Reverse the word.", "Write the word backwards.", "Spell it from the end.", "Flip the letters."),
     lambda w: w[::-1]),
    ("upper", ("Make the word upper case.", "Write it in capitals.", "Shout the word.", "Use capital letters."), str.upper),
    ("first", ("Give the first letter.", "Say the initial letter.", "Only the first character.", "Start letter only."),
     lambda w: w[0]),
    ("double", ("Write the word twice.", "Repeat the word.", "Say it two times.", "Double the word."), lambda w: w + w),
    ("last", ("Give the last letter.", "Say the final letter.", "Only the last character.", "End letter only."),
     lambda w: w[-1]),
)
HELD_OUT = "last"


def write_task_file(path) -> None:
    """TASKS as a JSONL task collection, HELD_OUT marked held out."""
    import json

    lines = [json.dumps({"name": name, "descriptions": list(descs), "examples": [{"input": w, "output": fn(w)} for w in WORDS],
                         **({"held_out": True} if name == HELD_OUT else {})}) for name, descs, fn in TASKS]
    path.write_text("\n".join(lines) + "\n")


def wait_until(predicate, timeout_s: float, every_s: float = 0.05):
    """Poll `predicate` until it returns something truthy, and return that; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{getattr(predicate, '__name__', predicate)} not true within {timeout_s} s")
        time.sleep(every_s)


async def until(predicate, timeout_s: float, every_s: float = 0.01):
    """wait_until on the event loop: `predicate` may be a plain or an async function; the loop runs between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{getattr(predicate, '__name__', predicate)} not true within {timeout_s} s")
        await asyncio.sleep(every_s)


# ---- tiny Hugging Face bases: tokenizers trained on the task texts, sizes for random models ----

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            max_position_embeddings=256)  # GQA: v_proj is 32→16, q_proj 32→32


def tokenizer_corpus() -> list[str]:
    return ([d for _, ds, _ in TASKS for d in ds] + [f"Input: {w}\nOutput: {fn(w)}" for _, _, fn in TASKS for w in WORDS]
            + ["user assistant"] * 5)


def llama_tokenizer(chat_template: str | None = None):
    """A SentencePiece-style BPE that puts BOS itself; a chat template only when given one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                           show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=chat_template)


def qwen_tokenizer():
    """A byte-level BPE with a ChatML chat template, as Qwen2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)
