"""The service on Redis: replicas share the cache, corrupt entries are never served, outages degrade
to uncached generation and recover by themselves. Real Redis, real `loragen serve` processes."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import wait_until
from tests.service_server import ServiceProcess
from tests.test_service import assert_error, ckpt_dir  # noqa: F401  (the checkpoint fixture)


@pytest.fixture
def replicas(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix, "LORAGEN_REDIS_TIMEOUT_S": "0.5",
           "LORAGEN_MEMORY_CACHE_BYTES": "0"}  # every hit from Redis (the near cache has its own test below)
    procs = [ServiceProcess({"tiny": ckpt_dir}, tmp_path / f"serve{i}.log", env) for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def test_replicas_share_the_cache(replicas, redis_server, redis_prefix):
    a, b = (httpx.Client(base_url=p.url, timeout=60) for p in replicas)
    first = a.post("/generate", json={"task": "shared between replicas"})
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    adapter_id = first.headers["x-adapter-id"]
    second = b.post("/generate", json={"task": "shared between replicas"})
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    assert b.get(f"/v1/adapters/{adapter_id}").content == first.content
    r = redis_server.client()
    key = f"{redis_prefix}adapter:{adapter_id}"
    assert r.exists(key) and 0 < r.ttl(key) <= 7 * 86400
    assert b.get("/ready").json()["cache"] == {"backend": "redis", "reachable": True}


def test_corrupt_entry_is_dropped_and_regenerated(replicas, redis_server, redis_prefix):
    c = httpx.Client(base_url=replicas[0].url, timeout=60)
    good = c.post("/generate", json={"task": "to be corrupted"})
    adapter_id = good.headers["x-adapter-id"]
    r = redis_server.client()
    key = f"{redis_prefix}adapter:{adapter_id}"
    stored = r.get(key)
    r.setrange(key, len(stored) - 10, b"\x00\x01\x02")  # flip bytes in the tensor data
    assert_error(c.get(f"/v1/adapters/{adapter_id}"), 404, "not_found")  # detected, dropped, not served
    assert not r.exists(key)
    again = c.post("/generate", json={"task": "to be corrupted"})
    assert again.headers["x-cache"] == "miss" and again.content == good.content
    r.set(key, stored[: len(stored) // 2])  # truncated
    assert c.post("/generate", json={"task": "to be corrupted"}).content == good.content


def test_redis_outage_degrades_and_recovers(replicas, redis_server):
    redis_server.require_managed("stopping Redis")
    c = httpx.Client(base_url=replicas[0].url, timeout=60)
    redis_server.stop()
    try:  # answered while Redis is still down (within the client's timeout), not after it returns
        r = c.post("/generate", json={"task": "generated while Redis is down"})
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert c.get("/ready").json()["status"] == "degraded"
        assert_error(c.get(f"/v1/adapters/{r.headers['x-adapter-id']}"), 503, "unavailable")
    finally:
        redis_server.start()
    wait_until(lambda: c.get("/ready").json()["status"] == "ready", timeout_s=30, every_s=0.2)
    again = c.post("/generate", json={"task": "generated while Redis is down"})
    assert again.status_code == 200 and again.content == r.content
    assert c.post("/generate", json={"task": "generated while Redis is down"}).headers["x-cache"] == "hit"


def test_identical_requests_across_replicas_generate_once(replicas):
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_service import metric

    clients = [httpx.Client(base_url=p.url, timeout=60) for p in replicas]
    before = sum(metric(c, "loragen_adapters_generated_total") for c in clients)
    body = {"document": "Cross-replica single flight. " * 400}

    def post(i):
        with httpx.Client(base_url=replicas[i % 2].url, timeout=60) as c:
            return c.post("/generate", json=body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert sum(metric(c, "loragen_adapters_generated_total") for c in clients) - before == 1


def test_near_cache_answers_hot_adapters_without_redis(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """With the default near cache, a replica answers what it generated or read from its own memory: while
    Redis is down, and whatever happens to the Redis entry; a replica that never held it reads Redis, checks
    the entry, and refuses a damaged one."""
    redis_server.require_managed("stopping Redis")
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix, "LORAGEN_REDIS_TIMEOUT_S": "0.5"}
    near = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "near.log", env)
    other = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "other.log", {**env, "LORAGEN_MEMORY_CACHE_BYTES": "0"})
    try:
        c = httpx.Client(base_url=near.url, timeout=60)
        first = c.post("/generate", json={"task": "hot adapter"})
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        adapter_id = first.headers["x-adapter-id"]
        r = redis_server.client()
        r.setrange(f"{redis_prefix}adapter:{adapter_id}", 60, b"\xde\xad\xbe\xef")
        assert_error(httpx.get(f"{other.url}/v1/adapters/{adapter_id}", timeout=60), 404, "not_found")
        hit = c.post("/generate", json={"task": "hot adapter"})
        assert hit.headers["x-cache"] == "hit" and hit.content == first.content  # its own checked copy
        redis_server.stop()
        try:
            assert c.get(f"/v1/adapters/{adapter_id}").content == first.content
            assert c.post("/generate", json={"task": "hot adapter"}).headers["x-cache"] == "hit"
            assert c.get("/ready").json()["status"] == "degraded"  # Redis is still what readiness reports
        finally:
            redis_server.start()
        assert 'loragen_cache_near_hits_total 3.0' in c.get("/metrics").text
    finally:
        near.stop()
        other.stop()


def test_the_edge_ids_in_full_conditional_gets_head_from_the_stored_size_bounded_headers(replicas, redis_server,
                                                                                        redis_prefix):
    c = httpx.Client(base_url=replicas[0].url, timeout=60)
    good = c.post("/generate", json={"task": "at the edge"})
    adapter_id = good.headers["x-adapter-id"]
    # an id is matched in full: a trailing newline (%0A) is an unknown id, not a 500
    for method in ("GET", "HEAD"):
        r = c.request(method, f"/v1/adapters/{adapter_id}%0A")
        assert r.status_code == 404, (method, r.status_code, r.text)
    assert_error(c.get(f"/v1/adapters/{adapter_id}%0A"), 404, "not_found")
    # If-None-Match: * is "any current representation": 304 for a cached adapter, the plain 404 otherwise
    star = c.get(f"/v1/adapters/{adapter_id}", headers={"If-None-Match": "*"})
    assert star.status_code == 304 and star.headers["etag"] == f'"{adapter_id}"' and star.content == b""
    assert c.get(f"/v1/adapters/{'0' * 64}", headers={"If-None-Match": "*"}).status_code == 404
    # HEAD answers from the stored size: with the entry's tensor bytes damaged it still reports the size
    # (GET reads and checks them: the damage is found and the entry dropped)
    r = redis_server.client()
    key = f"{redis_prefix}adapter:{adapter_id}"
    stored = r.get(key)
    r.setrange(key, len(stored) - 10, b"\x00\x01\x02")
    head = c.head(f"/v1/adapters/{adapter_id}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(good.content))
    assert head.headers["etag"] == f'"{adapter_id}"' and r.exists(key)
    assert_error(c.get(f"/v1/adapters/{adapter_id}"), 404, "not_found")
    assert c.head(f"/v1/adapters/{adapter_id}").status_code == 404
    # request headers are bounded: past LORAGEN_MAX_HEADER_BYTES (16 KiB by default), 431 in the envelope
    big = c.get("/health", headers={f"x-filler-{i}": "x" * 1000 for i in range(20)})
    assert_error(big, 431, "headers_too_large")
    assert c.get("/health", headers={"x-filler": "x" * 1000}).status_code == 200
