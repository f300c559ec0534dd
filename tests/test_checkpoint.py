"""Checkpoints: native round trip, T2L import, sources, and hostile files refused with clear errors."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.checkpoint import NATIVE_CONFIG, NATIVE_WEIGHTS, load_checkpoint, parse_hf_uri
from generator.errors import CheckpointError
from generator.pipeline import LoraGenerator, TaskInput
from tests.helpers import tiny_checkpoint


@pytest.fixture
def t2l_dir(fixtures_dir, tmp_path):
    """A writable copy of the released-format L fixture (without expected outputs)."""
    d = tmp_path / "t2l"
    d.mkdir()
    for f in ("hypermod.pt", "args.yaml", "adapter_config.json"):
        shutil.copy(fixtures_dir / "llama_L" / f, d / f)
    return d


def _state(d):
    return torch.load(d / "hypermod.pt", weights_only=True)


def _bytes(gen, seed=0):
    e = torch.randn(gen.config.task_emb_dim, generator=torch.Generator().manual_seed(seed))
    return gen.generate([TaskInput.from_embedding(e)])[0].safetensors_bytes()


# ---- native format and conversion ----

@pytest.mark.parametrize("variant", ["L", "M", "S"])
def test_native_round_trip(tmp_path, variant):
    ckpt = tiny_checkpoint(variant, seed=3)
    ckpt.save(tmp_path / "native")
    back = load_checkpoint(tmp_path / "native")
    assert back.config == ckpt.config and back.sha256 == ckpt.sha256
    assert _bytes(LoraGenerator(back)) == _bytes(LoraGenerator(ckpt))
    cfg = json.loads((tmp_path / "native" / NATIVE_CONFIG).read_text())
    assert cfg["format_version"] == 1 and cfg["variant"] == variant
    assert [m["name"] for m in cfg["modules"]] == ["q_proj", "v_proj"]
    for key in ("encoder", "base_model", "base_model_revision", "r", "lora_alpha", "use_rslora", "latent", "head_in"):
        assert key in cfg


def test_loaded_weights_are_64_byte_aligned(tmp_path):
    """safetensors hands back tensors at arbitrary offsets of its buffer; BLAS picks its kernels (so its
    rounding) by alignment, so unaligned weights made a loaded checkpoint's float32 adapters differ in the
    last bits from the same checkpoint's in memory (seen on AMD EPYC, not on Xeon)."""
    tiny_checkpoint("S", seed=3).save(tmp_path / "native")
    back = load_checkpoint(tmp_path / "native")
    assert all(t.data_ptr() % 64 == 0 for t in back.state_dict.values())


@pytest.mark.parametrize("name", ["llama_L", "llama_M", "llama_S"])
def test_convert_t2l_to_native_keeps_outputs(fixtures_dir, tmp_path, name):
    imported = load_checkpoint(fixtures_dir / name)
    imported.save(tmp_path / "native")
    native = load_checkpoint(tmp_path / "native")
    assert native.sha256 == imported.sha256
    assert not any(k.startswith(("mean_recon", "std_recon")) for k in load_file(tmp_path / "native" / NATIVE_WEIGHTS))
    assert _bytes(LoraGenerator(native)) == _bytes(LoraGenerator(imported))


def test_content_hash_tracks_weights_and_config(tmp_path):
    a, b = tiny_checkpoint("L", seed=0), tiny_checkpoint("L", seed=1)
    assert a.sha256 != b.sha256 and a.sha256 == tiny_checkpoint("L", seed=0).sha256
    a.save(tmp_path / "n")
    assert load_checkpoint(tmp_path / "n", base_model="other/model").sha256 != a.sha256


# ---- sources ----

@pytest.mark.parametrize("uri,want", [
    ("hf://SakanaAI/text-to-lora", ("SakanaAI/text-to-lora", "", None)),
    ("hf://SakanaAI/text-to-lora/trained_t2l/mistral_7b_t2l",
     ("SakanaAI/text-to-lora", "trained_t2l/mistral_7b_t2l", None)),
    ("hf://o/r/sub@v1.0", ("o/r", "sub", "v1.0")),
    ("hf://o/r@0123abc", ("o/r", "", "0123abc")),
])
def test_parse_hf_uri(uri, want):
    assert parse_hf_uri(uri) == want


@pytest.mark.parametrize("uri", ["hf://", "hf://owner", "hf://o/r/../../etc", "hf://o/r@", "hf://o r/x"])
def test_malformed_hf_uri(uri):
    with pytest.raises(CheckpointError, match="hf://owner/repo"):
        parse_hf_uri(uri)


