"""`loragen generate | inspect | convert`: real commands on real checkpoints; bad input is one line, exit 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftConfig
from safetensors.torch import load_file, save_file

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from generator.checkpoint import NATIVE_CONFIG, NATIVE_WEIGHTS
from generator.config import EncoderSpec
from service.cli import main
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A native checkpoint that takes the default MiniLM encoder's 384-dim embeddings."""
    ckpt = tiny_checkpoint("S", seed=2, e=384)
    assert ckpt.config.encoder == EncoderSpec()
    return ckpt.save(tmp_path_factory.mktemp("ckpt") / "native")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expect_usage_error(capsys, match, *argv):
    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit through SystemExit
        main(list(argv))
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def expect_error(capsys, match, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loragen: error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_generate_from_task(capsys, text_ckpt, tmp_path):
    code, out, _ = run(capsys, "generate", "--checkpoint", str(text_ckpt), "--task", "reverse the words",
                       "--out", str(tmp_path / "a"))
    assert code == 0 and "wrote" in out
    assert PeftConfig.from_pretrained(str(tmp_path / "a")).r == 2
    first = (tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes()
    run(capsys, "generate", "--checkpoint", str(text_ckpt), "--task", "  reverse the words ", "--out", str(tmp_path / "b"))
    assert (tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes() == first  # whitespace is normalised away
    run(capsys, "generate", "--checkpoint", str(text_ckpt), "--task", "sort the list", "--out", str(tmp_path / "c"))
    assert (tmp_path / "c" / ADAPTER_WEIGHTS).read_bytes() != first


def test_generate_from_long_document_and_dtype(capsys, text_ckpt, tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text(" ".join(f"Step {i}: add the numbers in column {i % 7} and carry." for i in range(600)))
    code, _, _ = run(capsys, "generate", "--checkpoint", str(text_ckpt), "--document", str(doc),
                     "--dtype", "bfloat16", "--out", str(tmp_path / "doc"))
    assert code == 0
    tensors = load_file(tmp_path / "doc" / ADAPTER_WEIGHTS)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


@pytest.mark.parametrize("shape", [(1024,), (1, 1024)])
def test_generate_from_embedding_matches_reference(capsys, fixtures_dir, tmp_path, shape):
    d = fixtures_dir / "llama_M"
    emb = load_file(d / "task_embs.safetensors")["task_embs"][2].reshape(shape).contiguous()
    save_file({"e": emb}, tmp_path / "e.safetensors")
    code, _, _ = run(capsys, "generate", "--checkpoint", str(d), "--embedding", str(tmp_path / "e.safetensors"),
                     "--out", str(tmp_path / "out"))
    assert code == 0
    got, want = load_file(tmp_path / "out" / ADAPTER_WEIGHTS), load_file(d / "expected" / "2" / ADAPTER_WEIGHTS)
    assert sorted(got) == sorted(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    cfg = json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())
    assert cfg["base_model_name_or_path"] == "tiny-random/llama-2L-64"


def test_base_model_override(capsys, fixtures_dir, tmp_path):
    d = fixtures_dir / "llama_M"
    save_file({"e": load_file(d / "task_embs.safetensors")["task_embs"][0]}, tmp_path / "e.safetensors")
    run(capsys, "generate", "--checkpoint", str(d), "--embedding", str(tmp_path / "e.safetensors"),
        "--base-model", "acme/llama-tiny", "--out", str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "acme/llama-tiny"


def test_inspect(capsys, fixtures_dir):
    code, out, _ = run(capsys, "inspect", str(fixtures_dir / "llama_L"))
    assert code == 0
    for needle in ("tiny-random/llama-2L-64", "variant                L", "v_proj 64->32, q_proj 64->64",
                   "rank                   4", "parameters             1252032"):
        assert needle in out, needle
    code, out, _ = run(capsys, "inspect", "--json", str(fixtures_dir / "llama_S"))
    info = json.loads(out)
    assert info["variant"] == "S" and info["n_layers"] == 2 and info["modules"]["v_proj"] == {"d_in": 64, "d_out": 32}


def test_convert_then_inspect_native(capsys, fixtures_dir, tmp_path):
    code, out, _ = run(capsys, "convert", str(fixtures_dir / "llama_S"), str(tmp_path / "native"))
    assert code == 0 and (tmp_path / "native" / NATIVE_WEIGHTS).is_file()
    sha = out.strip().split("sha256 ")[1]
    _, out, _ = run(capsys, "inspect", "--json", str(tmp_path / "native"))
    assert json.loads(out)["sha256"] == sha


def test_bad_inputs_are_one_line_exit_2(capsys, fixtures_dir, text_ckpt, tmp_path):
    out = str(tmp_path / "o")
    expect_error(capsys, "not found", "generate", "--checkpoint", str(tmp_path / "nope"), "--task", "x", "--out", out)
    expect_error(capsys, "document", "generate", "--checkpoint", str(text_ckpt), "--document",
                 str(tmp_path / "missing.md"), "--out", out)
    expect_error(capsys, "empty", "generate", "--checkpoint", str(text_ckpt), "--task", "   ", "--out", out)
    save_file({"e": torch.zeros(2, 1024)}, tmp_path / "wrong.safetensors")
    expect_error(capsys, "[E] or [1, E]", "generate", "--checkpoint", str(fixtures_dir / "llama_L"),
                 "--embedding", str(tmp_path / "wrong.safetensors"), "--out", out)
    save_file({"e": torch.zeros(1000)}, tmp_path / "short.safetensors")
    expect_error(capsys, "takes 1024", "generate", "--checkpoint", str(fixtures_dir / "llama_L"),
                 "--embedding", str(tmp_path / "short.safetensors"), "--out", out)
    save_file({"a": torch.zeros(1024), "b": torch.zeros(1024)}, tmp_path / "two.safetensors")
    expect_error(capsys, "exactly one tensor", "generate", "--checkpoint", str(fixtures_dir / "llama_L"),
                 "--embedding", str(tmp_path / "two.safetensors"), "--out", out)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 5)
    expect_error(capsys, "not a readable safetensors", "generate", "--checkpoint", str(fixtures_dir / "llama_L"),
                 "--embedding", str(tmp_path / "garbage.safetensors"), "--out", out)
    expect_error(capsys, "trust-remote-code", "generate", "--checkpoint", str(fixtures_dir / "llama_L"),
                 "--task", "add numbers", "--out", out)
    expect_usage_error(capsys, "invalid choice", "generate", "--checkpoint", "x", "--task", "t", "--out", out,
                       "--dtype", "int8")
    expect_usage_error(capsys, "one of the arguments", "generate", "--checkpoint", "x", "--out", out)
    expect_usage_error(capsys, "not allowed with", "generate", "--checkpoint", "x", "--task", "t",
                       "--document", "d", "--out", out)


def test_corrupt_and_unknown_variant_checkpoints(capsys, text_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(text_ckpt, broken)
    cfg = json.loads((broken / NATIVE_CONFIG).read_text())
    (broken / NATIVE_CONFIG).write_text(json.dumps({**cfg, "variant": "XL"}))
    expect_error(capsys, "variant must be one of", "inspect", str(broken))
    (broken / NATIVE_CONFIG).write_text(json.dumps(cfg))
    raw = (broken / NATIVE_WEIGHTS).read_bytes()
    (broken / NATIVE_WEIGHTS).write_bytes(raw[: len(raw) // 3])
    expect_error(capsys, "corrupt or truncated", "inspect", str(broken))


def test_console_script_runs(fixtures_dir, tmp_path):
    """The installed entry point, as a user runs it: exit codes and stderr from a real process."""
    script = Path(sys.executable).with_name("loragen")  # the console script pip installed beside python
    assert script.is_file(), "install the project (pip install -e .) so the loragen command exists"
    cmd = [str(script)]
    ok = subprocess.run([*cmd, "inspect", str(fixtures_dir / "llama_M")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "variant                M" in ok.stdout
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_serve_with_a_bad_checkpoint_is_one_line(tmp_path):
    """Checkpoints are loaded before the server starts, so a bad one is a clear line, not a traceback."""
    script = Path(sys.executable).with_name("loragen")
    (tmp_path / "broken").mkdir()
    for src, match in ((tmp_path / "none", "not found"), (tmp_path / "broken", "is not a checkpoint")):
        out = subprocess.run([str(script), "serve", "--checkpoint", f"x={src}", "--port", "0"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().count("\n") == 0 and match in out.stderr and "Traceback" not in out.stderr


def test_serve_with_no_cache_at_all_is_one_line(tmp_path):
    """LORAGEN_MEMORY_CACHE_BYTES=0 turns the near cache in front of Redis off; without Redis there would be
    no cache left, which the service refuses before loading anything."""
    script = Path(sys.executable).with_name("loragen")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    out = subprocess.run([str(script), "serve", "--port", "0"], capture_output=True, text=True, timeout=120,
                         env={**env, "LORAGEN_MEMORY_CACHE_BYTES": "0"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "LORAGEN_MEMORY_CACHE_BYTES=0" in out.stderr and "LORAGEN_REDIS_URL" in out.stderr


def test_generate_defaults_to_the_demo_bundle_and_try_runs_its_adapter(capsys, tmp_path):
    """`loragen generate` with no --checkpoint uses the demo bundle's T2L (as `serve` does); `loragen try`
    runs the adapter on the demo base model, as a PEFT directory and as the single file /generate returns."""
    from generator import DEMO_CHECKPOINTS
    from generator.pipeline import LoraGenerator, TaskInput

    code, out, _ = run(capsys, "generate", "--task", "Please start the word with a capital letter.", "--out",
                       str(tmp_path / "cap"))
    assert code == 0 and "base loragen/demo-base" in out, out
    (expected,) = LoraGenerator.load(str(DEMO_CHECKPOINTS["demo"])).generate(
        [TaskInput.task("Please start the word with a capital letter.")])
    assert (tmp_path / "cap" / ADAPTER_WEIGHTS).read_bytes() == expected.safetensors_bytes()

    code, by_dir, _ = run(capsys, "try", "--adapter", str(tmp_path / "cap"), "--examples", "capitalize")
    assert code == 0, by_dir
    rows = [line.split() for line in by_dir.splitlines()[1:-1]]
    assert len(rows) == 8 and all(r[1] == r[0].capitalize() for r in rows)  # input, expected, base, adapted, mark
    base_hits = sum(r[2] == r[1] for r in rows)
    adapted_hits = sum(r[3] == r[1] for r in rows)
    assert by_dir.splitlines()[-1] == f"exact match: base model {base_hits}/8, with adapter {adapted_hits}/8"
    assert adapted_hits >= base_hits + 4, by_dir  # the adapter, not the base, capitalises

    code, by_file, _ = run(capsys, "try", "--adapter", str(tmp_path / "cap" / ADAPTER_WEIGHTS), "--examples", "capitalize")
    assert code == 0 and by_file == by_dir
    code, bare, _ = run(capsys, "try", "--adapter", str(tmp_path / "cap"), "--input", "jcdg", "--input", "3 1 2")
    assert code == 0 and bare.splitlines()[0].split() == ["input", "base", "model", "with", "adapter"]
    assert [line.split()[0] for line in bare.splitlines()[1:]] == ["jcdg", "3"]


def test_try_bad_inputs_are_one_line_exit_2(capsys, text_ckpt, tmp_path):
    run(capsys, "generate", "--task", "reverse the word", "--out", str(tmp_path / "rev"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    run(capsys, "generate", "--checkpoint", str(text_ckpt), "--task", "x", "--out", str(tmp_path / "other"))
    adapter = str(tmp_path / "rev")
    expect_error(capsys, "no token for", "try", "--adapter", adapter, "--input", "héllo")
    expect_error(capsys, "is empty", "try", "--adapter", adapter, "--input", "")
    expect_error(capsys, "not found", "try", "--adapter", str(tmp_path / "missing"), "--input", "ab")
    expect_error(capsys, "not a safetensors file from loragen", "try", "--adapter", str(tmp_path / "junk.safetensors"),
                 "--input", "ab")
    expect_error(capsys, "PEFT directory holds", "try", "--adapter", str(tmp_path), "--input", "ab")
    expect_error(capsys, "is not in", "try", "--adapter", adapter, "--examples", "no_such_task")
    expect_error(capsys, "does not fit the base model", "try", "--adapter", str(tmp_path / "other"), "--input", "ab")
    expect_error(capsys, "no base/ and suite.json", "try", "--adapter", adapter, "--input", "ab", "--bundle", str(tmp_path))
    expect_error(capsys, "at least 1", "try", "--adapter", adapter, "--examples", "reverse", "-n", "0")
    expect_usage_error(capsys, "one of the arguments", "try", "--adapter", adapter)
