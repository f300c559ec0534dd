"""Prompt formats: how a task's (input, output) examples become token ids for a base model's tokenizer.

Every trainer and evaluation use one interface, `PromptFormat`:
    sequence(pairs, instruction)   ids and completion mask of one training sequence: True on answer tokens only
    prompt(x, instruction)         ids of a decoding prompt (the same tokens a training sequence has there)
    answer(ids)                    generated ids, cut before the first stop id → the answer text
    canonical(text)                what exact match compares
A closed set of formats, one class each:
    Spaced  the loragen demo layout: `<s>{instruction}\\nIn: {x}\\nOut: {y}\\n`, data one character per token
    Plain   a template string with {input} (and optionally {instruction}); the output follows, then EOS
    Chat    the tokenizer's chat template: user = instruction + input, assistant = output
`prompt_format(template, tokenizer, demo_base=...)` picks one from what `--template` says: 'spaced', 'chat',
a template string, or 'auto' (the default): spaced for a base written by `loragen train base` (see
basemodel.is_demo_base), else chat if the tokenizer has a chat template, else DEFAULT_TEMPLATE.

Short names in shape comments: B sequences in a batch, T tokens of the longest.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from generator.errors import InputError

DEFAULT_TEMPLATE = "{instruction}\nInput: {input}\nOutput: "  # plain format of a base without a chat template
FIELDS = ("input", "instruction")
Pairs = Sequence[tuple[str, str]]


class PromptFormat(ABC):
    """One way to write examples for one tokenizer. `pad_id` fills batches; `stop_ids` end decoding."""

    name: str
    tokenizer: object
    pad_id: int
    stop_ids: frozenset[int]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @abstractmethod
    def sequence(self, pairs: Pairs, instruction: str | None = None) -> tuple[list[int], list[bool]]:
        """ids and completion mask of one training sequence holding every pair, the instruction once."""

    @abstractmethod
    def prompt(self, x: str, instruction: str | None = None) -> list[int]:
        """ids after which the model writes the answer to `x`."""

    @abstractmethod
    def answer(self, ids: Sequence[int]) -> str:
        """The text of generated ids (already cut before the first stop id)."""

    @staticmethod
    def canonical(text: str) -> str:
        return text.strip()

    def batch(self, seqs: Sequence[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, T), completion mask (B, T) and attention mask (B, T) of training sequences."""
        t = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.bool)
        attention = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, (s, m) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(m)] = torch.tensor(m)
            attention[i, : len(s)] = 1
        return ids, mask, attention


# --- spaced: the demo layout ---------------------------------------------------------------------------
def spaced(data: str) -> str:
    """Task data one character per token: every character its own pre-token."""
    return " ".join(data.replace(" ", ""))


def spaced_prompt(x: str, instruction: str | None = None) -> str:
    return (f"{instruction}\n" if instruction else "") + f"In: {spaced(x)}\nOut: "


class Spaced(PromptFormat):
    """The loragen demo layout (see generator/train/basemodel.py): the instruction on its own line, then
    `In: {x}\\nOut: {y}\\n` per pair with data spaced one character per token; the loss is on each `{y}\\n`;
    decoding stops at the newline (or EOS) and the answer is its tokens joined."""

    name = "spaced"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.newline = tokenizer.convert_tokens_to_ids("\n")
        self.bos = tokenizer.bos_token_id
        if self.bos is None or self.newline in (None, tokenizer.unk_token_id):
            raise InputError("the spaced format is the loragen demo layout: it needs a tokenizer with a BOS token and "
                             "a newline token (the demo base's); use --template chat or a template string with {input}")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = frozenset({self.newline, tokenizer.eos_token_id})

    def sequence(self, pairs: Pairs, instruction: str | None = None) -> tuple[list[int], list[bool]]:
        ids, mask = [self.bos], [False]
        if instruction:
            head = self.encode(instruction + "\n")
            ids += head
            mask += [False] * len(head)
        for x, y in pairs:
            p, c = self.encode(f"In: {spaced(x)}\nOut: "), self.encode(spaced(y) + "\n")
            ids += p + c
            mask += [False] * len(p) + [True] * len(c)
        return ids, mask

    def prompt(self, x: str, instruction: str | None = None) -> list[int]:
        return [self.bos] + self.encode(spaced_prompt(x, instruction))

    def answer(self, ids: Sequence[int]) -> str:
        return "".join(self.tokenizer.convert_ids_to_tokens(list(ids)))

    @staticmethod
    def canonical(text: str) -> str:
        """The characters, without the spacing between tokens."""
        return text.replace(" ", "")


