"""Security on real `loragen serve` processes: API keys on every route but the open ones, per-key and
per-IP rate limits (in Redis across replicas, in process otherwise), hostile checkpoints refused before
serving, trust_remote_code off by default, the hf:// allow-list, no secret in any log, and a request id on
every response and log line."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from starlette.requests import Request

from generator.checkpoint import load_checkpoint
from generator.errors import CheckpointError
from service.app import _client_id
from service.settings import Settings
from tests.helpers import wait_until
from tests.service_server import ServiceProcess
from tests.test_service import assert_error, ckpt_dir  # noqa: F401  (the checkpoint fixture)

KEYS = ("key-alpha-0123456789", "key-beta-9876543210")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(ckpt_dir, tmp_path_factory):  # noqa: F811
    """API keys, a per-key limit of 3 requests then one per 20 s (in process: no Redis), access log on."""
    env = {"LORAGEN_API_KEYS": ",".join(KEYS), "LORAGEN_METRICS_PUBLIC": "false", "LORAGEN_RATE_LIMIT_PER_S": "0.05",
           "LORAGEN_RATE_LIMIT_BURST": "3"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("keyed") / "serve.log", env, "--log-level", "info")
    yield proc
    proc.stop()


def test_every_route_but_the_open_ones_needs_a_key(keyed):
    c = httpx.Client(base_url=keyed.url, timeout=60)
    schema = c.get("/openapi.json", headers=_auth(KEYS[1])).json()  # key beta: alpha's bucket is for the next test
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/no/such/route"),
               ("DELETE", "/v1/adapters/" + "0" * 64)]
    assert len(routes) >= 12
    for method, path in routes:
        path = path.replace("{adapter_id}", "0" * 64)
        if path in ("/health", "/ready"):
            assert c.request(method, path).status_code == 200, path  # probes stay open
            continue
        r = c.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.status_code)
        if method != "HEAD":
            assert_error(r, 401, "unauthorized")
            assert_error(c.request(method, path, headers=_auth("not-a-key")), 403, "forbidden")


def test_rate_limit_per_key_in_process(keyed):
    c = httpx.Client(base_url=keyed.url, timeout=60)
    statuses = [c.get("/v1/checkpoints", headers=_auth(KEYS[0])).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = c.get("/v1/checkpoints", headers=_auth(KEYS[0]))
    assert_error(r, 429, "rate_limited", "rate limit")
    assert 1 <= int(r.headers["retry-after"]) <= 20  # one token per 20 s
    assert_error(c.post("/generate", json={"task": "x"}, headers=_auth(KEYS[0])), 429, "rate_limited")
    # another key has its own bucket; the probes are never limited
    assert c.get("/v1/checkpoints", headers=_auth(KEYS[1])).status_code == 200
    assert all(c.get("/health").status_code == 200 for _ in range(10))
    assert all(c.get("/ready").status_code == 200 for _ in range(10))


def test_request_id_on_every_response_and_log_line(keyed):
    c = httpx.Client(base_url=keyed.url, timeout=60)
    sent = {}
    calls = [("GET", "/health", None, {}), ("GET", "/v1/checkpoints", None, _auth(KEYS[1])),
             ("GET", "/v1/adapters/" + "0" * 64, None, _auth(KEYS[1])), ("GET", "/v1/checkpoints", None, {}),
             ("POST", "/generate", b'{"task": ""}', _auth(KEYS[1])), ("GET", "/nope", None, _auth(KEYS[1])),
             ("HEAD", "/health", None, {})]
    for i, (method, path, body, headers) in enumerate(calls):
        rid = f"sec-check-{i}"
        r = c.request(method, path, content=body, headers={**headers, "X-Request-Id": rid,
                                                           "content-type": "application/json"})
        assert r.headers["x-request-id"] == rid, (method, path)
        sent[rid] = r.status_code
    assert len(set(sent.values())) >= 4 and max(sent.values()) < 500, sent  # successes and several kinds of error
    # a fresh id when the client sends none
    assert re.fullmatch(r"[0-9a-f]{32}", c.get("/health").headers["x-request-id"])

    def access_lines_written() -> bool:  # uvicorn writes a request's access line after its response
        whole = keyed.log_path.read_text(errors="replace").splitlines(keepends=True)
        return all(any(line.endswith(f" request_id={rid}\n") and "HTTP/1.1" in line for line in whole) for rid in sent)

    wait_until(access_lines_written, timeout_s=30)
    lines = keyed.log_records()  # every line from the first, startup included, ends in request_id=
    assert len(lines) > len(sent)
    for rid in sent:  # the access line of each request carries its id
        assert any(f"request_id={rid}" in line and "HTTP/1.1" in line for line in lines), rid


def test_in_process_worker_lines_carry_the_request_id(ckpt_dir, tmp_path):  # noqa: F811
    """The worker thread that generates a request's adapter logs under that request's id."""
    node = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log", {}, "--log-level", "debug")
    try:
        c = httpx.Client(base_url=node.url, timeout=60)
        for rid in ("inproc-1", "inproc-2"):
            r = c.post("/generate", json={"task": f"logged under {rid}"}, headers={"X-Request-Id": rid})
            assert r.status_code == 200
    finally:
        node.stop()
    lines = node.log_records()
    for rid in ("inproc-1", "inproc-2"):
        assert any("generated 1 adapters" in line and line.endswith(f" request_id={rid}") for line in lines), rid


@pytest.fixture(scope="module")
def shared_limit(ckpt_dir, redis_server, redis_prefix_module, tmp_path_factory):  # noqa: F811
    """Two open replicas sharing a Redis: 3 requests per client IP, then one per 20 s, across both."""
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module,
           "LORAGEN_REDIS_TIMEOUT_S": "0.5", "LORAGEN_RATE_LIMIT_PER_S": "0.05", "LORAGEN_RATE_LIMIT_BURST": "3",
           "LORAGEN_MEMORY_CACHE_BYTES": "0"}  # reads go to Redis, where a test below corrupts an entry
    d = tmp_path_factory.mktemp("shared")
    procs = [ServiceProcess({"tiny": ckpt_dir}, d / f"serve{i}.log", env, "--log-level", "info") for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def test_rate_limit_holds_across_replicas_and_degrades_without_redis(shared_limit, redis_server, redis_prefix_module):
    a, b = (httpx.Client(base_url=p.url, timeout=60) for p in shared_limit)
    statuses = [(a if i % 2 else b).get("/v1/checkpoints").status_code for i in range(8)]
    assert statuses == [200, 200, 200] + [429] * 5  # one bucket for both replicas, not 3 each
    limited = b.get("/v1/checkpoints")
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    keys = [k.decode() for k in redis_server.client().keys(redis_prefix_module + "ratelimit:*")]
    assert keys == [f"{redis_prefix_module}ratelimit:ip:127.0.0.1"]
    assert 0 < redis_server.client().pttl(keys[0]) <= 61_000  # idle buckets expire
    redis_server.require_managed("stopping Redis")
    redis_server.stop()
    try:  # Redis gone: each replica limits on its own (a fresh bucket each), and keeps answering
        degraded = [a.get("/v1/checkpoints").status_code for _ in range(5)]
        assert degraded == [200, 200, 200, 429, 429]
    finally:
        redis_server.start()
    assert "limiting per process" in shared_limit[0].log()
    # and back to the shared bucket (a new one: the restarted Redis is empty)
    wait_until(lambda: a.get("/ready").json()["status"] == "ready", timeout_s=30, every_s=0.2)


def test_logs_carry_the_request_id_of_the_request_they_happened_in(shared_limit, redis_server, redis_prefix_module):
    """An app log line written while serving a request (a corrupt cache entry dropped) carries its id."""
    c = httpx.Client(base_url=shared_limit[0].url, timeout=60)
    r = c.post("/generate", json={"task": "logged with its request id"}, headers={"X-Request-Id": "gen-1"})
    assert r.status_code == 200
    key = f"{redis_prefix_module}adapter:{r.headers['x-adapter-id']}"
    redis_server.client().setrange(key, 60, b"\xde\xad\xbe\xef")
    got = c.get(f"/v1/adapters/{r.headers['x-adapter-id']}", headers={"X-Request-Id": "corrupt-read-7"})
    assert_error(got, 404, "not_found")

    def dropped_line() -> str | None:
        text = shared_limit[0].log_path.read_text(errors="replace")
        return next((line for line in text.splitlines(keepends=True) if "deleted corrupt cache entry" in line
                     and line.endswith("\n")), None)  # a whole line, not one still being written

    line = wait_until(dropped_line, timeout_s=30)
    assert line.rstrip("\n").endswith("request_id=corrupt-read-7")


def test_secrets_never_logged_and_trust_remote_code_off_by_default(fixtures_dir, redis_server, tmp_path):
    """The reference fixture's encoder ships code: without the operator's opt-in it never loads, and text
    requests are refused with a clear 4xx while embeddings still work. A Redis password in the URL is
    logged only redacted, and an API key never."""
    assert Settings().trust_remote_code is False
    url = redis_server.url.replace("redis://", "redis://:hunter2-redis-secret@")
    env = {"LORAGEN_REDIS_URL": url, "LORAGEN_REDIS_TIMEOUT_S": "0.5", "LORAGEN_API_KEYS": "api-secret-zz-42"}
    proc = ServiceProcess({"ref": fixtures_dir / "llama_M"}, tmp_path / "serve.log", env, "--log-level", "debug")
    try:
        c = httpx.Client(base_url=proc.url, timeout=60, headers=_auth("api-secret-zz-42"))
        r = c.post("/generate", json={"task": "summarise a contract"})
        assert 400 <= r.status_code < 500 and "trust-remote-code" in r.json()["error"]["message"], r.text
        ok = c.post("/generate", json={"embedding": [0.01] * 1024})
        assert ok.status_code == 200
        assert c.get("/v1/checkpoints", headers=_auth("wrong-secret-yy-17")).status_code == 403
    finally:
        proc.stop()
    log = proc.log_path.read_text(errors="replace")  # the whole log, complete: the process has exited
    assert "redis://:***@" in log  # the URL was logged, redacted
    assert "only embeddings accepted" in log and "--trust-remote-code" in log
    for secret in ("hunter2-redis-secret", "api-secret-zz-42", "wrong-secret-yy-17"):
        assert secret not in log


def _loragen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("loragen"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})


class _Payload:
    """Unpickling this would create a file: the classic pickle exploit."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_serve_refuses_a_checkpoint_carrying_a_malicious_pickle(fixtures_dir, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in ("args.yaml", "adapter_config.json"):
        shutil.copy(fixtures_dir / "llama_L" / f, evil / f)
    marker = tmp_path / "pwned"
    sd = torch.load(fixtures_dir / "llama_L" / "hypermod.pt", weights_only=True)
    sd["mixer.1.bias"] = _Payload(marker)
    torch.save(sd, evil / "hypermod.pt")
    assert not marker.exists()
    done = _loragen("serve", "--checkpoint", f"evil={evil}", "--port", "0")
    assert done.returncode == 2, done.stderr
    assert "weights_only=True" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not marker.exists()


