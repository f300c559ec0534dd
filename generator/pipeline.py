"""Inputs → LoRA adapters: a checkpoint's hypernetwork plus, when texts are given, its task encoder.

    texts ─► TaskEncoder ─► (B, E) ─┐
    embeddings (already preprocessed)┴► HyperLoRA ─► {module: A (B, N, r, d_in), B (B, N, d_out, r)}
                                                   ─► one LoraAdapter per input

A reader checkpoint (config.reader set) is conditioned on token states instead, so it takes texts only:

    texts ─► TaskEncoder.token_states ─► (B, T, E) + mask (B, T) ─► HyperLoRA.forward_tokens ─► ...

A ready embedding is refused for it with an InputError (a pooled vector cannot stand in for token states).

One call is one batch. In bfloat16 compute the encoder and the hypernetwork each run once for all inputs. In
float32 (the exact default) the hypernetwork runs once for the batch in its exact form (`HyperLoRA`'s
`exact=True`: every input's matrix products its own, with fixed shapes) and each text is encoded alone, so an
adapter's bytes never depend on what it was batched with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generator import __version__
from generator.adapter import LoraAdapter, parse_dtype
from generator.checkpoint import Checkpoint, load_checkpoint
from generator.encoder import TaskEncoder, TokenStates
from generator.errors import InputError

KINDS = ("task", "document", "embedding")
# CPU instructions for bfloat16 arithmetic (/proc/cpuinfo): x86 AVX512_BF16 or AMX-BF16, Arm BF16
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskInput:
    """One request: a task description, a document, or a ready task embedding (a tuple of E floats)."""

    kind: str
    text: str = ""
    embedding: tuple[float, ...] = ()

    @classmethod
    def task(cls, text: str) -> TaskInput:
        return cls("task", text=_clean(text, "task description"))

    @classmethod
    def document(cls, text: str) -> TaskInput:
        return cls("document", text=_clean(text, "document"))

    @classmethod
    def from_embedding(cls, values: Sequence[float] | torch.Tensor) -> TaskInput:
        t = torch.as_tensor(values, dtype=torch.float32) if not isinstance(values, torch.Tensor) else values.float()
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1 or t.numel() == 0:
            raise InputError(f"an embedding must have shape [E] or [1, E], got {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise InputError("the embedding holds NaN or infinite values")
        return cls("embedding", embedding=tuple(t.tolist()))

    def digest(self) -> str:
        """sha256 of the normalised input: what the adapter was generated from."""
        if self.kind == "embedding":
            payload = torch.tensor(self.embedding, dtype=torch.float32).numpy().tobytes()
            return hashlib.sha256(b"embedding:" + payload).hexdigest()
        return hashlib.sha256(json.dumps([self.kind, self.text]).encode()).hexdigest()


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text")
    text = text.strip()
    if not text:
        raise InputError(f"the {what} is empty; describe the task in words")
    return text


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU (or the given /proc/cpuinfo text) has bfloat16 instructions; None where unknown (no
    /proc/cpuinfo). Without them torch emulates bfloat16 matmuls: the forward at the Mistral dims ran 4.5-5.7x
    slower than in float32 on an AVX2-only AMD EPYC, and 3.5-3.8x faster on a Zen 4 with AVX512_BF16 (docs/performance.md)."""
    text = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    flags = {f for line in text.splitlines() if line.partition(":")[0].strip() in ("flags", "Features")
             for f in line.partition(":")[2].split()}
    return bool(flags & BF16_CPU_FLAGS) if flags else None


@functools.cache
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