# --- plain: a template string --------------------------------------------------------------------------
def template_fields(template: str) -> set[str]:
    """The fields of a valid plain template: {input} at least once, optionally {instruction}, nothing else."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise InputError(f"template {template!r} is not a format string ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted({f for f in fields if f not in FIELDS})
    if unknown:
        raise InputError(f"template {template!r} has unknown fields {unknown}; a template may use {{input}} and "
                         "{instruction} only (write literal braces as {{ and }})")
    if "input" not in fields:
        raise InputError(f"template {template!r} has no {{input}} field; write where the input goes, e.g. "
                         f"{DEFAULT_TEMPLATE!r}")
    return set(fields)


class Plain(PromptFormat):
    """A template string; the output follows it, ended by the tokenizer's EOS, in the tokenizer's own
    tokenisation. Without an instruction, {instruction} is empty and the prompt's leading whitespace is
    dropped; a template without {instruction} gets the instruction on a line of its own before it. Pairs
    follow one another; the instruction goes with the first. A sequence starts with whatever the tokenizer
    itself puts before a text (e.g. Llama's BOS)."""

    name = "plain"

    def __init__(self, tokenizer, template: str = DEFAULT_TEMPLATE):
        self.tokenizer = tokenizer
        self.template = template
        self.has_instruction = "instruction" in template_fields(template)
        if tokenizer.eos_token_id is None:
            raise InputError("the plain format ends each output with the tokenizer's EOS token, and this tokenizer has "
                             "none; set one (tokenizer.eos_token = ...) and save it with the base model")
        self.eos = tokenizer.eos_token_id
        self.head = _tokenizer_prefix(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.stop_ids = frozenset({self.eos})

    def render(self, x: str, instruction: str | None = None) -> str:
        if self.has_instruction:
            text = self.template.format(input=x, instruction=instruction or "")
            return text if instruction else text.lstrip()
        return (f"{instruction}\n" if instruction else "") + self.template.format(input=x)

    def sequence(self, pairs: Pairs, instruction: str | None = None) -> tuple[list[int], list[bool]]:
        ids, mask = list(self.head), [False] * len(self.head)
        for k, (x, y) in enumerate(pairs):
            p, c = self.encode(self.render(x, instruction if k == 0 else None)), self.encode(y) + [self.eos]
            ids += p + c
            mask += [False] * len(p) + [True] * len(c)
        return ids, mask

    def prompt(self, x: str, instruction: str | None = None) -> list[int]:
        return self.head + self.encode(self.render(x, instruction))

    def answer(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _tokenizer_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (e.g. Llama's BOS), found by encoding one."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


# --- chat: the tokenizer's chat template ---------------------------------------------------------------
class Chat(PromptFormat):
    """The tokenizer's chat template. Each pair is a user turn (the instruction, if any, on the first, then
    the input) and an assistant turn (the output). A conversation is rendered one turn at a time, and each
    turn's text must extend the one before (true of the usual templates): the text a turn adds after the
    generation prompt is the assistant's, up to its end-of-turn token; the loss is on those tokens only.
    Decoding stops at EOS or the special token that ends an assistant turn."""

    name = "chat"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'the base')} has no chat template; "
                             "give --template a template string with {input} instead (or 'auto')")
        self.tokenizer = tokenizer
        probe_answer = "1"
        _, completion = self._turns([("0", probe_answer)], None)[0]
        after = completion[completion.rfind(probe_answer) + len(probe_answer):]
        special = set(tokenizer.all_special_ids)
        ends = [i for i in self.encode(after) if i in special]
        stops = {tokenizer.eos_token_id, *ends[:1]} - {None}
        if not stops:
            raise InputError("the chat template ends an assistant turn with no special token and the tokenizer has no "
                             "EOS token, so decoding could not stop; give --template a template string instead")
        self.stop_ids = frozenset(stops)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:  # a template's own raise_exception too (e.g. on roles it refuses)
            raise InputError(f"the tokenizer's chat template failed on a user/assistant conversation "
                             f"({type(e).__name__}: {e}); give --template a template string instead") from None

    @staticmethod
    def _user(x: str, instruction: str | None) -> dict:
        return {"role": "user", "content": f"{instruction}\n{x}" if instruction else x}

    def _turns(self, pairs: Pairs, instruction: str | None) -> list[tuple[str, str]]:
        """(prompt text, completion text) per pair: consecutive pieces of the rendered conversation. The
        whitespace after an assistant's end-of-turn goes to the next prompt (no loss on it)."""
        messages, done, out = [], "", []
        for k, (x, y) in enumerate(pairs):
            messages.append(self._user(x, instruction if k == 0 else None))
            asked = self._render(messages, True)
            messages.append({"role": "assistant", "content": y})
            answered = self._render(messages, False)
            if not asked.startswith(done) or not answered.startswith(asked):
                raise InputError("the tokenizer's chat template does not render a conversation by appending turns, so "
                                 "the assistant's tokens cannot be told apart; give --template a template string instead")
            completion = answered[len(asked):].rstrip()
            out.append((asked[len(done):], completion))
            done = asked + completion
        return out

    def sequence(self, pairs: Pairs, instruction: str | None = None) -> tuple[list[int], list[bool]]:
        ids, mask = [], []
        for p_text, c_text in self._turns(pairs, instruction):
            p, c = self.encode(p_text), self.encode(c_text)
            ids += p + c
            mask += [False] * len(p) + [True] * len(c)
        return ids, mask

    def prompt(self, x: str, instruction: str | None = None) -> list[int]:
        return self.encode(self._render([self._user(x, instruction)], True))

    def answer(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def prompt_format(template: str, tokenizer, *, demo_base: bool = False) -> PromptFormat:
    """The format `--template` names: 'auto', 'spaced', 'chat' or a template string (the module docstring says how).
    `demo_base`: the base was written by `loragen train base` (auto picks the spaced layout for it)."""
    if template == "auto":
        if demo_base:
            return Spaced(tokenizer)
        return Chat(tokenizer) if getattr(tokenizer, "chat_template", None) else Plain(tokenizer)
    if template == "spaced":
        return Spaced(tokenizer)
    if template == "chat":
        return Chat(tokenizer)
    return Plain(tokenizer, template)


def check_template_flag(template: str) -> None:
    """Reject a bad --template before any model is loaded (the named formats are checked against the tokenizer)."""
    if template not in ("auto", "spaced", "chat"):
        template_fields(template)


# --- training loss and greedy decoding -----------------------------------------------------------------
def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens only. ids, mask, attention: (B, T)."""
    return _completion_ce(model(input_ids=ids, attention_mask=attention).logits, ids, mask)


def _completion_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (mean, or with reduction="sum" the sum) of each next token where `mask` marks it a
    completion token. logits: (B, T, vocab)."""
    target = mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][target], ids[:, 1:][target], reduction=reduction)


