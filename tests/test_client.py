"""loragen.client against real `loragen serve` processes (the demo checkpoint, a real Redis): generation by task,
document and embedding, fetch by id, batch, PEFT directories from both formats, typed errors, API keys, and
retries that honour the rate limiter's Retry-After."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel

from generator import DEMO_BUNDLE, DEMO_CHECKPOINTS
from loragen import (
    Adapter,
    AsyncClient,
    AuthError,
    BatchResult,
    Client,
    ConnectionFailed,
    InvalidInput,
    LoragenError,
    NotFound,
    ProtocolError,
    RateLimited,
)
from tests.service_server import ServiceProcess, free_port
from tests.test_peft_roundtrip import lora_params, recorded_warnings

DEMO = {"demo": DEMO_CHECKPOINTS["demo"]}  # one checkpoint: the demo base model's adapters, half the loading
E = 384  # the demo checkpoint's task_emb_dim
KEYS = ("key-auth", "key-retry", "key-short", "key-async")  # one per test: each rate-limit bucket starts full
ID = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def servers(redis_server, redis_prefix_module, tmp_path_factory):
    """This module's two servers, started together (each loads for seconds): an open one, and one with API keys
    and a rate limit of one request per 4 s (burst 1) per key, whose 429s say `Retry-After: 4` (a window wide
    enough that a test's next request always finds the bucket empty)."""
    logs = tmp_path_factory.mktemp("client")
    cache = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module}
    guarded = {**cache, "LORAGEN_API_KEYS": ",".join(KEYS), "LORAGEN_RATE_LIMIT_PER_S": "0.25", "LORAGEN_RATE_LIMIT_BURST": "1"}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ServiceProcess, DEMO, logs / "open.log", cache),
                   pool.submit(ServiceProcess, DEMO, logs / "guarded.log", guarded)]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < len(futures):
        for proc in started:
            proc.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServiceProcess:
    return servers[0]


@pytest.fixture(scope="module")
def guarded(servers) -> ServiceProcess:
    return servers[1]


@pytest.fixture
def client(server):
    with Client(server.url, timeout=60, total_timeout=120) as c:
        yield c


@pytest.fixture
def nowhere():
    """A client of a port nothing listens on: a call that sent anything would raise ConnectionFailed."""
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def demo_base(one_torch_thread):
    from generator.train.basemodel import load_base

    model, codec = load_base(DEMO_BUNDLE / "base")
    return model, torch.tensor([codec.prompt("cloud")])


