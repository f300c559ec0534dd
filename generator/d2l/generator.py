"""Documents → LoRA adapters with a Doc-to-LoRA checkpoint and its base model.

    text ─► chat-template ids ─► chunks ─► base model without its last layer ─► activations (n, L, S, H)
         ─► D2LHypernet ─► each chunk's A/B ─► combined with the bias LoRA ─► one PEFT adapter per text

`DocLoraGenerator` offers the interface of `generator.pipeline.LoraGenerator` (`check_input`, `generate`,
`iter_generate`, `checkpoint`, `device`, `batch_invariant`), so the worker pool, the job stream and the CLI serve
it unchanged. A task description is read the same way as a document.

Export (`to_adapter`): D2L adds lora_alpha * x A^T B with lora_alpha applied as is and B rank-major. The PEFT
adapter has r = R, the document's combined rank, lora_B = B^T, use_rslora off and lora_alpha = alpha * R, so
PEFT's scaling lora_alpha / r is D2L's alpha. R is zero-padded up to the next rank vLLM accepts (zero rows of A
and zero columns of B add nothing), so the same file loads in PEFT, vLLM and LoRAX.

Exactness: in float32 each text's chunks run as their own batch, so an adapter's bytes never depend on what it
was batched with; in bfloat16 compute all texts' chunks of a batch run together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from generator import __version__
from generator.adapter import LoraAdapter, lora_config_dict, padded_rank, parse_dtype, peft_key
from generator.checkpoint import Checkpoint, load_checkpoint
from generator.d2l import context
from generator.d2l.base import BaseModel, base_identity, load_base, resolve_base_dir
from generator.d2l.config import D2LConfig
from generator.d2l.hypernet import D2LHypernet
from generator.errors import DocumentTooLarge, InputError

log = logging.getLogger(__name__)

KIND_INPUTS = ("task", "document")


def adapter_identity(config: D2LConfig, base_dir: str | Path | None, chunk_tokens: int | None) -> dict[str, object]:
    """`DocLoraGenerator.identity` without loading the model: the base's files hashed, the chunking resolved."""
    return {"base_sha256": base_identity(resolve_base_dir(config, base_dir).resolve()),
            "chunk_tokens": config.chunk_tokens if chunk_tokens is None else chunk_tokens}


