"""A generated LoRA adapter and its on-disk / on-the-wire forms.

Forms, all deterministic (same tensors and provenance → same bytes):
    PEFT directory     adapter_config.json + adapter_model.safetensors (`save_pretrained`)
    safetensors bytes  one self-describing file: `__metadata__` carries the adapter config and provenance
                       (`iter_safetensors` streams it, header first; byte-identical to safetensors' own
                       writer for the same tensors and metadata, see `safetensors_header`)
    tar                the PEFT directory as a tar stream (`iter_tar`), for `tar x` then vLLM/LoRAX

Keys follow PEFT's naming for Llama-family models: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
(mlp projections under `.mlp.`), A [r, d_in], B [d_out, r]; no scaling folded in: PEFT applies
lora_alpha/sqrt(r) (rsLoRA) when it loads the adapter.
"""

from __future__ import annotations

import json
import math
import struct
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator.config import HyperConfig, ModuleSpec
from generator.errors import InputError
from loragen.check import VLLM_MAX_LORA_RANKS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors' names for dtypes, and its on-disk order: higher rank first, then by name
_ST_DTYPES = {torch.float32: ("F32", 3), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 1)}
CHUNK = 1 << 20  # 1 MiB pieces: small enough to interleave many streams, large enough to be cheap
TAR_MTIME = 0  # fixed, so a tar of the same adapter is the same bytes


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def padded_rank(rank: int) -> int:
    """The smallest rank vLLM accepts (--max-lora-rank values) that holds `rank`; `rank` itself past the largest.
    An adapter of rank `rank` zero-padded to it computes the same update: zero rows of A and zero columns of B."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)


def peft_key(layer: int, module: ModuleSpec, which: str) -> str:
    """PEFT state-dict key of lora_A / lora_B ('A' or 'B') of `module` in decoder layer `layer`."""
    return f"base_model.model.model.layers.{layer}.{module.parent}.{module.name}.lora_{which}.weight"


def peft_config(hyper: HyperConfig) -> dict:
    """adapter_config.json contents: what PEFT, vLLM and LoRAX read, independent of the PEFT version."""
    return lora_config_dict(hyper.base_model, hyper.base_model_revision, hyper.r, hyper.lora_alpha, hyper.use_rslora,
                            hyper.target_modules)


def lora_config_dict(base_model: str, revision: str | None, r: int, lora_alpha: float, use_rslora: bool,
                     target_modules: Sequence[str]) -> dict:
    """adapter_config.json of a LoRA with these settings (an integral alpha written as an integer)."""
    alpha = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha
    return {
        "base_model_name_or_path": base_model,
        "revision": revision,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: named contiguous CPU tensors in their output dtype, its PEFT config and provenance.

    A generated adapter keeps all its tensors in one buffer of its own (`data`), laid out in safetensors'
    data order, so its file is the header plus that buffer: serialising is one copy. `data` is None for an
    adapter built from separate tensors; every method works either way."""

    tensors: Mapping[str, torch.Tensor]
    config: dict
    provenance: dict[str, str] = field(default_factory=dict)
    data: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_generated(
        cls,
        hyper: HyperConfig,
        ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        dtype: str = "float32",
        provenance: Mapping[str, str] | None = None,
    ) -> LoraAdapter:
        """`ab`: module → (A (N, r, d_in), B (N, d_out, r)) for one task, as the hypernetwork emits them (views
        into the batch's output are fine: everything is copied into the adapter's own buffer)."""
        # laid out on the generating device, then one copy to the CPU; a buffer of its own, so an adapter
        # held in a cache never pins the batch's output
        names, shapes, flat = _lay_out(hyper, ab, dtype)
        return cls._from_buffer(hyper, names, shapes, flat.cpu(), dtype, provenance)

    @classmethod
    def batch_from_generated(
        cls,
        hyper: HyperConfig,
        ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        dtype: str,
        provenances: Sequence[Mapping[str, str]],
    ) -> tuple[list[LoraAdapter], list[bool]]:
        """One adapter per row of a batch, `ab`: module → (A (B, N, r, d_in), B (B, N, d_out, r)); and whether
        each one's weights are all finite (as `all_finite`, in the output dtype: a float16 overflow counts)."""
        pairs = list(cls.iter_from_generated(hyper, ab, dtype, provenances))
        return [a for a, _ in pairs], [ok for _, ok in pairs]

    @classmethod
    def iter_from_generated(
        cls,
        hyper: HyperConfig,
        ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        dtype: str,
        provenances: Sequence[Mapping[str, str]],
    ) -> Iterator[tuple[LoraAdapter, bool]]:
        """`batch_from_generated` one (adapter, all finite) at a time, in row order.

        On the CPU each adapter is filled straight into its own buffer when it is reached, so the first can be
        on its way while the next is laid out. On a GPU the whole batch is laid out on the device at once
        (`_batch_on_device`: a copy kernel per tensor for the batch, not per adapter, and the finiteness sums
        there too), then each adapter's bytes come to the host in one copy."""
        if next(iter(ab.values()))[0].device.type != "cpu":
            yield from zip(*cls._batch_on_device(hyper, ab, dtype, provenances), strict=True)
            return
        for i, p in enumerate(provenances):
            adapter = cls.from_generated(hyper, {m: (a[i], b[i]) for m, (a, b) in ab.items()}, dtype, p)
            # checked on its own contiguous buffer: summing the batch's strided A/B views instead cost as much
            # as a third of the forward in bfloat16
            yield adapter, adapter.all_finite()

    @classmethod
    def _batch_on_device(cls, hyper: HyperConfig, ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: str,
                         provenances: Sequence[Mapping[str, str]]) -> tuple[list[LoraAdapter], list[bool]]:
        names, shapes, flat = _lay_out(hyper, ab, dtype, batch=len(provenances))
        finite = torch.isfinite(flat.sum(dim=1, dtype=torch.float32)).tolist()
        return [cls._from_buffer(hyper, names, shapes, flat[i].to("cpu", copy=True), dtype, p)  # its own buffer
                for i, p in enumerate(provenances)], finite

    @classmethod
    def _from_buffer(cls, hyper: HyperConfig, names: list[str], shapes: list[torch.Size], data: torch.Tensor,
                     dtype: str, provenance: Mapping[str, str] | None) -> LoraAdapter:
        """An adapter over `data`, a contiguous 1-D CPU buffer holding `names`' tensors in that order."""
        tensors = dict(zip(names, _pieces(data, shapes), strict=True))
        prov = {"dtype": dtype, "base_model": hyper.base_model, **(provenance or {})}
        return cls(tensors, peft_config(hyper), {k: str(v) for k, v in prov.items()}, data)

    def all_finite(self) -> bool:
        """Whether every weight is finite. A float32 sum is non-finite if any element is (NaN and inf
        propagate): one pass, no boolean copy. Finite weights whose sum overflows float32 count as
        non-finite too: no trained adapter is that large."""
        parts = [self.data] if self.data is not None else list(self.tensors.values())
        return all(bool(torch.isfinite(p.sum(dtype=torch.float32))) for p in parts)

    # ---- safetensors ----

    def metadata(self) -> dict[str, str]:
        """The safetensors `__metadata__`: PEFT's format tag, the adapter config and provenance as JSON."""
        return {
            "format": "pt",
            "adapter_config": json.dumps(self.config, sort_keys=True, separators=(",", ":")),
            "loragen": json.dumps(self.provenance, sort_keys=True, separators=(",", ":")),
        }

    def safetensors_header(self) -> bytes:
        return safetensors_header(self.tensors, self.metadata())

    def safetensors_size(self) -> int:
        return len(self.safetensors_header()) + sum(t.numel() * t.element_size() for t in self.tensors.values())

    def iter_safetensors(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The safetensors file in pieces of at most `chunk_size` bytes: header first, then tensor data."""
        if self.data is None:
            return iter_safetensors(self.tensors, self.metadata(), chunk_size)
        return _iter_header_and_data(self.safetensors_header(), _bytes_of(self.data), chunk_size)

    def safetensors_bytes(self) -> bytes:
        if self.data is None:
            return b"".join(self.iter_safetensors())
        return b"".join((self.safetensors_header(), _bytes_of(self.data)))  # one copy of the weights

    # ---- PEFT directory and tar ----

    def config_json(self) -> bytes:
        return adapter_config_json(self.config)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a PEFT adapter directory that `PeftModel.from_pretrained` and vLLM load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / ADAPTER_CONFIG).write_bytes(self.config_json())
        with open(out / ADAPTER_WEIGHTS, "wb") as f:
            for piece in self.iter_safetensors():
                f.write(piece)
        return out

    def tar_size(self) -> int:
        return tar_size(len(self.config_json()), self.safetensors_size())

    def iter_tar(self, prefix: str = "", chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The PEFT directory as a ustar stream; files under `prefix/` when a prefix is given."""
        return iter_tar(self.config_json(), self.iter_safetensors(chunk_size), self.safetensors_size(), prefix)

    def tar_bytes(self, prefix: str = "") -> bytes:
        return b"".join(self.iter_tar(prefix))


def _sources(hyper: HyperConfig, ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
             ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every PEFT key, in safetensors' data order (one dtype, so the name order), and its tensor: layer
    `i` of a module's A (..., N, r, d_in) or B (..., N, d_out, r), with or without a leading batch dim."""
    sources = {}
    for m in hyper.modules:
        a, b = ab[m.name]
        for layer in range(hyper.n_layers):
            sources[peft_key(layer, m, "A")] = a.select(-3, layer)
            sources[peft_key(layer, m, "B")] = b.select(-3, layer)
    return sorted(sources), sources


def _lay_out(hyper: HyperConfig, ab: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: str,
            batch: int | None = None) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    """`ab`'s tensors in file order, cast to `dtype`, in one new buffer on their device: 1-D for one adapter,
    (batch, total) for a batch (`ab` with a leading batch dim). Cast and B's transpose happen in one copy per
    tensor. Returns the names, each tensor's shape for one adapter, and the buffer."""
    names, sources = _sources(hyper, ab)
    lead = () if batch is None else (batch,)
    shapes = [sources[n].shape[len(lead):] for n in names]
    flat = torch.empty(*lead, sum(math.prod(s) for s in shapes), dtype=parse_dtype(dtype),
                       device=sources[names[0]].device)
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        n = math.prod(shape)
        flat[..., offset : offset + n].view(*lead, *shape).copy_(sources[name].detach())
        offset += n
    return names, shapes, flat


def _pieces(flat: torch.Tensor, shapes: list[torch.Size]) -> Iterator[torch.Tensor]:
    """Consecutive views of a 1-D `flat`, one per shape, in order."""
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        yield flat[offset : offset + n].view(shape)
        offset += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _iter_header_and_data(header: bytes, data: memoryview, chunk_size: int) -> Iterator[bytes]:
    yield header
    for i in range(0, len(data), chunk_size):
        yield bytes(data[i : i + chunk_size])


def _ordered(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """safetensors' data order: higher-ranked dtype first, then by name."""
    return sorted(tensors.items(), key=lambda kv: (-_ST_DTYPES[kv[1].dtype][1], kv[0]))


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to a multiple of 8, laid out as
    safetensors writes it: metadata first (omitted when None), tensors in data order, compact JSON.
    Metadata keys are sorted: safetensors' own writer orders several keys at random per process."""
    header: dict = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, t in _ordered(tensors):
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def iter_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, chunk_size: int = CHUNK
) -> Iterator[bytes]:
    """A safetensors file streamed: the header, then each tensor's bytes in pieces of <= chunk_size.
    Byte-identical to `safetensors.torch.save(tensors, metadata)` whenever that is deterministic
    (at most one metadata key); otherwise equal up to the order of metadata keys."""
    yield safetensors_header(tensors, metadata)
    for _, t in _ordered(tensors):
        data = _bytes_of(t)
        for i in range(0, len(data), chunk_size):
            yield bytes(data[i : i + chunk_size])


def adapter_config_json(config: Mapping) -> bytes:
    """adapter_config.json as written beside the weights (and rebuilt from a file's metadata: same bytes)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def tar_size(config_size: int, weights_size: int) -> int:
    written = sum(512 + _pad512(n) for n in (config_size, weights_size))
    return written + _tar_tail(written)


def iter_tar(config_json: bytes, weights: Iterable[bytes], weights_size: int, prefix: str = "") -> Iterator[bytes]:
    """A ustar archive of a PEFT directory, streamed: adapter_config.json, then the weights as they come.
    Fixed mtime, owner and mode, so the same adapter always gives the same archive."""
    written = 0
    for name, size, pieces in ((ADAPTER_CONFIG, len(config_json), iter([config_json])),
                               (ADAPTER_WEIGHTS, weights_size, weights)):
        info = tarfile.TarInfo(f"{prefix.strip('/')}/{name}" if prefix else name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
        yield info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        yield from pieces
        yield b"\0" * (_pad512(size) - size)
        written += 512 + _pad512(size)
    yield b"\0" * _tar_tail(written)


def iter_tar_of_file(safetensors: bytes, prefix: str = "", chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The PEFT-directory tar of a stored adapter file: its config comes from the file's own metadata."""
    config = json.loads(read_safetensors_metadata(safetensors)["adapter_config"])
    pieces = (safetensors[i : i + chunk_size] for i in range(0, len(safetensors), chunk_size))
    return iter_tar(adapter_config_json(config), pieces, len(safetensors), prefix)


def _pad512(n: int) -> int:
    return -(-n // 512) * 512


def _tar_tail(written: int) -> int:
    """Two zero blocks, then zeros up to tarfile's 10240-byte record, as tarfile.close() writes."""
    end = written + 1024
    return 1024 + (-end % tarfile.RECORDSIZE)


def read_safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file given as bytes (or at least its header)."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]).get("__metadata__", {})
