"""The Doc-to-LoRA kind against the reference's own outputs (tests/fixtures/d2l-reference, see its README):
one test per stage, so that a mismatch names the stage. Tolerances are the fixture's suggested float32 bounds."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator.adapter import padded_rank
from generator.checkpoint import Checkpoint, load_checkpoint
from generator.d2l import context
from generator.d2l.config import D2LConfig
from generator.d2l.generator import DocLoraGenerator
from generator.d2l.released import import_d2l, read_args
from generator.errors import CheckpointError, DocumentTooLarge, InputError
from generator.pipeline import TaskInput

FIX = Path(__file__).resolve().parent / "fixtures" / "d2l-reference"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
RUN = FIX / "train_outputs" / "runs" / "fixture-run_00000000"
BASE = FIX / "tiny-random" / "qwen3-d2l"
CHUNK = MANIFEST["chunking"]["max_ctx_chunk_len"]
DOCS = [d["name"] for d in MANIFEST["documents"]]
ACT_TOL, LORA_TOL = 2e-5, 1e-6


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIX / "expected" / f"{name}.safetensors"))


def text(name: str) -> str:
    return (FIX / "documents" / f"{name}.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gen(one_torch_thread) -> DocLoraGenerator:
    return DocLoraGenerator(load_checkpoint(RUN), base_dir=BASE, chunk_tokens=CHUNK)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# ---- loading ----

def test_released_checkpoint_maps_to_the_manifest_config():
    config, tensors = import_d2l(RUN)
    hc = MANIFEST["checkpoint"]["non_tensor_entries"]["hypernet_config"]
    assert config.base_model == "tiny-random/qwen3-d2l"
    assert (config.n_layers, config.hidden, config.latent, config.r) == (4, 64, hc["latent_size"], 8)
    assert config.lora_alpha == pytest.approx(2 * 8**1.5, abs=0)
    assert [(m.name, m.d_in, m.d_out) for m in config.modules] == [("down_proj", 128, 64)]
    assert (config.perceiver.latent_queries, config.perceiver.blocks) == (8, 2)
    assert config.pre_head_layers == hc["num_pre_head_layers"] and config.use_bias
    assert set(tensors) == set(MANIFEST["checkpoint"]["state_dict"])


def test_a_run_a_checkpoint_and_a_weights_directory_load_the_same(tmp_path):
    by_run = load_checkpoint(RUN)
    by_step = load_checkpoint(RUN / "checkpoint-0")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(RUN / "checkpoint-0" / "pytorch_model.bin", lone)
    assert by_run.sha256 == by_step.sha256 == load_checkpoint(lone).sha256
    assert by_run.kind == "d2l"


def test_a_released_name_on_the_hub_resolves_through_the_hub_cache(tmp_path):
    """hf://SakanaAI/doc-to-lora/<name>, offline, against a local cache laid out as the hub client writes it, with
    the released layout under the name: args.yaml and checkpoint-<step>/pytorch_model.bin."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--SakanaAI--doc-to-lora"
    shutil.copytree(RUN, repo / "snapshots" / commit / "tiny_d2l")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ckpt = load_checkpoint("hf://SakanaAI/doc-to-lora/tiny_d2l", cache_dir=tmp_path / "hub")
    assert ckpt.kind == "d2l" and ckpt.sha256 == load_checkpoint(RUN).sha256


def test_args_yaml_with_python_tags_is_read_without_building_objects():
    raw = (RUN / "args.yaml").read_text()
    assert "!!python/object/apply:" in raw
    args = read_args(RUN / "args.yaml")
    assert args["eval_strategy"] == "no" and isinstance(args["optim"], str)
    assert args["lora_r"] == 8 and args["latent_size"] == 64


class Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-loragen-test",))


class Other:
    pass


