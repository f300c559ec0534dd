"""A request that names no dtype gets the server's compute dtype: bfloat16 adapters from a bfloat16 server (what was
computed, losslessly, in half the bytes), float32 from a float32 one; ids and the cache stay consistent."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load

from generator.adapter import read_safetensors_metadata
from tests.service_server import ServiceProcess
from tests.test_service import ckpt_dir  # noqa: F401  (the checkpoint fixture)


@pytest.fixture(scope="module")
def bf16_server(ckpt_dir, tmp_path_factory):  # noqa: F811
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("log") / "serve.log",
                          {"LORAGEN_COMPUTE_DTYPE": "bfloat16"})
    yield proc
    proc.stop()


def dtypes(body: bytes) -> set[torch.dtype]:
    return {t.dtype for t in load(body).values()}


def test_bfloat16_compute_answers_bfloat16_unless_asked_otherwise(bf16_server):
    with httpx.Client(base_url=bf16_server.url, timeout=60) as c:
        plain = c.post("/v1/adapters", json={"task": "reverse the word"})
        named = c.post("/v1/adapters", json={"task": "reverse the word", "dtype": "bfloat16"})
        wide = c.post("/v1/adapters", json={"task": "reverse the word", "dtype": "float32"})
        batch = c.post("/v1/adapters/batch", json={"inputs": [{"task": "reverse the word"}]})
    assert plain.status_code == named.status_code == wide.status_code == batch.status_code == 200
    assert dtypes(plain.content) == {torch.bfloat16} and dtypes(wide.content) == {torch.float32}
    # naming the default is the same request: one id, one cache entry
    assert plain.headers["x-cache"] == "miss" and named.headers["x-cache"] == "hit"
    assert named.headers["x-adapter-id"] == plain.headers["x-adapter-id"] == batch.json()["adapters"][0]["id"]
    assert wide.headers["x-adapter-id"] != plain.headers["x-adapter-id"] and wide.headers["x-cache"] == "miss"
    assert '"dtype":"bfloat16"' in read_safetensors_metadata(plain.content)["loragen"]
    # lossless: the float32 adapter holds bfloat16-computed values, which bfloat16 stores exactly
    narrow, full = load(plain.content), load(wide.content)
    assert all(torch.equal(narrow[k], full[k].to(torch.bfloat16)) and torch.equal(narrow[k].float(), full[k])
               for k in full)
    assert 2 * sum(t.nbytes for t in narrow.values()) == sum(t.nbytes for t in full.values())


def test_float32_compute_answers_float32(ckpt_dir, tmp_path):  # noqa: F811
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            plain = c.post("/v1/adapters", json={"embedding": [0.5] * 384})
            named = c.post("/v1/adapters", json={"embedding": [0.5] * 384, "dtype": "float32"})
    finally:
        proc.stop()
    assert dtypes(plain.content) == {torch.float32}
    assert named.headers["x-cache"] == "hit" and named.headers["x-adapter-id"] == plain.headers["x-adapter-id"]
