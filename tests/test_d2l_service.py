"""Doc-to-LoRA served like any checkpoint: a real `loragen serve` process with the reference fixture's D2L
checkpoint and base model, httpx, and PEFT on that base; and the `loragen` commands for the kind."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM

from tests.service_server import ServiceProcess
from tests.test_d2l_reference import BASE, FIX, RUN, text
from tests.test_service import assert_error

DOC = "doc1_long"  # 243 tokens: 3 chunks of 96, or 1 when unchunked


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"LORAGEN_BASE_DIRS": f"d2l={BASE}", "LORAGEN_CHUNK_TOKENS": "96", "LORAGEN_MAX_DOCUMENT_TOKENS": "300",
           "LORAGEN_MAX_CHUNKS": "2", "LORAGEN_MAX_TEXT_CHARS": "5000"}
    proc = ServiceProcess({"d2l": RUN}, tmp_path_factory.mktemp("log") / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_a_document_becomes_the_reference_adapter_over_http(client, tmp_path):
    """doc2_nonascii (2 chunks of 96, within the server's limits): the served adapter, loaded by PEFT onto the
    base, gives the reference's logits_with_lora."""
    r = client.post("/generate", json={"document": text("doc2_nonascii")})
    assert r.status_code == 200, r.text
    meta = json.loads(load_meta(r.content)["loragen"])
    assert meta["kind"] == "d2l" and meta["chunks"] == "2" and meta["chunk_tokens"] == "96"
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(r.content)
    (tmp_path / "lora" / "adapter_config.json").write_text(load_meta(r.content)["adapter_config"])
    expected = load_file(str(FIX / "expected" / "doc2_nonascii.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), tmp_path / "lora")
    with torch.no_grad():
        logits = model(expected["query_ids"]).logits
    assert (logits - expected["logits_with_lora"]).abs().max().item() <= 2e-5
    again = client.post("/generate", json={"document": text("doc2_nonascii")})
    assert again.content == r.content and again.headers["x-adapter-id"] == r.headers["x-adapter-id"]
    stats = client.get(f"/v1/adapters/{r.headers['x-adapter-id']}/stats")  # the playground's ΔW view of it
    assert stats.status_code == 200, stats.text
    view = stats.json()
    assert view["checkpoint"] == "d2l" and view["n_layers"] == 4 and len(view["norms"]["down_proj"]) == 4
    assert view["scaling"] == pytest.approx(2 * 8**1.5) and view["total_norm"] > 0  # PEFT's scaling is D2L's alpha


def load_meta(raw: bytes) -> dict:
    from generator.adapter import read_safetensors_metadata

    return read_safetensors_metadata(raw)


def test_a_file_upload_and_a_task_are_read_the_same_way(client):
    files = {"document": ("doc.txt", text("doc0_short").encode(), "text/plain")}
    up = client.post("/generate", files=files)
    js = client.post("/generate", json={"document": text("doc0_short")})
    assert up.status_code == js.status_code == 200
    assert up.content == js.content
    task = client.post("/generate", json={"task": "Answer in French."})
    assert task.status_code == 200 and json.loads(load_meta(task.content)["loragen"])["input_kind"] == "task"


def test_limits_and_bad_input_are_clear_errors(client):
    long = text(DOC) + " " + text(DOC)
    assert_error(client.post("/generate", json={"document": long}), 413, "payload_too_large",
                 "at most 300 (max_document_tokens)")
    assert_error(client.post("/generate", json={"document": text(DOC)}), 422, "invalid_input",
                 "3 chunks of 96 tokens; this server takes at most 2 (max_chunks)")
    assert_error(client.post("/generate", json={"embedding": [0.1] * 8}), 422, "invalid_input",
                 "Doc-to-LoRA checkpoint")


def test_ready_and_metrics_count_the_base_model(client):
    ready = client.get("/ready").json()
    memory = ready["model_memory"]["d2l"]
    assert memory["base_bytes"] > 0 and memory["hypernetwork_bytes"] == 1369728 * 4
    metrics = client.get("/metrics").text
    assert re.search(r'^loragen_model_bytes\{checkpoint="d2l",device="cpu",part="base"\} [0-9.e+]+$', metrics, re.M)
    (info,) = client.get("/v1/checkpoints").json()["checkpoints"]
    assert info["kind"] == "d2l" and info["rank"] == 8


def test_the_id_covers_the_chunking(tmp_path):
    """The same document on a server that does not chunk is another adapter, under another id."""
    env = {"LORAGEN_BASE_DIRS": f"d2l={BASE}", "LORAGEN_CHUNK_TOKENS": "0"}
    proc = ServiceProcess({"d2l": RUN}, tmp_path / "serve.log", env)
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            r = c.post("/generate", json={"document": text("doc0_short")})
    finally:
        proc.stop()
    assert r.status_code == 200
    meta = json.loads(load_meta(r.content)["loragen"])
    assert meta["chunk_tokens"] == "0" and meta["chunks"] == "1"
    tensors = load(r.content)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (16, 128)


def loragen(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_cli_convert_inspect_and_generate(tmp_path):
    native = tmp_path / "native"
    r = loragen("convert", str(RUN), str(native))
    assert r.returncode == 0, r.stderr
    assert "Doc-to-LoRA" in r.stdout and (native / "config.json").is_file()
    r = loragen("inspect", str(native), "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "d2l" and info["modules"] == {"down_proj": {"d_in": 128, "d_out": 64}}
    assert info["perceiver"]["latent_queries"] == 8 and info["chunk_tokens"] is None
    doc = tmp_path / "doc.txt"
    doc.write_text(text(DOC), encoding="utf-8")
    r = loragen("generate", "--checkpoint", str(native), "--document", str(doc), "--out", str(tmp_path / "a"),
                "--base-dir", str(BASE), "--chunk-tokens", "96")
    assert r.returncode == 0, r.stderr
    assert "3 chunk(s), rank 32 in r 32" in r.stdout
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and cfg["lora_alpha"] == pytest.approx(2 * 8**1.5 * 32)


@pytest.mark.parametrize("args, message", [
    (["--base-dir", "{tmp}"], "no config.json there"),
    ([], "cannot be found locally or fetched"),
    (["--base-dir", "{base}", "--chunk-tokens", "-1"], "--chunk-tokens -1"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello", encoding="utf-8")
    args = [a.format(tmp=tmp_path, base=BASE) for a in args]
    r = loragen("generate", "--checkpoint", str(RUN), "--document", str(doc), "--out", str(tmp_path / "o"), *args,
                cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_an_api_node_and_a_worker_agree_on_the_id_and_the_bytes(redis_server, redis_prefix, tmp_path):
    """Distributed mode: the API node holds no base model and hashes the base's files for the id; the `loragen
    worker` holding it generates through the Redis stream; the bytes equal direct generation."""
    from generator.checkpoint import load_checkpoint
    from generator.d2l.generator import DocLoraGenerator
    from generator.pipeline import TaskInput

    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix,
           "LORAGEN_BASE_DIRS": f"d2l={BASE}", "LORAGEN_CHUNK_TOKENS": "96"}
    worker = ServiceProcess({"d2l": RUN}, tmp_path / "worker.log", env, command="worker")
    api = ServiceProcess({"d2l": RUN}, tmp_path / "api.log", env, "--queue", "redis")
    try:
        with httpx.Client(base_url=api.url, timeout=90) as c:
            r = c.post("/generate", json={"document": text(DOC)})
            assert r.status_code == 200, r.text
            hit = c.post("/generate", json={"document": text(DOC)})
    finally:
        api.stop()
        worker.stop()
    assert hit.headers["x-adapter-id"] == r.headers["x-adapter-id"] and hit.content == r.content
    direct = DocLoraGenerator(load_checkpoint(RUN), base_dir=BASE, chunk_tokens=96)
    assert r.content == direct.generate([TaskInput.document(text(DOC))])[0].safetensors_bytes()


def test_the_playground_describes_a_doc_to_lora_checkpoint(client):
    r = client.get("/v1/playground")
    assert r.status_code == 200, r.text
    (entry,) = [c for c in r.json()["checkpoints"] if c["id"] == "d2l"]
    assert entry["base_model"] == "tiny-random/qwen3-d2l"