@pytest.mark.parametrize("payload", [Evil(), Other()], ids=["reduce-to-a-function", "unknown-class"])
def test_a_pickle_naming_any_other_class_is_refused(tmp_path, payload):
    bad = tmp_path / "checkpoint-1"
    bad.mkdir()
    torch.save({"base_model_name_or_path": "x", "hypernet_config": payload, "ctx_encoder_args": None,
                "w": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(bad)


def test_convert_to_native_round_trips_and_inspect_names_the_kind(tmp_path):
    ckpt = load_checkpoint(RUN)
    ckpt.save(tmp_path / "native")
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["kind"] == "d2l" and list(cfg)[:2] == ["kind", "format_version"]
    again = load_checkpoint(tmp_path / "native")
    assert again.sha256 == ckpt.sha256 and isinstance(again.config, D2LConfig)
    info = again.describe()
    assert info["kind"] == "d2l" and info["rank"] == 8 and info["modules"] == {"down_proj": {"d_in": 128, "d_out": 64}}
    assert info["base_model"] == "tiny-random/qwen3-d2l" and info["chunk_tokens"] is None


def test_a_base_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(BASE)
    cfg.intermediate_size = 96  # down_proj would be 96 -> 64, the checkpoint's is 128 -> 64
    other = tmp_path / "other-base"
    shutil.copytree(BASE, other)
    cfg.save_pretrained(other)
    with pytest.raises(CheckpointError, match="does not match the checkpoint"):
        DocLoraGenerator(load_checkpoint(RUN), base_dir=other)


# ---- one test per stage ----

def test_affixes_are_derived_from_the_chat_template(gen):
    assert list(gen.affixes.prefix) == MANIFEST["chunking"]["affix_prefix_ids"]
    assert list(gen.affixes.suffix) == MANIFEST["chunking"]["affix_suffix_ids"]


@pytest.mark.parametrize("doc", DOCS)
def test_stage_context_tokens(gen, doc):
    assert context.tokenize(gen.base.tokenizer, text(doc)) == expected(doc)["ctx_ids_full"].tolist()


@pytest.mark.parametrize("doc", DOCS)
def test_stage_chunks(gen, doc):
    e = expected(doc)
    ids, mask = context.pad(gen.chunks(text(doc)), 0)
    assert torch.equal(ids, e["ctx_ids"]) and torch.equal(mask, e["ctx_attn_mask"])
    assert len(gen.chunks(text(doc))) == int(e["n_ctx_chunks"][0])


@pytest.mark.parametrize("doc", DOCS)
def test_stage_activations(gen, doc):
    e = expected(doc)
    acts, mask = gen.activations(gen.chunks(text(doc)))
    valid = mask.bool()[:, None, :, None].expand_as(acts)  # padding positions carry no meaning
    assert acts.shape == e["activations"].shape
    assert (acts - e["activations"]).abs()[valid].max().item() <= ACT_TOL


@pytest.mark.parametrize("doc", DOCS)
def test_stage_perceiver(gen, doc):
    e = expected(doc)
    with torch.inference_mode():
        out = gen.net.perceiver(*gen.activations(gen.chunks(text(doc))))
    assert max_diff(out, e["perceiver_out"]) <= ACT_TOL


@pytest.mark.parametrize("doc", DOCS)
def test_stage_chunk_loras(gen, doc):
    e = expected(doc)
    a, b = gen.chunk_loras(gen.chunks(text(doc)))["down_proj"]
    assert max_diff(a, e["chunk_lora.down_proj.A"]) <= LORA_TOL
    assert max_diff(b, e["chunk_lora.down_proj.B"]) <= LORA_TOL


@pytest.mark.parametrize("doc", DOCS)
def test_stage_combined_with_the_bias_lora(gen, doc):
    e = expected(doc)
    a, b = gen.lora(text(doc))["down_proj"]
    assert max_diff(a, e["combined_lora.down_proj.A"][0]) <= LORA_TOL
    assert max_diff(b, e["combined_lora.down_proj.B"][0]) <= LORA_TOL


@pytest.mark.parametrize("doc", DOCS)
def test_stage_combined_scaled(gen, doc):
    e = expected(doc)
    n = int(e["n_ctx_chunks"][0])
    a, b = gen.lora(text(doc), scalers=[0.5] * n, bias_scaler=0.5)["down_proj"]
    assert max_diff(a, e["combined_lora_scaled.down_proj.A"][0]) <= LORA_TOL
    assert max_diff(b, e["combined_lora_scaled.down_proj.B"][0]) <= LORA_TOL


@pytest.mark.parametrize("doc", DOCS)
def test_stage_logits_through_peft(gen, doc, tmp_path):
    """The exported adapter, loaded by PEFT onto the base, gives the reference's logits_with_lora."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    e = expected(doc)
    (adapter,) = gen.generate([TaskInput.document(text(doc))])
    adapter.save_pretrained(tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    with torch.no_grad():
        assert max_diff(base(e["query_ids"]).logits, e["logits_base"]) <= ACT_TOL
    model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert max_diff(model(e["query_ids"]).logits, e["logits_with_lora"]) <= ACT_TOL


# ---- export ----

def test_export_pads_the_rank_for_vllm_and_scales_like_d2l(gen):
    (adapter,) = gen.generate([TaskInput.document(text("doc2_nonascii"))])  # 2 chunks: rank 24, padded to 32
    rank = 3 * 8
    assert adapter.config["r"] == padded_rank(rank) == 32
    assert adapter.config["use_rslora"] is False
    assert adapter.config["lora_alpha"] / adapter.config["r"] == pytest.approx(gen.config.lora_alpha)
    a = adapter.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b = adapter.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (32, 128) and b.shape == (64, 32)
    assert not a[rank:].any() and not b[:, rank:].any() and a[:rank].abs().sum() > 0
    assert adapter.provenance["kind"] == "d2l" and adapter.provenance["chunks"] == "2"
    assert adapter.provenance["rank"] == "24" and adapter.provenance["base_sha256"] == gen.base.sha256


def test_the_exported_adapter_passes_the_vllm_check(gen, tmp_path):
    from loragen.check import run_check

    (adapter,) = gen.generate([TaskInput.document(text("doc1_long"))])
    path = tmp_path / "doc.safetensors"
    path.write_bytes(adapter.safetensors_bytes())
    result = run_check(str(path), "vllm", 32)
    assert result.problems == []


def test_an_adapter_does_not_depend_on_its_batch(gen):
    docs = [TaskInput.document(text(d)) for d in DOCS]
    together = gen.generate(docs)
    alone = [gen.generate([d])[0] for d in docs]
    assert [a.safetensors_bytes() for a in together] == [a.safetensors_bytes() for a in alone]


# ---- bad input ----

def test_an_embedding_is_refused_with_a_clear_error(gen):
    with pytest.raises(InputError, match="send the document or task description as text"):
        gen.generate([TaskInput.from_embedding([0.1, 0.2])])


def test_limits_name_what_was_passed():
    ckpt = load_checkpoint(RUN)
    few_tokens = DocLoraGenerator(ckpt, base_dir=BASE, chunk_tokens=CHUNK, max_tokens=100)
    with pytest.raises(DocumentTooLarge, match=r"243 tokens .* at most 100 \(max_document_tokens\)"):
        few_tokens.generate([TaskInput.document(text("doc1_long"))])
    few_chunks = DocLoraGenerator(ckpt, base=few_tokens.base, chunk_tokens=CHUNK, max_chunks=2)
    with pytest.raises(InputError, match=r"3 chunks .* at most 2 \(max_chunks\)"):
        few_chunks.generate([TaskInput.document(text("doc1_long"))])
    assert few_chunks.generate([TaskInput.document(text("doc0_short"))])  # within both limits


def test_a_checkpoint_of_either_kind_validates_its_tensors():
    config, tensors = import_d2l(RUN)
    tensors["head.weight"] = tensors["head.weight"][:, :, :10]
    with pytest.raises(CheckpointError, match="head.weight"):
        Checkpoint.from_state_dict(config, tensors)
