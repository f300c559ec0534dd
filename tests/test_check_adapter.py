"""`loragen check-adapter` and `loragen.check`: real adapters from `loragen generate` (the demo checkpoint) pass
for PEFT, vLLM and LoRAX; each problem, made by editing a real adapter, is one line and exit 2; input that is not
an adapter is one error line and exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator import DEMO_BUNDLE, DEMO_CHECKPOINTS
from loragen.check import VLLM_MAX_LORA_RANKS, UnreadableAdapter, check_adapter, run_check
from service.cli import main

LOCAL = Path(sys.executable).with_name("loragen")
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")]  # the demo's
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
HIDDEN = json.loads((DEMO_BUNDLE / "base" / "config.json").read_text())["hidden_size"]  # q_proj and v_proj: HIDDEN->HIDDEN


def generate(out: Path, dtype: str) -> Path:
    """A real adapter from the real command, on the demo checkpoint."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(LOCAL), "generate", "--checkpoint", str(DEMO_CHECKPOINTS["demo"]), "--task",
                           "Put the word inside square brackets.", "--dtype", dtype, "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("real") / "float32", "float32")


@pytest.fixture(scope="module")
def real_bf16(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("real") / "bfloat16", "bfloat16")


@pytest.fixture
def edited(real, tmp_path):
    """edited(config=..., tensors=...): a copy of the real adapter with its config and/or tensors changed by
    functions that take the dict and change it in place; the safetensors metadata keeps the original config."""

    def make(config=None, tensors=None) -> Path:
        out = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(real, out)
        if config is not None:
            data = json.loads((out / "adapter_config.json").read_text())
            config(data)
            (out / "adapter_config.json").write_text(json.dumps(data))
        if tensors is not None:
            weights = out / "adapter_model.safetensors"
            with open(weights, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                metadata = json.loads(f.read(n))["__metadata__"]
            data = load_file(weights)
            tensors(data)
            save_file(data, weights, metadata=metadata)
        return out

    return make


def run(capsys, *argv):
    code = main(["check-adapter", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def expect_problem(capsys, match: str, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and not err, (out, err)
    lines = out.strip().splitlines()
    assert any(match in line for line in lines), lines
    assert all(line.startswith(f"{argv[0]}: ") for line in lines), lines  # one line per problem, naming the adapter
    return lines


def expect_ok(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and not err, (out, err)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ok: "), lines
    return lines[0]


def expect_error(capsys, match: str, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loragen: error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]


# ---- real adapters pass ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumer", ["peft", "vllm", "lorax"])
def test_a_real_adapter_directory_passes(capsys, real, real_bf16, consumer):
    line = expect_ok(capsys, real, "--for", consumer)
    assert f"fit for {consumer}" in line and "r 8" in line and "16 tensors (float32)" in line, line
    assert "base loragen/demo-base" in line and "target modules q_proj, v_proj" in line, line
    assert "16 tensors (bfloat16)" in expect_ok(capsys, real_bf16, "--for", consumer)


def test_a_real_safetensors_file_passes_with_the_config_from_its_metadata(capsys, real):
    line = expect_ok(capsys, real / "adapter_model.safetensors", "--for", "vllm", "--max-lora-rank", "8")
    assert "r 8" in line and "lora_alpha 16" in line
    assert expect_ok(capsys, real / "adapter_model.safetensors").startswith("ok: ")  # --for peft by default


def test_the_python_api_reads_paths_and_bytes(real):
    weights = (real / "adapter_model.safetensors").read_bytes()
    assert check_adapter(real, "vllm") == check_adapter(weights, "vllm") == check_adapter(str(real)) == []
    assert run_check(weights, "lorax").summary == run_check(real, "lorax").summary


def test_the_installed_command_runs(real):
    done = subprocess.run([str(LOCAL), "check-adapter", str(real), "--for", "vllm"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ok: ") and not done.stderr, (done.stdout, done.stderr)


def test_importing_the_checker_imports_no_torch():
    code = "import sys, loragen.check; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_vllm_max_lora_ranks_are_the_installed_vllms():
    lora = pytest.importorskip("vllm.config.lora", reason="vLLM is not installed: nothing to compare the list with")
    assert VLLM_MAX_LORA_RANKS == typing.get_args(lora.MaxLoRARanks)


# ---- each problem is reported ----------------------------------------------------------------------------------


def test_dora_is_reported(capsys, edited):
    flagged = edited(config=lambda c: c.update(use_dora=True))
    for consumer in ("peft", "vllm", "lorax"):
        expect_problem(capsys, "use_dora is true", flagged, "--for", consumer)
    magnitudes = edited(tensors=lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(HIDDEN)}))
    expect_problem(capsys, "DoRA magnitude vectors", magnitudes)


def test_modules_to_save_is_reported(capsys, edited):
    expect_problem(capsys, "modules_to_save is ['lm_head']", edited(config=lambda c: c.update(modules_to_save=["lm_head"])),
                   "--for", "vllm")
    saved = edited(tensors=lambda t: t.update({"base_model.model.lm_head.modules_to_save.weight": torch.zeros(4, 4)}))
    expect_problem(capsys, "modules_to_save weights", saved)
    stray = edited(tensors=lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(4, 4)}))
    expect_problem(capsys, "tensors that are not LoRA weights, e.g. base_model.model.lm_head.weight", stray)


def test_trained_biases_are_reported(capsys, edited):
    expect_problem(capsys, "bias is 'all'", edited(config=lambda c: c.update(bias="all")))
    expect_problem(capsys, "lora_bias is true", edited(config=lambda c: c.update(lora_bias=True)), "--for", "vllm")
    bias = edited(tensors=lambda t: t.update({f"{Q0}.lora_B.bias": torch.zeros(HIDDEN)}))
    expect_problem(capsys, "trained biases", bias)


def test_a_wrong_shape_is_reported(capsys, edited):
    def transpose_a(t):
        t[f"{Q0}.lora_A.weight"] = t[f"{Q0}.lora_A.weight"].T.contiguous()  # (d_in, r) instead of (r, d_in)

    lines = expect_problem(capsys, "do not have rank 8 (r in the config)", edited(tensors=transpose_a))
    assert len(lines) == 1 and f"model.layers.0.self_attn.q_proj: lora_A [{HIDDEN}, 8]" in lines[0], lines
    flat = edited(tensors=lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(HIDDEN * 8)}))
    expect_problem(capsys, "must both be 2-D", flat)


def test_a_rank_other_than_the_configs_is_reported(capsys, edited):
    lines = expect_problem(capsys, "do not have rank 4 (r in the config)", edited(config=lambda c: c.update(r=4)))
    assert len(lines) == len(MODULES)  # every module, one line each


def test_a_lone_lora_a_is_reported(capsys, edited):
    expect_problem(capsys, "model.layers.0.self_attn.q_proj: has no lora_B",
                   edited(tensors=lambda t: t.pop(f"{Q0}.lora_B.weight")))


def test_target_modules_must_match_the_weights(capsys, edited):
    expect_problem(capsys, "v_proj: has LoRA weights, but target_modules ['q_proj'] does not name it",
                   edited(config=lambda c: c.update(target_modules=["q_proj"])))
    expect_problem(capsys, "target_modules names k_proj, but the file has no weights for it",
                   edited(config=lambda c: c.update(target_modules=["q_proj", "k_proj", "v_proj"])))
    assert check_adapter(edited(config=lambda c: c.update(target_modules=r".*\.(q|v)_proj"))) == []  # a regex


def test_a_config_that_is_not_a_lora_is_reported(capsys, edited):
    expect_problem(capsys, "peft_type is 'IA3', not 'LORA'", edited(config=lambda c: c.update(peft_type="IA3")))
    expect_problem(capsys, "r is 0", edited(config=lambda c: c.update(r=0)))
    expect_problem(capsys, "lora_alpha is 'x'", edited(config=lambda c: c.update(lora_alpha="x")))
    expect_problem(capsys, "target_modules is []", edited(config=lambda c: c.update(target_modules=[])))


def test_rank_12_fits_vllm_below_its_max_lora_rank_only(capsys, edited):
    """vLLM pads an adapter's rank up to --max-lora-rank (its LoRA slots are max_lora_rank wide), so r 12 loads
    with --max-lora-rank 16; its own check is r <= max_lora_rank, and the values it takes are a fixed list."""
    def rank(r):
        def change(t):
            for name in list(t):
                if name.endswith("lora_A.weight"):
                    t[name] = torch.randn(r, HIDDEN)
                else:
                    t[name] = torch.randn(HIDDEN, r)
        return change

    twelve = edited(config=lambda c: c.update(r=12), tensors=rank(12))
    expect_problem(capsys, "r 12 is above --max-lora-rank 8: start vLLM with --max-lora-rank 16", twelve,
                   "--for", "vllm", "--max-lora-rank", "8")
    expect_ok(capsys, twelve, "--for", "vllm", "--max-lora-rank", "16")
    expect_ok(capsys, twelve, "--for", "vllm")
    expect_ok(capsys, twelve, "--for", "lorax")  # LoRAX pads any rank
    expect_error(capsys, "vLLM accepts --max-lora-rank 1, 8, 16, 32, 64, 128, 256, 320, 512 only, not 12", twelve,
                 "--for", "vllm", "--max-lora-rank", "12")
    huge = edited(config=lambda c: c.update(r=1024), tensors=rank(1024))
    expect_problem(capsys, "r 1024 is above 512, the largest --max-lora-rank vLLM accepts", huge, "--for", "vllm")
    expect_problem(capsys, "r 1024 is above --max-lora-rank 64", huge, "--max-lora-rank", "64")


def test_a_rank_pattern_is_read_for_shapes_and_refused_for_lorax(capsys, edited):
    def q_rank_4(t):
        for name in list(t):
            if ".q_proj." in name:
                t[name] = t[name][:4] if name.endswith("lora_A.weight") else t[name][:, :4].contiguous()

    patterned = edited(config=lambda c: c.update(rank_pattern={"q_proj": 4}), tensors=q_rank_4)
    expect_ok(capsys, patterned)
    expect_ok(capsys, patterned, "--for", "vllm")
    expect_problem(capsys, "rank_pattern is {'q_proj': 4}: LoRAX scales every module by r and lora_alpha alone",
                   patterned, "--for", "lorax")
    expect_problem(capsys, "do not have rank 4 (rank_pattern in the config)",
                   edited(config=lambda c: c.update(rank_pattern={"q_proj": 4})))


def test_a_local_path_as_base_model_is_reported_for_servers(capsys, edited):
    local = edited(config=lambda c: c.update(base_model_name_or_path="/home/me/models/llama-3-8b"))
    for consumer in ("vllm", "lorax"):
        expect_problem(capsys, "base_model_name_or_path '/home/me/models/llama-3-8b' is a local path, not a hub id",
                       local, "--for", consumer)
    expect_ok(capsys, local)  # PEFT loads onto whatever base model it is given
    expect_problem(capsys, "base_model_name_or_path 'llama' is not a hub id",
                   edited(config=lambda c: c.update(base_model_name_or_path="llama")), "--for", "vllm")
    expect_problem(capsys, "base_model_name_or_path is missing",
                   edited(config=lambda c: c.pop("base_model_name_or_path")), "--for", "vllm")


def test_dtypes_servers_do_not_take_are_reported(capsys, edited):
    double = edited(tensors=lambda t: t.update({f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"].double()}))
    expect_problem(capsys, "tensors of dtype F64: LoRA weights here must be float32, float16, bfloat16", double,
                   "--for", "vllm")
    expect_ok(capsys, double)  # PEFT loads float64
    ints = edited(tensors=lambda t: t.update({f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"].to(torch.int8)}))
    expect_problem(capsys, "tensors of dtype I8", ints)


def test_features_vllm_refuses_are_reported(capsys, edited):
    expect_problem(capsys, "init_lora_weights is 'pissa'", edited(config=lambda c: c.update(init_lora_weights="pissa")),
                   "--for", "vllm")
    expect_problem(capsys, "layer_replication is set", edited(config=lambda c: c.update(layer_replication=[[0, 2]])),
                   "--for", "vllm")
    expect_ok(capsys, edited(config=lambda c: c.update(init_lora_weights="gaussian")), "--for", "vllm")


def test_an_embedding_lora_is_reported_for_lorax(capsys, edited):
    def add_embedding(t):
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 100)
        t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(HIDDEN, 8)

    embedding = edited(config=lambda c: c.update(target_modules=["q_proj", "v_proj", "embed_tokens"]),
                       tensors=add_embedding)
    expect_ok(capsys, embedding)
    expect_problem(capsys, "an embedding LoRA, which LoRAX does not load", embedding, "--for", "lorax")


def test_several_problems_are_one_line_each(capsys, edited):
    bad = edited(config=lambda c: c.update(use_dora=True, modules_to_save=["lm_head"], base_model_name_or_path="./m"))
    lines = expect_problem(capsys, "use_dora", bad, "--for", "vllm")
    assert len(lines) == 3, lines


# ---- input that is not an adapter --------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_exit_2(capsys, real, tmp_path):
    expect_error(capsys, "no such file or directory", tmp_path / "nothing")
    expect_error(capsys, "not a safetensors file", Path(__file__).resolve().parents[1] / "pyproject.toml")
    expect_error(capsys, "no adapter_model.safetensors in the directory", tmp_path)

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(real / "adapter_model.safetensors", no_config)
    expect_error(capsys, "no adapter_config.json in the directory", no_config)

    bad_json = tmp_path / "bad-json"
    shutil.copytree(real, bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    expect_error(capsys, "adapter_config.json is not valid JSON", bad_json)

    bare = tmp_path / "bare.safetensors"  # safetensors without loragen's metadata: no config to read
    save_file(load_file(real / "adapter_model.safetensors"), bare)
    expect_error(capsys, "carries no adapter_config in its metadata", bare)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((real / "adapter_model.safetensors").read_bytes()[:-100])
    expect_error(capsys, "not a safetensors file: its tensors hold", cut)

    with pytest.raises(SystemExit):  # argparse: an unknown consumer
        main(["check-adapter", str(real), "--for", "tgi"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_api_raises_unreadable_adapter(tmp_path):
    with pytest.raises(UnreadableAdapter, match="not a safetensors file"):
        check_adapter(b"\x00" * 4)
    with pytest.raises(ValueError, match="unknown consumer"):
        check_adapter(tmp_path, "tgi")