def rate_limited_total(url: str) -> float:
    """The server's count of requests its rate limiter refused: observable state, where a test cannot see the
    client's retries (/metrics is open and not rate limited)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("loragen_requests_total{")
             and 'route="rate_limit"' in line and 'status="429"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


# ---- the module imports without torch ---------------------------------------------------------------------------


def test_client_imports_without_torch():
    code = "import loragen, loragen.client, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


# ---- generate, get, batch --------------------------------------------------------------------------------------


def test_generate_by_task_is_a_miss_then_a_hit_with_the_same_id(client):
    first = client.generate("Put the word inside square brackets, client edition.")
    assert ID.fullmatch(first.id) and first.cache == "miss" and first.format == "safetensors"
    assert first.weights is first.data and first.request_id
    assert first.peft_config["peft_type"] == "LORA" and first.peft_config["r"] == 8
    assert set(first.metadata) >= {"format", "adapter_config", "loragen"}
    assert json.loads(first.metadata["adapter_config"]) == first.peft_config
    assert first.provenance["base_model"] == first.peft_config["base_model_name_or_path"]

    again = client.generate("  Put the word inside square brackets, client edition. ")  # normalised: same request
    assert again.cache == "hit" and again.id == first.id and again.data == first.data
    assert again.request_id != first.request_id

    fetched = client.get(first.id)
    assert fetched.cache == "hit" and fetched.id == first.id and fetched.data == first.data


def test_generate_by_document_and_by_embedding(client):
    doc = client.generate(document="# Word game\n\nAnswer with the last three letters: river -> ver.")
    emb = client.generate(embedding=[1.0] * E, dtype="bfloat16")
    assert doc.cache == emb.cache == "miss" and doc.id != emb.id
    assert doc.provenance["dtype"] == "float32" and emb.provenance["dtype"] == "bfloat16"
    assert client.generate(embedding=[1.0] * E, dtype="bfloat16").id == emb.id  # same vector, same adapter
    assert client.generate(embedding=torch.ones(E), dtype="bfloat16").id == emb.id  # anything with .tolist()


@pytest.mark.parametrize("format", ["safetensors", "peft-tar"])
def test_save_pretrained_loads_into_peft_and_changes_the_output(client, demo_base, format, tmp_path):
    base, ids = demo_base
    adapter = client.generate("Write the word backwards, for the client test.", format=format)
    assert adapter.format == format
    if format == "peft-tar":
        assert adapter.data[257:262] == b"ustar" and adapter.weights != adapter.data  # a tar, unpacked
        assert client.get(adapter.id, format="peft-tar").data == adapter.data
    assert Adapter.from_bytes(adapter.data, format=format).peft_config == adapter.peft_config
    out = adapter.save_pretrained(tmp_path / "nested" / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    plain = client.get(adapter.id)  # the same adapter as one safetensors file
    assert (out / "adapter_model.safetensors").read_bytes() == plain.data
    assert json.loads((out / "adapter_config.json").read_text()) == plain.peft_config

    with recorded_warnings() as messages:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert not [m for m in messages if re.search(r"missing|unexpected", m, re.IGNORECASE)], messages
    from safetensors.torch import load

    tensors = load(plain.weights)
    params = lora_params(model)
    assert sorted(params) == sorted(k.removesuffix(".weight") + ".default.weight" for k in tensors)  # no key left out
    with torch.no_grad():
        before, after = base(ids).logits, model(ids).logits
    assert (after - before).abs().max() > 1e-3  # the adapter acts on the base model


def test_batch_answers_ids_in_order(client):
    inputs = ["Double every letter, batched.", {"document": "Say the last letter: river -> r."},
              {"embedding": [0.5] * E}]
    results = client.batch(inputs, dtype="bfloat16")
    assert [type(r) for r in results] == [BatchResult] * 3
    assert all(ID.fullmatch(r.id) and r.cache == "miss" and r.size > 0 for r in results)
    assert len({r.id for r in results}) == 3
    assert [r.cache for r in client.batch(inputs, dtype="bfloat16")] == ["hit"] * 3
    first = client.get(results[0].id)
    assert len(first.data) == results[0].size
    assert client.generate("Double every letter, batched.", dtype="bfloat16").id == results[0].id


def test_checkpoints_health_ready(client):
    (ckpt,) = client.checkpoints()
    assert ckpt["id"] == "demo" and ckpt["default"] is True and ckpt["task_emb_dim"] == E
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready["status"] == "ready" and ready["checkpoints"] == ["demo"]
    assert ready["cache"] == {"backend": "redis", "reachable": True}


# ---- bad input, before any request; typed errors from the server -----------------------------------------------


def test_bad_input_is_refused_before_any_request(nowhere):
    for call, match in [
        (lambda: nowhere.generate(), "exactly one of task, document, embedding"),
        (lambda: nowhere.generate("a", document="b"), r"got task, document"),
        (lambda: nowhere.generate(embedding=[1.0, float("nan")]), r"embedding\[1\] is nan"),
        (lambda: nowhere.generate("a", format="zip"), "unknown format 'zip'"),
        (lambda: nowhere.get(""), "adapter_id"),
        (lambda: nowhere.batch([]), "at least one input"),
        (lambda: nowhere.batch(["ok", {"task": "a", "document": "b"}]), r"inputs\[1\]: give exactly one"),
        (lambda: nowhere.batch([{"task": "a", "dtype": "float16"}]), r"inputs\[0\]: unknown field dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="embedding must be a list of numbers"):
        nowhere.generate(embedding="1, 2, 3")
    with pytest.raises(TypeError, match=r"embedding\[0\] must be a number"):
        nowhere.generate(embedding=[True])
    with pytest.raises(ConnectionFailed):  # the same client does send a valid call
        nowhere.health()
    with pytest.raises(ValueError, match="base_url must be an http"):
        Client("127.0.0.1:8000")
    with pytest.raises(ValueError, match="max_retries"):
        Client(max_retries=-1)
    with pytest.raises(ValueError, match="total_timeout"):
        Client(total_timeout=0)


def test_bytes_that_are_not_an_adapter_are_refused(tmp_path):
    for data, format, match in [(b"short", "safetensors", "shorter than its header length"),
                                (b"\xff" * 8 + b"{}", "safetensors", "a header of"),
                                (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "safetensors", "no adapter_config"),
                                (b"not a tar", "peft-tar", "not a readable tar")]:
        with pytest.raises(ProtocolError, match=match):
            Adapter.from_bytes(data, format=format)
    with tarfile.open(tmp_path / "other.tar", "w") as tar:
        tar.add(__file__, arcname="x/adapter_config.json")
    with pytest.raises(ProtocolError, match="holds no adapter_model.safetensors"):
        Adapter.from_bytes((tmp_path / "other.tar").read_bytes(), format="peft-tar")


def test_errors_carry_the_envelope_and_request_id(client):
    with pytest.raises(NotFound) as missing:
        client.get("0" * 64)
    e = missing.value
    assert (e.status, e.type, e.attempts) == (404, "not_found", 1)
    assert "no cached adapter" in e.message and e.request_id and e.request_id in str(e)

    with pytest.raises(InvalidInput) as empty:
        client.generate("")
    assert (empty.value.status, empty.value.type, empty.value.attempts) == (422, "invalid_input", 1)  # never retried
    assert empty.value.request_id and empty.value.request_id != e.request_id
    with pytest.raises(InvalidInput, match="checkpoint"):
        client.generate("x", checkpoint="no-such-checkpoint")
    with pytest.raises(NotFound):
        client.get("../health")  # one path segment, whatever it holds: never another route


def test_api_keys(guarded):
    with Client(guarded.url, api_key="wrong-key") as wrong:
        assert wrong.health() == {"status": "ok"} and wrong.ready()["status"] == "ready"  # open routes
        with pytest.raises(AuthError) as forbidden:
            wrong.checkpoints()
    assert (forbidden.value.status, forbidden.value.type, forbidden.value.attempts) == (403, "forbidden", 1)
    assert forbidden.value.request_id
    with Client(guarded.url) as anonymous, pytest.raises(AuthError) as unauthorized:
        anonymous.generate("x")
    assert (unauthorized.value.status, unauthorized.value.type) == (401, "unauthorized")
    with Client(guarded.url, api_key="key-auth") as right:
        assert right.checkpoints()[0]["id"] == "demo"


# ---- retries -----------------------------------------------------------------------------------------------------


def test_a_429_is_retried_after_retry_after(guarded):
    """With one retry allowed, only a retry that waited the 4 s Retry-After can succeed: the client's own first
    backoff (0.25-0.5 s) would meet an empty bucket again."""
    with Client(guarded.url, api_key="key-retry", max_retries=1, total_timeout=30) as c:
        assert c.checkpoints()  # takes the key's only token
        refused = rate_limited_total(guarded.url)
        assert c.checkpoints()[0]["id"] == "demo"  # refused with 429 at once, then answered
        assert rate_limited_total(guarded.url) == refused + 1


def test_rate_limited_when_retry_after_would_pass_total_timeout(guarded):
    with Client(guarded.url, api_key="key-short", max_retries=5, total_timeout=0.5) as c:
        c.checkpoints()  # takes the key's only token
        refused = rate_limited_total(guarded.url)
        with pytest.raises(RateLimited) as limited:
            c.checkpoints()
    e = limited.value
    assert (e.status, e.type, e.attempts) == (429, "rate_limited", 1)  # no wait past the bound
    assert 1.0 <= e.retry_after <= 4.0  # the server's whole seconds until the bucket's next token
    assert e.request_id and "rate limit" in e.message
    assert rate_limited_total(guarded.url) == refused + 1
    assert isinstance(e, LoragenError) and e.retryable


def test_connection_failures_are_retried_then_raised():
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=2, total_timeout=30) as c:
        with pytest.raises(ConnectionFailed) as failed:
            c.health()
    assert failed.value.attempts == 3 and failed.value.type == "connection_error" and failed.value.status is None
    assert isinstance(failed.value.__cause__, httpx.ConnectError)


# ---- the async client --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_client(server, tmp_path):
    async with AsyncClient(server.url, timeout=60) as c:
        first = await c.generate("Make the word upper case, asynchronously.", format="peft-tar")
        assert isinstance(first, Adapter) and first.cache == "miss" and first.format == "peft-tar"
        again = await c.generate("Make the word upper case, asynchronously.")
        assert again.cache == "hit" and again.id == first.id and again.weights == first.weights
        assert (await c.get(first.id)).data == first.weights
        (doc, emb) = await c.batch([{"document": "Shout it: abc -> ABC."}, {"embedding": [0.25] * E}])
        assert ID.fullmatch(doc.id) and ID.fullmatch(emb.id) and doc.id != emb.id
        assert (await c.checkpoints())[0]["id"] == "demo"
        assert await c.health() == {"status": "ok"} and (await c.ready())["status"] == "ready"
        with pytest.raises(NotFound) as missing:
            await c.get("f" * 64)
        assert missing.value.request_id and missing.value.status == 404
        with pytest.raises(InvalidInput):
            await c.generate(embedding=[1.0] * 3)  # the wrong size for the checkpoint: the server says so
        with pytest.raises(ValueError):
            await c.generate()
    assert first.save_pretrained(tmp_path / "a").joinpath("adapter_config.json").exists()


@pytest.mark.asyncio
async def test_async_client_retries_after_retry_after(guarded):
    async with AsyncClient(guarded.url, api_key="key-async", max_retries=1, total_timeout=30) as c:
        assert await c.health() == {"status": "ok"}  # open: takes no token
        await c.checkpoints()  # takes the key's only token
        refused = rate_limited_total(guarded.url)
        assert (await c.checkpoints())[0]["id"] == "demo"
        assert rate_limited_total(guarded.url) == refused + 1
    async with AsyncClient(guarded.url, api_key="key-async", max_retries=3, total_timeout=0.5) as c:
        with pytest.raises(RateLimited) as limited:
            await c.checkpoints()
        assert limited.value.attempts == 1 and 1.0 <= limited.value.retry_after <= 4.0