class LoraGenerator:
    """A loaded checkpoint ready to generate: hypernetwork on `device` in `compute_dtype`; the task encoder
    is loaded on first use, so generation from embeddings never needs it."""

    # float32 (batch-invariant) generation batches through the exact forward. False: each input runs as its own
    # plain forward pass, one after another, the way float32 generated before the exact forward existed; kept
    # so that the benchmarks can measure both in one run (python -m benchmarks --sections batching)
    exact_batching: bool = True

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.trust_remote_code = trust_remote_code
        self.net = checkpoint.build(self.device, compute_dtype)
        self._encoder: TaskEncoder | None = None
        # float32 is the exact mode: an adapter's bytes must not depend on what it was batched with, and
        # CPU/GPU matrix kernels choose their blocking (so their rounding) by the number of rows. So float32
        # runs the hypernetwork's exact batched forward and encodes each text alone; bfloat16 batches the
        # plain math for speed.
        self.batch_invariant = compute_dtype == torch.float32
        if self.device.type == "cpu" and compute_dtype == torch.bfloat16 and cpu_has_native_bfloat16() is False:
            log.warning("bfloat16 compute on this CPU is emulated (it has no AVX512_BF16, AMX-BF16 or Arm BF16 "
                        "instructions): several times slower than float32 compute, which is the faster choice here")

    @classmethod
    def load(cls, source: str | Path, *, module_order: Sequence[str] | None = None, base_model: str | None = None,
             **kwargs) -> LoraGenerator:
        return cls(load_checkpoint(source, module_order=module_order, base_model=base_model), **kwargs)

    @property
    def encoder(self) -> TaskEncoder:
        if self._encoder is None:
            self._encoder = TaskEncoder.load(self.config.encoder, device=self.device,
                                             trust_remote_code=self.trust_remote_code)
        return self._encoder

    def check_input(self, item: TaskInput) -> None:
        """InputError if this checkpoint cannot take `item` (a wrong-sized embedding, or an embedding at all
        for a reader checkpoint): what a caller checks before queueing work."""
        if item.kind != "embedding":
            return
        if self.config.reader is not None:
            raise InputError("this checkpoint reads the token states of a text (it has a token reader), so a ready "
                             "embedding cannot condition it; send the task description or document as text instead")
        if len(item.embedding) != self.config.task_emb_dim:
            raise InputError(f"the embedding has {len(item.embedding)} values; this checkpoint takes {self.config.task_emb_dim}")

    def embed(self, inputs: Sequence[TaskInput], alone: bool = False) -> torch.Tensor:
        """(B, E) float32 task embeddings; texts are encoded in one batch, or each on its own (`alone`: a
        text's embedding then does not depend on the padding its batch would need)."""
        for x in inputs:
            self.check_input(x)
        e = self.config.task_emb_dim
        out = torch.empty(len(inputs), e)
        texts = [(i, x.text) for i, x in enumerate(inputs) if x.kind != "embedding"]
        if texts and alone:
            for i, t in texts:
                out[i] = self.encoder.encode([t])[0].float().cpu()
        elif texts:
            out[[i for i, _ in texts]] = self.encoder.encode([t for _, t in texts]).float().cpu()
        for i, x in enumerate(inputs):
            if x.kind == "embedding":
                out[i] = torch.tensor(x.embedding)
        return out

    def read(self, inputs: Sequence[TaskInput], alone: bool = False) -> TokenStates:
        """Token states (B, T, E) float32 and mask (B, T) of text inputs, for a reader checkpoint; `alone`: each
        text encoded on its own, then right-padded into the batch."""
        for x in inputs:
            self.check_input(x)
        reader = self.config.reader
        if reader is None:
            raise InputError("this checkpoint is conditioned on pooled embeddings; it has no token reader")
        if alone:
            rows = [self.encoder.token_states([x.text], max_tokens=reader.max_tokens).states[0] for x in inputs]
            return TokenStates.pad(rows, self.config.task_emb_dim)
        return self.encoder.token_states([x.text for x in inputs], max_tokens=reader.max_tokens)

    def hypernet(self, inputs: Sequence[TaskInput], exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The hypernetwork's A/B for `inputs`, conditioned the way the checkpoint was trained: one plain batch,
        or with `exact` (what `generate` uses in float32) each text encoded alone and the exact forward, so that
        every input's A/B are bit-identical to its own call alone."""
        if self.config.reader is None:
            emb = self.embed(inputs, alone=exact).to(self.device, self.compute_dtype)  # (B, E)
            return self.net(emb, exact=exact)
        states, mask = self.read(inputs, alone=exact)  # (B, T, E), (B, T)
        return self.net.forward_tokens(states.to(self.device, self.compute_dtype), mask.to(self.device), exact=exact)

    @torch.inference_mode()
    def generate(self, inputs: Sequence[TaskInput], dtype: str = "float32") -> list[LoraAdapter]:
        """One adapter per input, in order. `dtype` is the adapter's output dtype."""
        return list(self.iter_generate(inputs, dtype))

    @torch.inference_mode()
    def iter_generate(self, inputs: Sequence[TaskInput], dtype: str = "float32") -> Iterator[LoraAdapter]:
        """`generate`, handed out one adapter at a time: the hypernetwork runs for the whole batch when the
        first adapter is asked for, and each adapter is laid out in its file's order when it is reached, so a
        server can send the first while the others are still being laid out. An adapter with non-finite weights
        raises InputError when it is reached; those before it were finite."""
        if not inputs:
            return
        parse_dtype(dtype)
        if self.batch_invariant and not self.exact_batching and len(inputs) > 1:
            # that path as it was: every input's forward pass, then the adapters
            yield from [adapter for x in inputs for adapter in self.generate([x], dtype)]
            return
        exact = self.batch_invariant and self.exact_batching
        ab = self.hypernet(inputs, exact=exact)  # {module: (A (B, N, r, d_in), B (B, N, d_out, r))}
        base = {"loragen_version": __version__, "checkpoint_sha256": self.checkpoint.sha256,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}
        provenances = [{**base, "input_kind": x.kind, "input_sha256": x.digest()} for x in inputs]
        for i, (adapter, finite) in enumerate(LoraAdapter.iter_from_generated(self.config, ab, dtype, provenances)):
            if not finite:  # only a broken checkpoint or a pathological embedding gets here; never ship it
                raise InputError(f"generation produced non-finite weights for input {i} of this batch; "
                                 "check the checkpoint and input")
            yield adapter
