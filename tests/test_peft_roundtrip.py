"""PEFT round trip: generated adapters load into tiny random Llama-family models exactly as written.

For each (family, target modules, variant): a seeded random hypernetwork generates an adapter from a random
embedding (the text encoder is never loaded), `save_pretrained` writes it, `PeftModel.from_pretrained`
loads it with no missing or unexpected keys, every LoRA parameter inside PEFT equals the tensor in our file,
and the PEFT model's logits equal those of the base model merged by hand as W + scaling * B @ A.
Real models, no mocks, no network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere: never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib
import copy
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, read_safetensors_metadata
from generator.checkpoint import Checkpoint, load_checkpoint
from generator.config import EncoderSpec, HyperConfig, modules_for_base
from generator.hypernet import build_hypernet
from generator.pipeline import LoraGenerator, TaskInput

E = 384
R = 4
ALPHA = 16
HEAD_SCALE = 0.2
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, vocab_size=128, max_position_embeddings=64,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
QV = ("q_proj", "v_proj")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

CASES = [(f, QV, v) for f in FAMILIES for v in "LMS"] + [(f, ALL7, v) for f in FAMILIES for v in "LMS"]


# ------------------------------------------------------------------------------------------------ helpers


def base_model(family: str, seed: int = 0):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TINY))
    return model.float().eval()


def hyper_config(family: str, modules, variant: str) -> HyperConfig:
    return HyperConfig(
        variant=variant, task_emb_dim=E, latent=32, head_in=64, n_layers=TINY["num_hidden_layers"],
        modules=modules_for_base(FAMILIES[family][0](**TINY), list(modules)), r=R, lora_alpha=ALPHA,
        use_rslora=True, encoder=EncoderSpec(dim=E), base_model=f"tiny-random/{family}",
    )


def checkpoint_for(hyper: HyperConfig, seed: int = 1) -> Checkpoint:
    """PyTorch's default init, seeded, plus random output embeddings (so M/S give A != B) and small random
    A/B offsets (so the offset path is exercised). The heads are scaled down so that scaling * B @ A is of
    the order of the base weights: with default-init heads the update is ~8x larger, the tiny models
    saturate and float32 rounding (not the adapter) decides the last digits of the logits."""
    torch.manual_seed(seed)
    net = build_hypernet(hyper)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("heads."):
                p.mul_(HEAD_SCALE)
            elif name.startswith("out_emb."):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.startswith("AB_offset."):
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return Checkpoint.from_module(net, source="test")


def embedding(seed: int = 2) -> TaskInput:
    return TaskInput.from_embedding(torch.randn(E, generator=torch.Generator().manual_seed(seed)))


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=input_ids()).logits.float()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def recorded_warnings():
    """Python warnings (all of them, every time) and WARNING+ records of the peft/transformers loggers
    (transformers' root logger does not propagate, so caplog alone would not see it)."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out: list[str] = []
            yield out
            out.extend(str(w.message) for w in caught)
            out.extend(handler.messages)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def in_peft(key: str) -> str:
    """Our file key → the parameter name inside the PeftModel (adapter name 'default')."""
    assert key.endswith(".weight"), key
    return key[: -len(".weight")] + ".default.weight"


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def merged_by_hand(base, weights_file: Path, scaling: float):
    """A copy of `base` with W += scaling * B @ A for every pair in the file (computed in float64)."""
    merged = copy.deepcopy(base)
    tensors = load_file(str(weights_file))
    pairs: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        assert m, f"unexpected key layout {key}"
        layer, parent, name, which = m.groups()
        pairs.setdefault((int(layer), parent, name), {})[which] = t
    with torch.no_grad():
        for (layer, parent, name), ab in pairs.items():
            linear = getattr(getattr(merged.model.layers[layer], parent), name)
            delta = scaling * (ab["B"].double() @ ab["A"].double())
            assert delta.shape == linear.weight.shape
            linear.weight.copy_((linear.weight.double() + delta).to(linear.weight.dtype))
    return merged


def load_into_peft(base, adapter_dir: Path):
    """PeftModel.from_pretrained on a deep copy of `base`, asserting nothing warned about keys."""
    with recorded_warnings() as messages:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    bad = [m for m in messages if re.search(r"missing|unexpected", m, re.IGNORECASE)]
    assert not bad, f"PEFT warned about keys: {bad}"
    return model.eval()


def assert_peft_holds(model, adapter: LoraAdapter, weights_file: Path) -> None:
    """Every LoRA tensor of the file sits in the PEFT model under its name, equal; and no others exist."""
    params = lora_params(model)
    with safe_open(str(weights_file), framework="pt") as f:
        file_keys = sorted(f.keys())
        assert file_keys == sorted(adapter.tensors)
        assert len(params) == len(file_keys), (sorted(params), file_keys)
        for key in file_keys:
            name = in_peft(key)
            assert name in params, f"{key} has no PEFT parameter {name}"
            t = f.get_tensor(key)
            assert t.dtype == adapter.tensors[key].dtype
            assert torch.equal(t, adapter.tensors[key])
            assert params[name].shape == t.shape, name
            assert torch.equal(params[name].float(), t.float()), name


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bases():
    """One tiny random base model per family, built once (tests never modify them: they deep-copy)."""
    return {f: base_model(f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def base_logits(bases):
    return {f: logits(m) for f, m in bases.items()}


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "family,modules,variant", CASES,
    ids=[f"{f}-{'qv' if m == QV else 'all7'}-{v}" for f, m, v in CASES],
)
def test_peft_round_trip(family, modules, variant, bases, base_logits, tmp_path):
    base = bases[family]
    hyper = hyper_config(family, modules, variant)
    assert hyper.scaling == pytest.approx(ALPHA / R**0.5)
    ckpt = checkpoint_for(hyper)
    (adapter,) = LoraGenerator(ckpt).generate([embedding()], "float32")

    # the adapter is a real one: every A and every B is clearly nonzero, with PEFT's shapes
    n_layers = hyper.n_layers
    assert len(adapter.tensors) == 2 * n_layers * len(modules)
    for m in hyper.modules:
        for layer in range(n_layers):
            a = adapter.tensors[f"base_model.model.model.layers.{layer}.{m.parent}.{m.name}.lora_A.weight"]
            b = adapter.tensors[f"base_model.model.model.layers.{layer}.{m.parent}.{m.name}.lora_B.weight"]
            assert a.shape == (R, m.d_in) and b.shape == (m.d_out, R)
            assert a.dtype == b.dtype == torch.float32
            assert a.abs().mean() > 3e-3 and b.abs().mean() > 3e-3, (m.name, layer)
            if variant != "L" and m.d_in == m.d_out:  # shared head: the output embeddings must tell A from B
                assert not torch.allclose(a, b.T)
    # module dims match the base model's Linear layers
    for m in hyper.modules:
        linear = getattr(getattr(base.model.layers[0], m.parent), m.name)
        assert (linear.in_features, linear.out_features) == (m.d_in, m.d_out)

    out = adapter.save_pretrained(tmp_path / "adapter")
    weights = out / ADAPTER_WEIGHTS
    model = load_into_peft(base, out)
    assert_peft_holds(model, adapter, weights)

    got = logits(model)
    assert (got - base_logits[family]).abs().max() > 1e-4, "the adapter does not change the logits"
    want = logits(merged_by_hand(base, weights, hyper.scaling))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the base model itself was never touched (PEFT wrapped a deep copy)
    torch.testing.assert_close(logits(base), base_logits[family], atol=0, rtol=0)


def test_adapter_config_and_metadata(bases, tmp_path):
    family = "llama"
    hyper = hyper_config(family, ALL7, "L")
    ckpt = checkpoint_for(hyper)
    (adapter,) = LoraGenerator(ckpt).generate([embedding()])
    out = adapter.save_pretrained(tmp_path / "adapter")

    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg == adapter.config
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["use_rslora"] is True
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA
    assert cfg["target_modules"] == list(ALL7) == hyper.target_modules
    assert cfg["base_model_name_or_path"] == "tiny-random/llama"
    assert cfg["modules_to_save"] is None

    raw = (out / ADAPTER_WEIGHTS).read_bytes()
    assert raw == adapter.safetensors_bytes()
    meta = read_safetensors_metadata(raw)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        assert f.metadata() == meta  # safetensors itself reads the same header
    assert meta["format"] == "pt"
    assert json.loads(meta["adapter_config"]) == adapter.config
    prov = json.loads(meta["loragen"])
    assert prov == adapter.provenance
    assert prov["checkpoint_sha256"] == ckpt.sha256
    assert prov["base_model"] == "tiny-random/llama"
    assert prov["dtype"] == "float32"
    assert prov["input_kind"] == "embedding"
    assert prov["input_sha256"] == embedding().digest()

    # PEFT reads the config we wrote
    model = load_into_peft(bases[family], out)
    pc = model.peft_config["default"]
    assert pc.r == R and pc.lora_alpha == ALPHA and pc.use_rslora is True
    assert set(pc.target_modules) == set(ALL7)
    assert pc.base_model_name_or_path == "tiny-random/llama"
    for mod in model.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
            assert mod.scaling["default"] == pytest.approx(hyper.scaling)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_adapters_load(dtype, torch_dtype, bases, base_logits, tmp_path):
    family = "llama"
    hyper = hyper_config(family, ALL7, "L")
    gen = LoraGenerator(checkpoint_for(hyper))
    (ref,) = gen.generate([embedding()], "float32")
    (adapter,) = gen.generate([embedding()], dtype)
    assert adapter.provenance["dtype"] == dtype
    assert sorted(adapter.tensors) == sorted(ref.tensors)
    for key, t in adapter.tensors.items():
        assert t.dtype == torch_dtype
        assert torch.equal(t, ref.tensors[key].to(torch_dtype)), key

    out = adapter.save_pretrained(tmp_path / dtype)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            assert f.get_tensor(key).dtype == torch_dtype, key
    model = load_into_peft(bases[family], out)
    assert_peft_holds(model, adapter, out / ADAPTER_WEIGHTS)

    got = logits(model)
    assert (got - base_logits[family]).abs().max() > 1e-4
    want = logits(merged_by_hand(bases[family], out / ADAPTER_WEIGHTS, hyper.scaling))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["L", "M", "S"])
def test_native_checkpoint_reload_is_byte_identical(variant, tmp_path):
    hyper = hyper_config("mistral", ALL7, variant)
    ckpt = checkpoint_for(hyper)
    ckpt.save(tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == ckpt.config
    assert loaded.sha256 == ckpt.sha256
    inputs = [embedding(2), embedding(5)]
    mem = LoraGenerator(ckpt).generate(inputs)
    disk = LoraGenerator(loaded).generate(inputs)
    assert len(mem) == len(disk) == 2
    for a, b in zip(mem, disk, strict=True):
        assert a.safetensors_bytes() == b.safetensors_bytes()
    assert mem[0].safetensors_bytes() != mem[1].safetensors_bytes()  # different tasks, different adapters
