"""Faults under load, bounded to seconds (`python -m benchmarks.reliability` runs them longer): Redis killed
and restarted, Redis refusing writes, cache entries corrupted while they are read, clients that read slowly
or send slowly. Every answer is ok or retryable, nothing corrupt is ever served, and the service recovers
by itself. (A worker killed: tests/test_pool.py kills an in-process worker thread, tests/test_distributed.py
SIGKILLs a `loragen worker` mid-batch.)"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading
import time

import httpx
import pytest
import torch

from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec, HyperConfig, ModuleSpec
from generator.hypernet import build_hypernet
from service.cache import HEADER, MAGIC
from tests.helpers import wait_until
from tests.load import Workload, at, hot_hit_again, until_ready
from tests.service_server import ServiceProcess
from tests.test_service import ckpt_dir  # noqa: F401  (the checkpoint fixture)


@pytest.fixture(scope="module")
def on_redis(ckpt_dir, redis_server, redis_prefix_module, tmp_path_factory):  # noqa: F811
    """One service on Redis for every fault here (each test brings Redis back to normal when it ends)."""
    redis_server.require_managed("fault injection on Redis")
    # no near cache: every hit goes to Redis, where the faults are (test_service_redis tests the near cache)
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module,
           "LORAGEN_REDIS_TIMEOUT_S": "0.5", "LORAGEN_MEMORY_CACHE_BYTES": "0"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("faults") / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _redis_back_to_normal(redis_server):
    yield
    redis_server.reset()


def _clean(result) -> None:
    assert result.corrupt == 0, result.summary()
    assert result.n_errors == 0, result.summary()
    assert result.ok > 0 and result.hits > 0 and result.misses > 0, result.summary()


def test_redis_killed_and_restarted_mid_load(on_redis, redis_server):
    w = Workload(on_redis.url, n_hot=8, miss_ratio=0.2, label="kill")

    async def scenario():
        await w.warm()
        load = asyncio.create_task(w.run(clients=8, duration_s=4.5))
        await at(1.0, redis_server.kill)  # SIGKILL: no shutdown, every connection cut
        async with httpx.AsyncClient(base_url=on_redis.url, timeout=60) as c:  # meanwhile: served, uncached
            during = await c.post("/generate", json={"task": w.hot[1]})
            ready_during = (await c.get("/ready")).json()["status"]
        await at(0.5, redis_server.start)  # back, empty (no persistence)
        return await load, during, ready_during, await until_ready(on_redis.url), await hot_hit_again(w)

    result, during, ready_during, ready_after_s, cached_again = asyncio.run(scenario())
    _clean(result)
    assert during.status_code == 200 and hashlib.sha256(during.content).hexdigest() == w.expected[w.hot[1]]
    assert during.headers["x-cache"] == "miss" and ready_during == "degraded"
    assert ready_after_s is not None and cached_again  # recovered by itself: ready, and caching again
    assert "cache unavailable" in on_redis.log_path.read_text(), on_redis.log_path.read_text()[-3000:]


def test_redis_refusing_writes_mid_load(on_redis, redis_server):
    w = Workload(on_redis.url, n_hot=8, miss_ratio=0.3, label="oom")

    def refuse_writes():
        redis_server.config_set("maxmemory-policy", "noeviction")
        redis_server.config_set("maxmemory", 1)  # below what it holds: every write is refused with OOM

    task = {"task": "generated while Redis refuses writes"}

    async def scenario():
        await w.warm()
        load = asyncio.create_task(w.run(clients=8, duration_s=4))
        await at(1.0, refuse_writes)
        async with httpx.AsyncClient(base_url=on_redis.url, timeout=60) as c:  # served, though not stored
            during = await c.post("/generate", json=task)
        await at(0.5, redis_server.restore_config)
        return await load, during

    result, during = asyncio.run(scenario())
    _clean(result)
    assert during.status_code == 200 and "maxmemory" in on_redis.log_path.read_text()  # refused, and logged
    c = httpx.Client(base_url=on_redis.url, timeout=60)
    first = c.post("/generate", json=task)  # it was not stored then; it is now
    again = c.post("/generate", json=task)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert first.content == again.content == during.content


def _corruptions(r, key: str, other_key: str, rng: random.Random) -> str:
    """Damage one stored entry in one of several ways; returns which."""
    raw = r.get(key)
    other = r.get(other_key)
    if raw is None or other is None:
        return "absent"
    kind = rng.choice(["flip", "truncate", "garbage", "magic", "length", "moved"])
    if kind == "flip" and len(raw) < HEADER.size + 8:  # already cut short: nothing left to flip
        kind = "garbage"
    if kind == "flip":
        r.setrange(key, rng.randrange(HEADER.size, len(raw) - 4), bytes([rng.randrange(256)]) * 4)
    elif kind == "truncate":
        r.set(key, raw[: rng.randrange(len(raw))])
    elif kind == "garbage":
        r.set(key, rng.randbytes(max(len(raw), 64)))
    elif kind == "magic":
        r.set(key, b"XXXX" + raw[4:])
    elif kind == "length":
        r.set(key, raw + b"\x00" * 16)
    else:  # a whole, self-consistent entry of another adapter, filed under this id
        r.set(key, other)
    return kind


def test_corrupt_entries_are_never_served_under_load(on_redis, redis_server, redis_prefix_module):
    w = Workload(on_redis.url, n_hot=6, miss_ratio=0.1, label="corrupt")
    stop = threading.Event()
    done: list[str] = []

    def corrupt_continuously():
        rng = random.Random(7)
        r = redis_server.client()
        keys = [f"{redis_prefix_module}adapter:{w.ids[t]}" for t in w.hot]
        while not stop.is_set():
            a, b = rng.sample(keys, 2)
            done.append(_corruptions(r, a, b, rng))
            time.sleep(0.05)

    async def scenario():
        await w.warm()
        t = threading.Thread(target=corrupt_continuously)
        t.start()
        try:
            return await w.run(clients=8, duration_s=4)
        finally:
            stop.set()
            t.join()

    result = asyncio.run(scenario())
    kinds = {k for k in done if k != "absent"}
    assert kinds == {"flip", "truncate", "garbage", "magic", "length", "moved"}, done
    _clean(result)


def test_an_entry_filed_under_another_id_is_not_served(on_redis, redis_server, redis_prefix_module):
    """A whole, self-consistent entry copied under another adapter's id (a bug elsewhere, an operator's
    mistake) passes a check of the payload alone: the check binds the id too."""
    c = httpx.Client(base_url=on_redis.url, timeout=60)
    a = c.post("/generate", json={"task": "adapter a"})
    b = c.post("/generate", json={"task": "adapter b"})
    r = redis_server.client()
    key_b = f"{redis_prefix_module}adapter:{b.headers['x-adapter-id']}"
    r.set(key_b, r.get(f"{redis_prefix_module}adapter:{a.headers['x-adapter-id']}"))
    got = c.get(f"/v1/adapters/{b.headers['x-adapter-id']}")
    assert got.status_code == 404 and got.content != a.content
    assert not r.exists(key_b)  # dropped
    again = c.post("/generate", json={"task": "adapter b"})
    assert again.headers["x-cache"] == "miss" and again.content == b.content
    assert r.get(key_b)[:4] == MAGIC


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A service whose adapters are 4 MiB (16 layers, q/v 2048x2048, r=8): more than socket buffers hold."""
    torch.manual_seed(0)
    config = HyperConfig(variant="M", task_emb_dim=384, latent=16, head_in=32, n_layers=16,
                         modules=(ModuleSpec("q_proj", 2048, 2048), ModuleSpec("v_proj", 2048, 2048)), r=8,
                         encoder=EncoderSpec(), base_model="tiny-random/wide")
    d = tmp_path_factory.mktemp("wide")
    ckpt = Checkpoint.from_module(build_hypernet(config)).save(d / "wide")
    proc = ServiceProcess({"wide": ckpt}, d / "serve.log")
    yield proc
    proc.stop()