# --- length buckets: a batch in a few forward passes of similar-length sequences ---------------------------
def length_buckets(lengths: Sequence[int], k: int) -> list[list[int]]:
    """The indices of `lengths` in at most `k` groups of consecutive lengths (sorted), chosen to minimise the
    tokens of the groups padded to their longest: a batch whose sequences differ in length is computed in
    k passes with little padding instead of one pass padded to its longest."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, ls = len(order), [lengths[i] for i in order]
    k = min(k, n)
    # cost[j][e]: fewest padded tokens of the first e sorted sequences in j groups; cut[j][e]: where the last starts
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for j in range(1, k + 1):
        for e in range(1, n + 1):
            for s in range(j - 1, e):
                c = cost[j - 1][s] + (e - s) * ls[e - 1]
                if c < cost[j][e]:
                    cost[j][e], cut[j][e] = c, s
    j = min(range(1, k + 1), key=lambda j: (cost[j][n], j))  # ties: fewer passes
    groups, e = [], n
    while j:
        s = cut[j][e]
        groups.append(order[s:e])
        e, j = s, j - 1
    return groups[::-1]


def bucketed_completion_loss(model, fmt: PromptFormat, seqs: Sequence[tuple[list[int], list[bool]]], k: int,
                             within: Callable[[list[int]], AbstractContextManager] | None = None) -> torch.Tensor:
    """`completion_loss` of `fmt.batch(seqs)`, computed in up to `k` length buckets (`length_buckets`): the same
    mean over every completion token of the batch, from less padding. `within(indices)`, if given, is entered
    around each bucket's forward pass (a per-sample adapter sliced to the bucket's samples)."""
    total, count = None, 0
    for idx in length_buckets([len(ids) for ids, _ in seqs], k):
        ids, mask, attention = fmt.batch([seqs[i] for i in idx])
        with within(idx) if within else nullcontext():
            logits = model(input_ids=ids, attention_mask=attention).logits
        nll = _completion_ce(logits, ids, mask, reduction="sum")
        total = nll if total is None else total + nll
        count += int(mask[:, 1:].sum())
    if not count:
        raise ValueError("the batch has no completion token")
    return total / count


# --- packed batches: several short sequences per row ------------------------------------------------------
PACK_TOKENS = 64  # a packed row's length when every sequence is shorter


class Packed(NamedTuple):
    """A batch of training sequences laid end to end, several to a row (`pack`). R rows, T tokens each."""

    ids: torch.Tensor  # (R, T)
    mask: torch.Tensor  # (R, T) completion tokens
    positions: torch.Tensor  # (R, T) restarting at 0 with every sequence
    seq: torch.Tensor  # (R, T) which input sequence each token is of; -1 on padding


def pack(seqs: Sequence[tuple[list[int], list[bool]]], pad_id: int, cap: int = PACK_TOKENS) -> Packed:
    """Training sequences laid end to end in R ≤ B rows of at most max(cap, longest) tokens (first fit,
    longest first). Positions restart at 0 with every sequence, which is how a transformers decoder is told
    where one ends (with no attention mask, it lets each token attend to its own sequence only); a row's
    padding is a sequence of its own. Short sequences padded to the longest of a batch waste a third of the
    compute of the demo base's pretraining."""
    cap = max(cap, *(len(ids) for ids, _ in seqs))
    rows: list[list[int]] = []  # sequence indices per row
    used: list[int] = []  # tokens per row
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0])
        r = next((r for r, u in enumerate(used) if u + n <= cap), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    t = max(used)
    out = Packed(torch.full((len(rows), t), pad_id, dtype=torch.long), torch.zeros((len(rows), t), dtype=torch.bool),
                 torch.zeros((len(rows), t), dtype=torch.long), torch.full((len(rows), t), -1, dtype=torch.long))
    for r, members in enumerate(rows):
        a = 0
        for i in members:
            ids, m = seqs[i]
            out.ids[r, a:a + len(ids)] = torch.tensor(ids)
            out.mask[r, a:a + len(m)] = torch.tensor(m, dtype=torch.bool)
            out.positions[r, a:a + len(ids)] = torch.arange(len(ids))
            out.seq[r, a:a + len(ids)] = i
            a += len(ids)
        out.positions[r, a:] = torch.arange(t - a)
    return out


def packed_logits(model, batch: Packed) -> torch.Tensor:
    """Logits (R, T, vocab) of a packed batch: each sequence's own, as if it were alone."""
    return model(input_ids=batch.ids, position_ids=batch.positions, use_cache=False).logits


def packed_loss(model, batch: Packed) -> torch.Tensor:
    """`completion_loss` of a batch from `pack`: the same value as over the sequences padded one per row."""
    return _completion_ce(packed_logits(model, batch), batch.ids, batch.mask)


@torch.no_grad()
def honours_packing(model, pad_id: int) -> bool:
    """Whether `model` keeps packed sequences apart: the logits of a sequence packed after another equal its
    logits alone. Trainers pack only then (an architecture that ignores restarting positions would let
    sequences attend to each other), and fall back to one sequence per padded row otherwise."""
    vocab = model.get_input_embeddings().num_embeddings
    first, second = [(7 * i + 3) % vocab for i in range(7)], [(11 * i + 5) % vocab for i in range(5)]
    alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    together = packed_logits(model, pack([(first, [False] * 7), (second, [False] * 5)], pad_id, cap=12))[0, 7:]
    return bool(torch.allclose(alone, together, atol=1e-4, rtol=1e-4))


@torch.no_grad()
def decode_greedy(model, rows: Sequence[list[int]], *, pad_id: int, stop_ids: frozenset[int], max_new: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch of prompt ids (KV cache), each cut before its first stop id.
    Any forward hooks on the model (a functional LoRA) see the batch in this order."""
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        att[i, t - len(r):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache_kw = _cache_kwarg(model)
    stops = torch.tensor(sorted(stop_ids))
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    gen, done = [], torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new):
        gen.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        past = getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, use_cache=True, **{cache_kw: past})
        nxt = out.logits[:, -1].argmax(-1)
    cut = []
    for row in torch.stack(gen, dim=1).tolist():  # (B, generated)
        ends = [i for i, v in enumerate(row) if v in stop_ids]
        cut.append(row[: ends[0]] if ends else row)
    return cut


def answers(model, fmt: PromptFormat, inputs: Sequence[str], instruction: str | None = None, max_new: int = 32) -> list[str]:
    """Greedy answers of the model to `inputs`, written in `fmt`."""
    rows = [fmt.prompt(x, instruction) for x in inputs]
    return [fmt.answer(g) for g in decode_greedy(model, rows, pad_id=fmt.pad_id, stop_ids=fmt.stop_ids, max_new=max_new)]


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed past_key_values to cache; older releases know only the former."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes kwargs on
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"
