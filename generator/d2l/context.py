"""The context encoder of Doc-to-LoRA: a document → chat-template tokens → chunks → the base model's
per-layer activations.

    document ─► chat template (empty system turn, the document as the user turn, generation prompt) ─► ids (T,)
             ─► chunks of about `chunk_tokens` tokens, each wrapped in the template's prefix and suffix
             ─► the base model without its last decoder layer: the input of every layer l < L - 1, and the
                final norm of layer L - 2's output for l = L - 1 ─► activations (n, L, S, H), mask (n, S)

The prefix and suffix are derived from the tokenizer's own chat template (a document rendered twice with two
different contents: the token ids both renderings share at the start and at the end), so any chat model works
without a table of model names. The base model's weights are shared with whatever else holds it (scoring,
applying adapters): reading runs its decoder with the last layer left out, through a shallow view that never
changes the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from generator.errors import InputError

# two documents that differ in their first and last characters: what the two renderings share is the template's
_PROBES = ("a0 probe z", "b1 probe y")


@dataclass(frozen=True)
class Affixes:
    """Token ids the chat template puts before and after a document's content."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def render(tokenizer, document: str) -> str:
    """The document as the reference's context: an empty system turn, the document (stripped) as the user turn,
    and the generation prompt. A template that refuses a system turn (Gemma's: "System role not supported";
    Mistral's: "Conversation roles must alternate") gets the user turn alone."""
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": document.strip()}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja's TemplateError, raised by the template's own raise_exception(...)
        pass
    try:
        return tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise InputError(f"the base model's chat template cannot render a document as a user turn: {e}") from None


def tokenize(tokenizer, document: str) -> list[int]:
    """The rendered document's token ids, the template's special tokens included, nothing added."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the base model's tokenizer has no chat template; Doc-to-LoRA reads documents as a chat "
                         "turn, so give a base model whose tokenizer_config.json holds one")
    return list(tokenizer(render(tokenizer, document), add_special_tokens=False)["input_ids"])


def affixes(tokenizer) -> Affixes:
    """The template's prefix and suffix ids: the longest common start and end of two probe renderings."""
    a, b = (tokenize(tokenizer, p) for p in _PROBES)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    k = 0
    while k < min(len(a), len(b)) - n and a[-1 - k] == b[-1 - k]:
        k += 1
    return Affixes(tuple(a[:n]), tuple(a[len(a) - k :]))


def chunk(ids: Sequence[int], chunk_tokens: int, aff: Affixes) -> list[list[int]]:
    """The reference's split of a long context: none when `chunk_tokens` <= 0 or the ids fit one chunk; else
    n = ceil(T / c) pieces of s = ceil(T / n) tokens, the first given the suffix, the last the prefix, every
    middle one both, so each chunk reads as a complete context. Works on ids: a cut may fall inside a character."""
    t = len(ids)
    if chunk_tokens <= 0 or math.ceil(t / chunk_tokens) <= 1:
        return [list(ids)]
    n = math.ceil(t / chunk_tokens)
    s = math.ceil(t / n)
    pieces = [list(ids[i : i + s]) for i in range(0, t, s)]
    last = len(pieces) - 1
    return [(list(aff.prefix) if i > 0 else []) + p + (list(aff.suffix) if i < last else [])
            for i, p in enumerate(pieces)]


def pad(chunks: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (n, S) and attention mask (n, S) of a batch of chunks."""
    s = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), s), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


class _Stop(Exception):
    """Raised by the hook on the last decoder layer: its input is all the reader needs."""


class ContextEncoder:
    """Reads a batch of chunks with the base model and returns the activations that feed the hypernetwork.

    `decoder` is the base's decoder stack (`model.model` of a transformers causal LM: embeddings, `layers`,
    final `norm`). Entry l < L - 1 of the result is the input of layer l (entry 0 the embedding output, scaled
    as the model scales it); entry L - 1 is the final norm applied to the input of the last layer, i.e. what the
    model truncated to L - 1 layers returns. The last layer itself never runs."""

    def __init__(self, decoder: nn.Module):
        if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
            raise InputError(f"{type(decoder).__name__} has no `layers` and `norm`: Doc-to-LoRA reads decoder-only "
                             "transformers models such as Qwen3, Gemma 2, Llama and Mistral")
        self.decoder = decoder
        self.n_layers = len(decoder.layers)
        # a view of the decoder without its last layer, sharing every weight with it
        view = copy.copy(decoder)
        view._modules = dict(decoder._modules)
        view.layers = nn.ModuleList(list(decoder.layers)[:-1])
        self._view = view

    @torch.no_grad()  # not inference_mode: training reads activations as constants of the hypernetwork's graph
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (n, S) → activations (n, L, S, H) in the model's dtype."""
        inputs: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self._view.layers]
        try:
            out = self._view(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if len(inputs) != self.n_layers - 1:
            raise RuntimeError(f"captured {len(inputs)} layer inputs from a {self.n_layers}-layer model")
        return torch.stack([*inputs, last], dim=1)  # (n, L, S, H)