class DocLoraGenerator:
    """A loaded D2L checkpoint with its base model, ready to turn texts into adapters."""

    exact_batching: bool = True

    def __init__(self, checkpoint: Checkpoint, *, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 base_dir: str | Path | None = None, base: BaseModel | None = None, chunk_tokens: int | None = None,
                 max_tokens: int | None = None, max_chunks: int | None = None):
        if not isinstance(checkpoint.config, D2LConfig):
            raise InputError("DocLoraGenerator takes a Doc-to-LoRA checkpoint; use LoraGenerator for T2L")
        self.checkpoint = checkpoint
        self.config: D2LConfig = checkpoint.config
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.batch_invariant = compute_dtype == torch.float32
        self.base = base if base is not None else load_base(self.config, base_dir, device=self.device,
                                                            dtype=compute_dtype, trust_remote_code=trust_remote_code)
        self.net: D2LHypernet = checkpoint.build(self.device, compute_dtype)
        self.reader = context.ContextEncoder(self.base.model.get_decoder())
        self.affixes = context.affixes(self.base.tokenizer)
        self.chunk_tokens = self.config.chunk_tokens if chunk_tokens is None else chunk_tokens
        if self.chunk_tokens < 0:
            raise InputError(f"chunk tokens must be 0 (no chunking) or positive, got {self.chunk_tokens}")
        self.max_tokens, self.max_chunks = max_tokens, max_chunks
        pad = self.base.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def load(cls, source: str | Path, **kwargs) -> DocLoraGenerator:
        return cls(load_checkpoint(source), **kwargs)

    @property
    def identity(self) -> dict[str, object]:
        """What besides the checkpoint and the text decides an adapter's bytes: the base and the chunking."""
        return {"base_sha256": self.base.sha256, "chunk_tokens": self.chunk_tokens}

    def check_input(self, item) -> None:
        if item.kind not in KIND_INPUTS:
            raise InputError("this is a Doc-to-LoRA checkpoint: it reads a text with its base model, so a ready "
                             "embedding cannot condition it; send the document or task description as text")

    # ---- stages (each one is checked against the reference on its own) ----

    def chunks(self, text: str) -> list[list[int]]:
        """The text's chunks of token ids, within the limits (DocumentTooLarge names the one passed)."""
        try:
            ids = context.tokenize(self.base.tokenizer, text)
        except InputError:
            raise
        except Exception as e:  # a tokenizer or template that cannot take this text
            raise InputError(f"the base model's tokenizer cannot take this text: {type(e).__name__}: {e}") from None
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise DocumentTooLarge(f"the document is {len(ids)} tokens with the chat template; this server takes at most "
                                   f"{self.max_tokens} (max_document_tokens)")
        out = context.chunk(ids, self.chunk_tokens, self.affixes)
        if self.max_chunks is not None and len(out) > self.max_chunks:
            raise InputError(f"the document makes {len(out)} chunks of {self.chunk_tokens} tokens; this server "
                                   f"takes at most {self.max_chunks} (max_chunks)")
        return out

    def activations(self, chunks: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L, S, H) activations and (n, S) mask of a batch of chunks."""
        ids, mask = context.pad(chunks, self.pad_id)
        return self.reader(ids.to(self.device), mask.to(self.device)), mask.to(self.device)

    @torch.inference_mode()
    def chunk_loras(self, chunks: Sequence[Sequence[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        acts, mask = self.activations(chunks)
        return self.net(acts.to(self.compute_dtype), mask)

    @torch.inference_mode()
    def lora(self, text: str, scalers: Sequence[float] | None = None, bias_scaler: float | None = None
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The text's combined LoRA {module: (A (L, R, d_in), B (L, R, d_out))}, B rank-major as D2L keeps it."""
        return self.net.combine(self.chunk_loras(self.chunks(text)), scalers, bias_scaler)

    # ---- adapters ----

    def to_adapter(self, ab: dict[str, tuple[torch.Tensor, torch.Tensor]], n_chunks: int, dtype: str = "float32",
                   provenance: dict[str, str] | None = None) -> LoraAdapter:
        """A combined LoRA as a PEFT adapter whose scaling is D2L's (see the module docstring)."""
        c = self.config
        rank = c.combined_rank(n_chunks)
        r_file = padded_rank(rank)
        out_dtype = parse_dtype(dtype)
        tensors = {}
        for m in c.modules:
            a, b = ab[m.name]  # (L, R, d_in), (L, R, d_out)
            for layer in range(c.n_layers):
                la = torch.zeros(r_file, m.d_in, dtype=out_dtype)
                lb = torch.zeros(m.d_out, r_file, dtype=out_dtype)
                la[:rank] = a[layer]
                lb[:, :rank] = b[layer].T
                tensors[peft_key(layer, m, "A")] = la
                tensors[peft_key(layer, m, "B")] = lb
        config = lora_config_dict(c.base_model, c.base_model_revision, r_file, c.lora_alpha * r_file, False,
                                  c.target_modules)
        prov = {"dtype": dtype, "base_model": c.base_model, "kind": "d2l", "chunks": n_chunks, "rank": rank,
                "chunk_tokens": self.chunk_tokens, "base_sha256": self.base.sha256, **(provenance or {})}
        adapter = LoraAdapter(tensors, config, {k: str(v) for k, v in prov.items()})
        return adapter

    @torch.inference_mode()
    def generate(self, inputs: Sequence, dtype: str = "float32") -> list[LoraAdapter]:
        return list(self.iter_generate(inputs, dtype))

    @torch.inference_mode()
    def iter_generate(self, inputs: Sequence, dtype: str = "float32") -> Iterator[LoraAdapter]:
        """One adapter per input, in order, each handed out when it is made. A text past a limit, or whose adapter
        is not finite, raises InputError when it is reached; those before it were made."""
        if not inputs:
            return
        parse_dtype(dtype)
        for x in inputs:
            self.check_input(x)
        base = {"loragen_version": __version__, "checkpoint_sha256": self.checkpoint.sha256,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}
        if self.batch_invariant:
            groups = [[i] for i in range(len(inputs))]  # each text's chunks alone: bytes independent of the batch
        else:
            groups = [list(range(len(inputs)))]
        for group in groups:
            per_text = [self.chunks(inputs[i].text) for i in group]
            flat = [c for chunks in per_text for c in chunks]
            loras = self.chunk_loras(flat)  # {module: (A (n, L, r, d_in), B (n, L, r, d_out))}
            counts = [len(chunks) for chunks in per_text]
            for i, n, ab in zip(group, counts, self.net.combine_each(loras, counts), strict=True):
                adapter = self.to_adapter(ab, n, dtype,
                                          {**base, "input_kind": inputs[i].kind, "input_sha256": inputs[i].digest()})
                if not adapter.all_finite():
                    raise InputError(f"generation produced non-finite weights for input {i} of this batch; "
                                     "check the checkpoint and input")
                yield adapter