def test_hf_allow_list(fixtures_dir, tmp_path):
    # refused before anything is fetched, with the setting named
    with pytest.raises(CheckpointError, match="hf://evil/t2l is not allowed.*LORAGEN_HF_ALLOW"):
        load_checkpoint("hf://evil/t2l", hf_allow=["SakanaAI"], cache_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()
    with pytest.raises(CheckpointError, match="not allowed"):  # an allowed repo does not open its owner's others
        load_checkpoint("hf://SakanaAI/other-repo", hf_allow=["SakanaAI/text-to-lora"], cache_dir=tmp_path / "hub")
    # an allowed owner (any case) resolves: offline, through a hub cache laid out as huggingface_hub writes it
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--SakanaAI--text-to-lora"
    snap = repo / "snapshots" / commit / "t2l"
    snap.mkdir(parents=True)
    for f in ("hypermod.pt", "args.yaml", "adapter_config.json"):
        shutil.copy(fixtures_dir / "llama_S" / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for allow in (["sakanaai"], ["SakanaAI/text-to-lora"], []):
        assert load_checkpoint("hf://SakanaAI/text-to-lora/t2l", hf_allow=allow, cache_dir=tmp_path / "hub").config.variant == "S"
    # the service applies the setting before it starts
    done = _loragen("serve", "--checkpoint", "x=hf://evil/t2l", "--port", "0", env={"LORAGEN_HF_ALLOW": "SakanaAI"})
    assert done.returncode == 2 and "hf://evil/t2l is not allowed" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="must be 'owner' or 'owner/repo'"):
        Settings(hf_allow=["evil/../x/y"])
    assert Settings(hf_allow="SakanaAI, me/t2l").hf_allow == ["SakanaAI", "me/t2l"]


def test_rate_limit_settings_and_bucket_names():
    assert Settings().rate_limit() is None  # off by default
    assert Settings(rate_limit_per_s=2.5).rate_limit() == (2.5, 3)
    assert Settings(rate_limit_per_s=0.1, rate_limit_burst=5).rate_limit() == (0.1, 5)
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {KEYS[0]}".encode())], "client": ("10.1.2.3", 4567)}
    by_key = _client_id(Request(scope), by_key=True)  # a bucket is named after a digest of the key, never the key
    assert by_key == "key:" + hashlib.sha256(KEYS[0].encode()).hexdigest()[:32]
    assert _client_id(Request(scope), by_key=False) == "ip:10.1.2.3"
