"""Adapter export: streaming safetensors writer, tar, PEFT directory, dtypes, determinism."""

import io
import json
import logging
import struct
import tarfile

import pytest
import torch
from safetensors.torch import load, save

from generator.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    iter_safetensors,
    read_safetensors_metadata,
)
from generator.errors import InputError
from generator.pipeline import LoraGenerator, TaskInput, cpu_has_native_bfloat16
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def gen():
    return LoraGenerator(tiny_checkpoint("L", seed=1))


def _adapter(gen, dtype="float32", seed=0):
    g = torch.Generator().manual_seed(seed)
    return gen.generate([TaskInput.from_embedding(torch.randn(16, generator=g))], dtype=dtype)[0]


def _header(raw: bytes) -> dict:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"adapter_config": '{"r": 4, "x": "\u00e9\\n"}'}])
def test_writer_is_byte_identical_to_safetensors_save(metadata):
    g = torch.Generator().manual_seed(0)
    tensors = {  # mixed dtypes and names whose string order differs from insertion order
        "layers.10.b": torch.randn(3, 2, generator=g),
        "layers.2.a": torch.randn(5, generator=g).to(torch.bfloat16),
        "layers.1.c": torch.randn(2, 2, generator=g).to(torch.float16),
        "z": torch.randn(1, 7, generator=g),
        "scalarish": torch.randn(1, generator=g).to(torch.bfloat16),
    }
    ours = b"".join(iter_safetensors(tensors, metadata, chunk_size=3))
    assert ours == save(tensors, metadata=metadata)


def test_stream_equals_safetensors_save_with_full_metadata(gen):
    """With several metadata keys safetensors orders them at random per process (a Rust HashMap), so
    equality is: same length, same data section, same header as JSON. Ours sorts them: deterministic."""
    a = _adapter(gen)
    ours = a.safetensors_bytes()
    theirs = save(dict(a.tensors), metadata=a.metadata())
    assert len(ours) == len(theirs)
    assert ours[:8] == theirs[:8]
    (n,) = struct.unpack("<Q", ours[:8])
    assert ours[8 + n :] == theirs[8 + n :]
    assert _header(ours) == _header(theirs)
    assert list(_header(ours)["__metadata__"]) == sorted(a.metadata())


def test_stream_is_header_first_in_bounded_chunks(gen):
    a = _adapter(gen)
    pieces = list(a.iter_safetensors(chunk_size=64))
    assert pieces[0] == a.safetensors_header()
    assert all(0 < len(p) <= 64 for p in pieces[1:])
    assert sum(map(len, pieces)) == a.safetensors_size() == len(a.safetensors_bytes())
    loaded = load(a.safetensors_bytes())
    assert sorted(loaded) == sorted(a.tensors)
    assert all(torch.equal(loaded[k], a.tensors[k]) for k in loaded)


def test_metadata_is_self_describing(gen):
    a = _adapter(gen)
    meta = read_safetensors_metadata(a.safetensors_bytes())
    assert meta["format"] == "pt"
    assert json.loads(meta["adapter_config"]) == a.config
    prov = json.loads(meta["loragen"])
    assert prov["checkpoint_sha256"] == gen.checkpoint.sha256
    assert prov["base_model"] == "tiny-random/llama" and prov["dtype"] == "float32"
    assert prov["input_kind"] == "embedding" and len(prov["input_sha256"]) == 64
    assert "loragen_version" in prov


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_output_dtypes(gen, dtype, torch_dtype):
    a32, low = _adapter(gen), _adapter(gen, dtype)
    for k, t in low.tensors.items():
        assert t.dtype == torch_dtype
        assert torch.equal(t, a32.tensors[k].to(torch_dtype))
    assert low.safetensors_size() < a32.safetensors_size()


def test_unknown_dtype_is_input_error(gen):
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        _adapter(gen, "int8")


def test_determinism_same_bytes(gen):
    assert _adapter(gen).safetensors_bytes() == _adapter(gen).safetensors_bytes()
    assert _adapter(gen).safetensors_bytes() != _adapter(gen, seed=1).safetensors_bytes()
    fresh = LoraGenerator(tiny_checkpoint("L", seed=1))  # a separately built generator, same weights
    assert _adapter(fresh).safetensors_bytes() == _adapter(gen).safetensors_bytes()


@pytest.mark.parametrize("prefix", ["", "adapter-1"])
def test_tar_holds_the_peft_directory(gen, tmp_path, prefix):
    a = _adapter(gen)
    raw = a.tar_bytes(prefix)
    assert len(raw) == a.tar_size() and len(raw) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
        base = f"{prefix}/" if prefix else ""
        assert names == [base + ADAPTER_CONFIG, base + ADAPTER_WEIGHTS]
        assert tar.extractfile(base + ADAPTER_WEIGHTS).read() == a.safetensors_bytes()
        assert json.loads(tar.extractfile(base + ADAPTER_CONFIG).read()) == a.config
        tar.extractall(tmp_path, filter="data")
    assert a.tar_bytes(prefix) == raw  # deterministic: fixed mtime, owner and mode


def test_save_pretrained_writes_the_same_bytes(gen, tmp_path):
    a = _adapter(gen)
    out = a.save_pretrained(tmp_path / "peft")
    assert (out / ADAPTER_WEIGHTS).read_bytes() == a.safetensors_bytes()
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == "tiny-random/llama"


def test_tar_of_stored_file_equals_tar_of_adapter(gen):
    """The service keeps only the safetensors bytes; the tar it builds from them must be the same archive."""
    from generator.adapter import iter_tar_of_file, tar_size

    a = _adapter(gen)
    raw = b"".join(iter_tar_of_file(a.safetensors_bytes(), prefix="x"))
    assert raw == a.tar_bytes("x")
    assert len(raw) == tar_size(len(a.config_json()), a.safetensors_size())