def test_slow_clients_do_not_block_others(wide):
    first = httpx.post(wide.url + "/generate", json={"task": "a wide adapter"}, timeout=60)
    assert first.status_code == 200 and len(first.content) > 4_000_000
    adapter_id = first.headers["x-adapter-id"]
    readers, senders = [], []
    try:
        for _ in range(8):  # ask for 4 MiB, then read nothing: the server's writes to them stall
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", wide.port))
            s.sendall(f"GET /v1/adapters/{adapter_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            readers.append(s)
        for _ in range(8):  # announce a body and send almost none of it
            s = socket.create_connection(("127.0.0.1", wide.port))
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{")
            senders.append(s)

        def answering_every_reader() -> bool:  # the server has begun each 4 MiB answer: its writes now stall
            def started(s: socket.socket) -> bool:
                try:
                    return s.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT).startswith(b"HTTP/1.1 200")
                except BlockingIOError:
                    return False
            return all(started(s) for s in readers)

        wait_until(answering_every_reader, timeout_s=60)
        w = Workload(wide.url, n_hot=4, miss_ratio=0.25, label="beside-slow-clients")

        async def scenario():
            await w.warm()
            return await w.run(clients=4, duration_s=3)

        result = asyncio.run(scenario())
        _clean(result)
        whole = httpx.get(f"{wide.url}/v1/adapters/{adapter_id}", timeout=60)
        assert whole.content == first.content
        for s in readers:  # the slow readers still get every byte, intact
            s.settimeout(30)
            buf = b""
            while len(buf) < len(first.content) + 200 and (chunk := s.recv(1 << 20)):
                buf += chunk
                if b"\r\n\r\n" in buf and len(buf.partition(b"\r\n\r\n")[2]) >= len(first.content):
                    break
            body = buf.partition(b"\r\n\r\n")[2]
            assert hashlib.sha256(body).digest() == hashlib.sha256(first.content).digest()
    finally:
        for s in readers + senders:
            s.close()
    assert httpx.get(wide.url + "/health", timeout=10).status_code == 200