def test_hf_source_resolves_through_the_hub_cache(fixtures_dir, tmp_path):
    """The real huggingface_hub path, offline, against a local cache laid out as the hub client writes it."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--SakanaAI--text-to-lora"
    snap = repo / "snapshots" / commit / "trained_t2l" / "llama_s"
    snap.mkdir(parents=True)
    for f in ("hypermod.pt", "args.yaml", "adapter_config.json"):
        shutil.copy(fixtures_dir / "llama_S" / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ckpt = load_checkpoint("hf://SakanaAI/text-to-lora/trained_t2l/llama_s", cache_dir=tmp_path / "hub")
    assert ckpt.config.variant == "S"
    assert ckpt.sha256 == load_checkpoint(fixtures_dir / "llama_S").sha256


def test_hf_source_unavailable_offline_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot fetch hf://nobody/nothing"):
        load_checkpoint("hf://nobody/nothing", cache_dir=tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_directory_without_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path)


# ---- hostile and broken T2L checkpoints ----

def test_truncated_hypermod(t2l_dir):
    raw = (t2l_dir / "hypermod.pt").read_bytes()
    (t2l_dir / "hypermod.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="refusing .*hypermod.pt"):
        load_checkpoint(t2l_dir)


def test_missing_key_is_named(t2l_dir):
    sd = _state(t2l_dir)
    del sd["mixer.1.bias"]
    torch.save(sd, t2l_dir / "hypermod.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \[mixer.1.bias\]"):
        load_checkpoint(t2l_dir)


def test_unexpected_key_is_named(t2l_dir):
    sd = _state(t2l_dir)
    sd["backdoor.weight"] = torch.zeros(3)
    torch.save(sd, t2l_dir / "hypermod.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[backdoor.weight\]"):
        load_checkpoint(t2l_dir)


def test_wrong_shape_is_named(t2l_dir):
    sd = _state(t2l_dir)
    sd["heads.q_proj.weight"] = torch.zeros(7, 512)
    torch.save(sd, t2l_dir / "hypermod.pt")
    with pytest.raises(CheckpointError, match=r"'heads.q_proj.weight' has shape \[7, 512\], expected \[512, 512\]"):
        load_checkpoint(t2l_dir)


def test_non_tensor_entry_is_refused(t2l_dir):
    sd = _state(t2l_dir)
    sd["mixer.1.bias"] = "not a tensor"
    torch.save(sd, t2l_dir / "hypermod.pt")
    with pytest.raises(CheckpointError, match=r"non-tensor entries \[mixer.1.bias\]"):
        load_checkpoint(t2l_dir)


class _Payload:
    """Unpickling this would create a file: the classic pickle exploit."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_code_in_pickle_never_runs(t2l_dir, tmp_path, legacy):
    marker = tmp_path / "pwned"
    sd = _state(t2l_dir)
    sd["mixer.1.bias"] = _Payload(marker)
    if legacy:
        with open(t2l_dir / "hypermod.pt", "wb") as f:
            pickle.dump(sd, f)
    else:
        torch.save(sd, t2l_dir / "hypermod.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(t2l_dir)
    assert not marker.exists()


def test_yaml_tags_never_run(t2l_dir, tmp_path):
    marker = tmp_path / "pwned-yaml"
    (t2l_dir / "args.yaml").write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(CheckpointError, match="args.yaml"):
        load_checkpoint(t2l_dir)
    assert not marker.exists()


def test_unsupported_flags_are_named(t2l_dir):
    text = (t2l_dir / "args.yaml").read_text().replace("learnable_pos_emb: false", "learnable_pos_emb: true")
    (t2l_dir / "args.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="learnable_pos_emb"):
        load_checkpoint(t2l_dir)


def test_module_order_must_be_a_permutation(t2l_dir):
    with pytest.raises(CheckpointError, match="permutation"):
        load_checkpoint(t2l_dir, module_order=["q_proj", "k_proj"])


def test_non_finite_weights_refused(t2l_dir):
    sd = _state(t2l_dir)
    sd["mixer.1.bias"][0] = float("nan")
    torch.save(sd, t2l_dir / "hypermod.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(t2l_dir)


# ---- hostile and broken native checkpoints ----

@pytest.fixture
def native_dir(tmp_path):
    return tiny_checkpoint("M", seed=5).save(tmp_path / "native")


def test_truncated_safetensors(native_dir):
    raw = (native_dir / NATIVE_WEIGHTS).read_bytes()
    (native_dir / NATIVE_WEIGHTS).write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(native_dir)


def test_native_extra_tensor_is_named(native_dir):
    sd = load_file(native_dir / NATIVE_WEIGHTS)
    sd["extra"] = torch.zeros(1)
    save_file(sd, native_dir / NATIVE_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[extra\]"):
        load_checkpoint(native_dir)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(variant="XL"), "variant must be one of"),
    (lambda c: c.update(format_version=99), "format version 99"),
    (lambda c: c.update(surprise=1), r"unknown config keys \['surprise'\]"),
    (lambda c: c["modules"].append({"name": "wq", "d_in": 1, "d_out": 1}), "unknown target module 'wq'"),
    (lambda c: c.update(r=0), "r must be a positive integer"),
])
def test_invalid_native_config(native_dir, edit, match):
    cfg = json.loads((native_dir / NATIVE_CONFIG).read_text())
    edit(cfg)
    (native_dir / NATIVE_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(native_dir)


def test_config_not_json(native_dir):
    (native_dir / NATIVE_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(native_dir)