def test_adapters_own_their_memory(gen):
    """An adapter kept in a cache must not pin the whole batch's output (views into one big tensor)."""
    g = torch.Generator().manual_seed(3)
    adapters = gen.generate([TaskInput.from_embedding(torch.randn(16, generator=g)) for _ in range(4)])
    storages = set()
    for a in adapters:
        own = sum(t.numel() * t.element_size() for t in a.tensors.values())  # this adapter's bytes, no more
        for name, t in a.tensors.items():
            assert t.is_contiguous()
            assert t.untyped_storage().nbytes() == own, name
        storages.add(next(iter(a.tensors.values())).untyped_storage().data_ptr())
        # the one-buffer fast path writes what the general, per-tensor writer writes
        general = b"".join(iter_safetensors(dict(a.tensors), a.metadata()))
        assert a.safetensors_bytes() == b"".join(a.iter_safetensors(chunk_size=1000)) == general
    assert len(storages) == len(adapters)  # one buffer per adapter, none shared


def test_non_finite_generation_is_refused():
    """A finite checkpoint can still overflow; such weights are never shipped."""
    ckpt = tiny_checkpoint("L", seed=4)
    gen = LoraGenerator(ckpt)
    with torch.no_grad():
        gen.net.heads["q_proj"].bias.fill_(3e38)
        gen.net.heads["q_proj"].weight.fill_(3e38)
    with pytest.raises(InputError, match="non-finite"):
        _adapter(gen)


OVERFLOWING = [3e38] * 16  # a finite embedding whose projection overflows: its adapter's weights are not finite


def test_iter_generate_hands_out_each_adapter_before_laying_out_the_next():
    """A batch's adapters come out one at a time (what lets a server send the first while the next is laid
    out): those before an input whose weights overflow arrive whole, each the bytes of its own batch's
    `generate`, and the overflowing one raises only when it is reached."""
    gen = LoraGenerator(tiny_checkpoint("L", seed=4))
    good = [TaskInput.from_embedding(torch.randn(16, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    batch = [good[0], good[1], TaskInput.from_embedding(OVERFLOWING), good[2]]
    expected = gen.generate(good[:2])  # float32: the bytes do not depend on the batch (tests/test_exact_batching.py)
    adapters = gen.iter_generate(batch)
    assert next(adapters).safetensors_bytes() == expected[0].safetensors_bytes()
    assert next(adapters).safetensors_bytes() == expected[1].safetensors_bytes()
    with pytest.raises(InputError, match="non-finite weights for input 2 of this batch"):
        next(adapters)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_batch_laid_out_at_once_equals_one_adapter_at_a_time(dtype):
    """The GPU path (`_batch_on_device`, run here on the CPU): the whole batch laid out in one buffer, then
    one copy per adapter, gives the bytes of filling each adapter alone, each in a buffer of its own."""
    gen = LoraGenerator(tiny_checkpoint("M", seed=5), compute_dtype=torch.bfloat16)
    emb = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ab = gen.net(emb.to(torch.bfloat16))  # B comes out as a transposed view, as on the GPU
    provs = [{"input_sha256": str(i)} for i in range(3)]
    batch, finite = LoraAdapter._batch_on_device(gen.config, ab, dtype, provs)
    assert finite == [True] * 3
    for i, got in enumerate(batch):
        alone = LoraAdapter.from_generated(gen.config, {m: (a[i], b[i]) for m, (a, b) in ab.items()}, dtype, provs[i])
        assert got.safetensors_bytes() == alone.safetensors_bytes()
        assert got.data.untyped_storage().nbytes() == got.data.numel() * got.data.element_size()


def test_batch_laid_out_at_once_flags_non_finite_rows():
    gen = LoraGenerator(tiny_checkpoint("L", seed=5))
    with torch.no_grad():
        ab = gen.net(torch.randn(3, 16))
    ab["v_proj"][1][1, 0, 0, 0] = float("inf")  # row 1: an infinite weight
    ab["q_proj"][0][2, 1, 0, 0] = 1e5  # row 2: finite in float32, beyond float16's range
    provs = [{}] * 3
    assert LoraAdapter._batch_on_device(gen.config, ab, "float32", provs)[1] == [True, False, True]
    assert LoraAdapter._batch_on_device(gen.config, ab, "float16", provs)[1] == [True, False, False]
    assert [a.all_finite() for a in LoraAdapter.batch_from_generated(gen.config, ab, "float16", provs)[0]] == \
        [True, False, False]  # the CPU path agrees


CPUINFO_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
CPUINFO_ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
CPUINFO_SPR = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text,native", [(CPUINFO_AVX2, False), (CPUINFO_ZEN4, True), (CPUINFO_SPR, True),
                                         (CPUINFO_ARM, True), ("", None)])
def test_cpu_bfloat16_support_is_read_from_cpuinfo(text, native):
    assert cpu_has_native_bfloat16(text) is native


def test_bfloat16_compute_on_a_cpu_that_emulates_it_warns(caplog):
    """bfloat16 on a CPU without bfloat16 instructions is emulated by torch, several times slower than float32:
    the operator is told when the generator is built (this machine decides which way the test goes)."""
    native = cpu_has_native_bfloat16()
    with caplog.at_level(logging.WARNING, logger="generator.pipeline"):
        LoraGenerator(tiny_checkpoint("L", seed=1), compute_dtype=torch.bfloat16)
        LoraGenerator(tiny_checkpoint("L", seed=1), compute_dtype=torch.float32)
    warned = [r.getMessage() for r in caplog.records if "emulat" in r.getMessage()]
    assert len(warned) == (1 if native is False else 0), warned
    assert all("float32" in m for m in warned)
