"""The HTTP service end to end: a real `loragen serve` (uvicorn) process, httpx, PEFT on a tiny model."""

from __future__ import annotations

import concurrent.futures
import copy
import io
import json
import re
import tarfile

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load
from transformers import LlamaConfig, LlamaForCausalLM

from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec, HyperConfig, modules_for_base
from generator.hypernet import build_hypernet
from tests.service_server import ServiceProcess

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, max_position_embeddings=32)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = HyperConfig(variant="M", task_emb_dim=384, latent=16, head_in=32, n_layers=2,
                         modules=modules_for_base(BASE, ["q_proj", "v_proj"]), r=2, encoder=EncoderSpec(),
                         base_model="tiny-random/llama-32")
    net = build_hypernet(config)
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.mul_(0.1)  # keep B·A small next to the tiny model's weights
    return Checkpoint.from_module(net).save(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt_dir, tmp_path_factory):
    env = {"LORAGEN_MAX_TEXT_CHARS": "5000", "LORAGEN_MAX_BODY_BYTES": "65536"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("log") / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_error(r: httpx.Response, status: int, type_: str, match: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["type"] == type_ and match in body["message"], body
    assert r.headers["x-request-id"]


def test_generate_streams_a_peft_adapter(client):
    r = client.post("/generate", json={"task": "reverse the words of a sentence"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["content-length"]) == len(r.content)
    adapter_id = r.headers["x-adapter-id"]
    assert re.fullmatch(r"[0-9a-f]{64}", adapter_id) and r.headers["etag"] == f'"{adapter_id}"'
    assert r.headers["x-cache"] == "miss" and "attachment" in r.headers["content-disposition"]
    tensors = load(r.content)
    assert len(tensors) == 2 * 2 * 2  # layers x modules x (A, B)

    again = client.post("/v1/adapters", json={"task": "  reverse the words of a sentence "})
    assert again.headers["x-cache"] == "hit" and again.content == r.content
    assert again.headers["x-adapter-id"] == adapter_id


def test_adapter_loads_into_peft_and_changes_output(client, tmp_path):
    r = client.post("/generate", json={"task": "sort a list of numbers"})
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.manual_seed(0)
    base = LlamaForCausalLM(BASE).eval()
    before = base(ids).logits
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(r.content)
    meta_cfg = json.loads(json.loads(json.dumps(_metadata(r.content)))["adapter_config"])
    (out / "adapter_config.json").write_text(json.dumps(meta_cfg))
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    after = model(ids).logits
    assert (after - before).abs().max() > 1e-5


def _metadata(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def test_get_head_and_conditional_get(client):
    r = client.post("/generate", json={"task": "count vowels"})
    adapter_id = r.headers["x-adapter-id"]
    got = client.get(f"/v1/adapters/{adapter_id}")
    assert got.status_code == 200 and got.content == r.content
    head = client.head(f"/v1/adapters/{adapter_id}")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(r.content)
    cond = client.get(f"/v1/adapters/{adapter_id}", headers={"If-None-Match": f'"{adapter_id}"'})
    assert cond.status_code == 304
    assert_error(client.get("/v1/adapters/" + "0" * 64), 404, "not_found")
    assert_error(client.get("/v1/adapters/not-an-id"), 404, "not_found")
    assert_error(client.get(f"/v1/adapters/{adapter_id}?format=zip"), 422, "invalid_input", "format")


def test_peft_tar_format(client, tmp_path):
    r = client.post("/generate", json={"task": "count vowels", "format": "peft-tar"})
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    adapter_id = r.headers["x-adapter-id"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert sorted(tar.getnames()) == [f"{adapter_id}/adapter_config.json", f"{adapter_id}/adapter_model.safetensors"]
        tar.extractall(tmp_path, filter="data")
    cfg = json.loads((tmp_path / adapter_id / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny-random/llama-32"
    raw = client.get(f"/v1/adapters/{adapter_id}").content
    assert (tmp_path / adapter_id / "adapter_model.safetensors").read_bytes() == raw
    assert client.get(f"/v1/adapters/{adapter_id}?format=peft-tar").content == r.content


def test_multipart_document_upload(client):
    doc = ("Each line holds a list of integers. Output the list sorted in ascending order. " * 30).encode()
    r = client.post("/generate", files={"document": ("notes.md", doc, "text/markdown")}, data={"dtype": "bfloat16"})
    assert r.status_code == 200, r.text
    assert all(t.dtype == torch.bfloat16 for t in load(r.content).values())
    same = client.post("/generate", json={"document": doc.decode(), "dtype": "bfloat16"})
    assert same.headers["x-adapter-id"] == r.headers["x-adapter-id"]


def test_embedding_input_and_batch(client):
    emb = torch.randn(384, generator=torch.Generator().manual_seed(1)).tolist()
    one = client.post("/generate", json={"embedding": emb})
    assert one.status_code == 200
    r = client.post("/v1/adapters/batch", json={"inputs": [{"task": "add two numbers"}, {"embedding": emb},
                                                           {"document": "Translate English to French."}]})
    assert r.status_code == 200, r.text
    items = r.json()["adapters"]
    assert [i["cache"] for i in items][1] == "hit" and items[1]["id"] == one.headers["x-adapter-id"]
    assert metric(client, "loragen_batch_size_count") >= 1
    for item in items:
        got = client.get(f"/v1/adapters/{item['id']}")
        assert got.status_code == 200 and len(got.content) == item["size"]


def test_identical_concurrent_requests_generate_once(client, server):
    before = metric(client, "loragen_adapters_generated_total")
    body = {"task": "capitalise every word, concurrently"}

    def post(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/generate", json=body)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert metric(client, "loragen_adapters_generated_total") - before == 1


def test_checkpoints_health_ready_metrics_docs(client):
    cps = client.get("/v1/checkpoints").json()["checkpoints"]
    assert cps[0]["id"] == "tiny" and cps[0]["default"] and cps[0]["variant"] == "M"
    assert cps[0]["modules"] == {"q_proj": {"d_in": 32, "d_out": 32}, "v_proj": {"d_in": 32, "d_out": 16}}
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["cache"]["backend"] == "memory"
    text = client.get("/metrics").text
    assert "loragen_requests_total" in text and "loragen_generation_seconds_bucket" in text
    schema = client.get("/openapi.json").json()
    for path in ("/generate", "/v1/adapters", "/v1/adapters/{adapter_id}", "/v1/adapters/batch", "/v1/checkpoints",
                 "/health", "/ready", "/metrics"):
        assert path in schema["paths"], path
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("body,match", [
    ({"task": ""}, "empty"),
    ({"task": "   \n "}, "empty"),
    ({"task": "a", "document": "b"}, "exactly one"),
    ({}, "exactly one"),
    ({"embedding": [0.1] * 10}, "takes 384"),
    ({"embedding": [True] + [0.5] * 383}, "embedding"),  # a JSON boolean is not a number
    ({"embedding": ["0.5"] * 384}, "embedding"),  # nor is a string of one
    ({"task": "x", "checkpoint": "nope"}, "unknown checkpoint"),
    ({"task": "x", "dtype": "int8"}, "dtype"),
    ({"task": "x", "format": "zip"}, "format"),
    ({"task": "x" * 5001}, "limit is 5000"),
    ({"task": "x", "surprise": 1}, "surprise"),
    ({"task": 5}, "task"),
])
def test_invalid_input_is_422(client, body, match):
    assert_error(client.post("/generate", json=body), 422, "invalid_input", match)


def test_non_finite_embedding_is_422(client):
    r = client.post("/generate", content=b'{"embedding": [NaN' + b", 0.5" * 383 + b"]}",
                    headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_input")


def test_malformed_bodies(client):
    assert_error(client.post("/generate", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_input", "JSON")
    assert_error(client.post("/generate", files={"document": ("x.bin", b"\xff\xfe\x00", "application/octet-stream")}),
                 422, "invalid_input", "UTF-8")


def test_body_over_limit_is_413(client, server):
    assert_error(client.post("/generate", json={"document": "y" * 70_000}), 413, "payload_too_large")

    def chunks():  # no Content-Length: refused while it streams in
        for _ in range(100):
            yield b"z" * 1024

    assert_error(client.post("/generate", content=chunks(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")
    assert client.get("/health").status_code == 200


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/generate"), 405, "method_not_allowed")
