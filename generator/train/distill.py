"""Context distillation of the base-reading kind (Doc-to-LoRA): train a D2L hypernetwork so that the base model
with the adapter it generates from a task's description, and no instruction in the prompt, answers as the base
model does with the description in its prompt.

    teacher   the frozen base, prompt = instruction + example input        (no adapter; no gradient)
    student   the frozen base + LoRA(D2L(base activations of the text)), prompt = example input alone
    loss      KL(teacher || student) over the full vocabulary at every completion token, mean over tokens,
              plus `ce_weight` times the student's cross-entropy on the answers

The text the student's adapter is generated from is a training description of the task (or, with probability
`document_share`, a training document); the teacher's instruction is the same text (`teacher="description"`,
context distillation proper) or the task's program where the suite has one (`teacher="program"`). Neither needs
an oracle LoRA per task. Held-out tasks never reach a step: only `suite.seen` is drawn.

The network starts as the reference initialises it: the B side of every generated LoRA (`scaler_B`) and the bias
LoRA's B at zero, so training starts from the base model's own behaviour.

Short names in shape comments: n samples of a step, T tokens of the longest sequence, V vocabulary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from generator.checkpoint import Checkpoint
from generator.config import modules_for_base
from generator.d2l import context
from generator.d2l.config import D2LConfig, PerceiverSpec
from generator.d2l.hypernet import D2LHypernet, PerLayerLinear
from generator.errors import InputError
from generator.train.basemodel import load_base
from generator.train.functional import FunctionalLora
from generator.train.loop import LoopConfig, train_loop
from generator.train.prompting import PromptFormat
from generator.train.suite import Suite

TEACHERS = ("description", "program")


def d2l_config(base_dir: str | Path, *, base_model: str | None = None, modules: Sequence[str] = ("down_proj",),
               r: int = 8, latent: int = 128, latent_queries: int = 8, blocks: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 32, pre_head_layers: int = 1, chunk_tokens: int = 0) -> D2LConfig:
    """A D2L architecture for the base model in `base_dir` (its layer count, hidden size and module sizes read
    from its config.json). The Perceiver's attention here is sized to the latent, not the reference's fixed 16
    heads of 128, which would dwarf a small base; lora_alpha is the reference's 2 r^1.5."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(base_dir))
    except Exception as e:  # no config.json, unknown model type
        raise InputError(f"base model {base_dir}: {' '.join(str(e).split())[:200]}") from None
    specs = tuple(sorted(modules_for_base(cfg, list(modules)), key=lambda m: m.name))
    return D2LConfig(base_model=base_model or _base_id(base_dir, cfg), n_layers=cfg.num_hidden_layers,
                     hidden=cfg.hidden_size, modules=specs, r=r, lora_alpha=2 * r**1.5, latent=latent,
                     pre_head_layers=pre_head_layers, chunk_tokens=chunk_tokens,
                     perceiver=PerceiverSpec(latent_queries=latent_queries, blocks=blocks, heads=heads, kv_heads=kv_heads,
                                             head_dim=head_dim))


def _base_id(base_dir: str | Path, cfg) -> str:
    name = getattr(cfg, "_name_or_path", "") or ""
    return name if name and not name.startswith(("/", ".", "~")) else str(base_dir)


def init_for_training(net: D2LHypernet, seed: int) -> None:
    """The reference's starting point: latent queries N(0, 1), per-layer and head weights scaled by their fan-in,
    bias A N(0, 0.2 / sqrt(d_in r)); scaler A one; scaler B and bias B zero, so every adapter starts as a no-op."""
    g = torch.Generator().manual_seed(seed)
    c = net.config
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("latents_q"):
                p.copy_(torch.randn(p.shape, generator=g))
        for mod in net.modules():
            if isinstance(mod, PerLayerLinear):
                bound = 1 / math.sqrt(mod.weight.shape[1])
                mod.weight.copy_(torch.empty(mod.weight.shape).uniform_(-bound, bound, generator=g))
                mod.bias.zero_()
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=g) / math.sqrt(c.latent))
        for m in c.modules:
            if c.use_bias:
                net.bias_A[m.name].copy_(torch.randn(c.n_layers, c.r, m.d_in, generator=g) * 0.2 / math.sqrt(m.d_in * c.r))
                net.bias_B[m.name].zero_()
            net.scaler_A[m.name].fill_(1.0)
            net.scaler_B[m.name].zero_()


class Reader(nn.Module):
    """The trainable hypernetwork with the frozen base's context encoder: texts → per-sample adapters in
    FunctionalLora's layout {module: (A (n, L, R, d_in), B (n, L, d_out, R))}, R the largest combined rank of
    the batch (a text of fewer chunks is zero-padded, which adds nothing)."""

    def __init__(self, net: D2LHypernet, model, tokenizer):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.encoder = context.ContextEncoder(model.get_decoder())
        self.affixes = context.affixes(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def adapters(self, texts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        c = self.net.config
        per_text = [context.chunk(context.tokenize(self.tokenizer, t), c.chunk_tokens, self.affixes) for t in texts]
        ids, mask = context.pad([ch for chunks in per_text for ch in chunks], self.pad_id)
        loras = self.net(self.encoder(ids, mask), mask)  # {module: (A (chunks, L, r, d_in), B (chunks, L, r, d_out))}
        rank = max(c.combined_rank(len(chunks)) for chunks in per_text)
        out: dict[str, tuple[list, list]] = {m.name: ([], []) for m in c.modules}
        for combined in self.net.combine_each(loras, [len(chunks) for chunks in per_text]):
            for m, (a, b) in combined.items():  # (L, R_i, d_in), (L, R_i, d_out)
                pad = rank - a.shape[1]
                out[m][0].append(F.pad(a, (0, 0, 0, pad)))
                out[m][1].append(F.pad(b, (0, 0, 0, pad)).transpose(1, 2))  # (L, d_out, R): PEFT's lora_B layout
        return {m: (torch.stack(a), torch.stack(b)) for m, (a, b) in out.items()}


def draw(suite: Suite, fmt: PromptFormat, rng: random.Random, *, batch_size: int, teacher: str,
         document_share: float) -> tuple[list[str], list[tuple[list[int], list[bool]]], list[tuple[list[int], list[bool]]]]:
    """One step's samples: the text each adapter is made from, the student's sequences (the example alone) and the
    teacher's (the same example after the instruction)."""
    texts, student, teacher_seqs = [], [], []
    for _ in range(batch_size):
        t = rng.choice(suite.seen)
        docs = suite.train_documents.get(t)
        text = rng.choice(docs if docs and rng.random() < document_share else suite.train_descriptions[t])
        instruction = rng.choice(suite.instructions[t]) if teacher == "program" and suite.instructions.get(t) else text
        pair = [rng.choice(suite.train_examples[t])]
        texts.append(text)
        student.append(fmt.sequence(pair))
        teacher_seqs.append(fmt.sequence(pair, instruction))
    return texts, student, teacher_seqs


def completion_logits(model, fmt: PromptFormat, seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each completion token, (tokens, V), in sample order, and those tokens' ids."""
    ids, mask, attention = fmt.batch(seqs)
    logits = model(input_ids=ids, attention_mask=attention).logits  # (n, T, V)
    target = mask[:, 1:]
    return logits[:, :-1][target], ids[:, 1:][target]


def distill_loss(model, fmt: PromptFormat, lora: FunctionalLora, reader: Reader, texts, student, teacher_seqs,
                 ce_weight: float) -> torch.Tensor:
    with torch.no_grad():
        t_logits, t_ids = completion_logits(model, fmt, teacher_seqs)
    with lora.use(reader.adapters(texts)):
        s_logits, s_ids = completion_logits(model, fmt, student)
    if not torch.equal(t_ids, s_ids):  # both hold the same answers; a format that tokenises them apart cannot distil
        raise InputError("the teacher's and the student's answer tokens differ: this prompt format writes an answer "
                         "differently after an instruction; choose another --template")
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1), log_target=True,
                  reduction="batchmean")
    return kl + ce_weight * F.cross_entropy(s_logits.float(), s_ids) if ce_weight else kl


def train_distill(config: D2LConfig, suite: Suite, base_dir: str | Path, out_dir: str | Path, cfg: LoopConfig, *,
                  batch_size: int = 16, teacher: str = "description", ce_weight: float = 0.0,
                  document_share: float = 0.0, template: str = "auto") -> dict:
    """Train a D2L hypernetwork for the base in `base_dir` on the suite's seen tasks; writes a native D2L checkpoint
    into `out_dir` (with train_log.json and loss.png) and returns the log."""
    if teacher not in TEACHERS:
        raise InputError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    if ce_weight < 0 or not 0 <= document_share <= 1:
        raise InputError(f"ce_weight must be at least 0 and document_share within 0..1, got {ce_weight}, {document_share}")
    model, fmt = load_base(base_dir, template)
    if not getattr(fmt.tokenizer, "chat_template", None):
        raise InputError(f"base model {base_dir}: its tokenizer has no chat template; the base-reading kind reads a text "
                         "as a chat turn, so give a base whose tokenizer_config.json holds one")
    torch.manual_seed(cfg.seed)
    net = D2LHypernet(config)
    init_for_training(net, cfg.seed)
    reader = Reader(net, model, fmt.tokenizer)
    lora = FunctionalLora(model, config.target_modules, config.lora_alpha)

    def loss_at(step, rng):
        texts, student, teacher_seqs = draw(suite, fmt, rng, batch_size=batch_size, teacher=teacher,
                                            document_share=document_share)
        return distill_loss(model, fmt, lora, reader, texts, student, teacher_seqs, ce_weight)

    try:
        log = train_loop(net, loss_at, cfg, out_dir, name="D2L context distillation",
                         extra_log={"tasks": suite.seen, "teacher": teacher, "ce_weight": ce_weight,
                                    "document_share": document_share, "batch_size": batch_size,
                                    "prompt_format": fmt.name, "base_model": config.base_model})
    finally:
        lora.remove()
    Checkpoint.from_module(net, source=str(out_dir)).save(out_dir)
    return log
