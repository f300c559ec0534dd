"""Distributed mode when jobs or workers go wrong, on real processes (`loragen serve --queue redis`,
`loragen worker`) and a real Redis: a poison entry is dead-lettered and the worker lives on; a failure while
generating is a retryable 503 that nothing stores; a job handed out too often is set aside; an API node
answers 503 at once when no worker lives; a dead consumer loop ends its worker; the queue on a Redis of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from generator.checkpoint import load_checkpoint
from generator.pipeline import TaskInput
from service.pool import Job
from service.queue import GROUP, encode_job
from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tests.service_server import ServiceProcess, free_port
from tests.test_distributed import embedding, node_env
from tests.test_service import assert_error, ckpt_dir, metric  # noqa: F401  (the checkpoint fixture)

ROOT = Path(__file__).resolve().parents[1]
WORKER_TEXT_LIMIT = 200  # the faulty worker's LORAGEN_MAX_TEXT_CHARS; the API node keeps the default

# `python wrapper.py FLAG worker ...`: `loragen worker` whose every torch.nn.functional.linear (what nn.Linear
# calls) raises torch.OutOfMemoryError while the file FLAG exists, as a GPU out of memory would
WRAPPER = '''
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

flag = Path(sys.argv.pop(1))
linear = F.linear


def linear_unless_flagged(*args, **kwargs):
    if flag.exists():
        raise torch.OutOfMemoryError("out of memory (injected while " + str(flag) + " exists)")
    return linear(*args, **kwargs)


F.linear = linear_unless_flagged

from service.cli import main

sys.exit(main(sys.argv[1:]))
'''


class WrappedWorker(ServiceProcess):
    """`loragen worker` run through WRAPPER, ready when its /ready answers 200."""

    def __init__(self, script: Path, flag: Path, checkpoints: dict[str, Path], log_path: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(script), str(flag), "worker", "--port", str(self.port)]
        for cid, path in checkpoints.items():
            cmd += ["--checkpoint", f"{cid}={path}"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
        full_env.update({"HF_HUB_OFFLINE": "1", "LORAGEN_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT), **env})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy(timeout_s=90)


@pytest.fixture(scope="module")
def tiny_sha(ckpt_dir) -> str:  # noqa: F811
    return load_checkpoint(ckpt_dir).sha256


@pytest.fixture(scope="module")
def faulty(ckpt_dir, redis_server, redis_prefix_module, tmp_path_factory):  # noqa: F811
    """An API node and one worker whose generation fails while `flag` exists."""
    tmp = tmp_path_factory.mktemp("faulty")
    (tmp / "wrapper.py").write_text(WRAPPER)
    flag = tmp / "out-of-memory"
    env = node_env(redis_server, redis_prefix_module, LORAGEN_REQUEST_TIMEOUT_S="30")
    worker = WrappedWorker(tmp / "wrapper.py", flag, {"tiny": ckpt_dir}, tmp / "worker.log",
                           {**env, "LORAGEN_MAX_TEXT_CHARS": str(WORKER_TEXT_LIMIT)})
    api = None
    try:
        api = ServiceProcess({"tiny": ckpt_dir}, tmp / "api.log", env, "--queue", "redis")
        yield {"api": api, "worker": worker, "flag": flag, "prefix": redis_prefix_module}
    finally:
        if api is not None:
            api.stop()
        worker.stop()


def dead_letters(admin, prefix: str) -> dict[str, dict[str, bytes]]:
    """The dead-letter stream: original entry id -> the record's fields."""
    records = [{k.decode(): v for k, v in fields.items()} for _, fields in admin.xrange(f"{prefix}jobs:dead")]
    return {r["entry"].decode(): r for r in records}


def test_poison_entries_are_dead_lettered_and_the_worker_serves_on(faulty, redis_server):
    api, worker, prefix = faulty["api"], faulty["worker"], faulty["prefix"]
    admin = redis_server.client()
    w = httpx.Client(base_url=worker.url, timeout=30)
    dead_before = metric(w, "loragen_jobs_dead_total")
    name = w.get("/health").json()["workers"][0]
    traversal = admin.xadd(f"{prefix}jobs", {"id": "bad/../id", "sha": "0" * 64, "kind": "task", "text": "x",
                                             "dtype": "float32", "compute_dtype": "float32", "rid": "poison-1"})
    garbage = admin.xadd(f"{prefix}jobs", {"id": "f" * 64, "sha": b"\xff\xfe", "kind": b"\x00", "dtype": "x",
                                           "embedding": b"\x01\x02\x03", "rid": "poison-2"})
    records = wait_until(lambda: (d := dead_letters(admin, prefix)).keys() >= {traversal.decode(), garbage.decode()}
                         and d, 60)
    first, second = records[traversal.decode()], records[garbage.decode()]
    assert b"bad/../id" in first["reason"] and b"adapter id" in first["reason"], first
    assert first["id"] == b"bad/../id" and first["rid"] == b"poison-1" and first["worker"].decode() == name
    assert b"sha" in second["reason"] and second["id"] == b"f" * 64 and second["rid"] == b"poison-2", second
    assert metric(w, "loragen_jobs_dead_total") == dead_before + 2
    # acknowledged and removed: nothing left in the stream or pending in the group
    assert admin.xlen(f"{prefix}jobs") == 0 and admin.xpending(f"{prefix}jobs", GROUP)["pending"] == 0
    dead = admin.xlen(f"{prefix}jobs:dead")
    assert metric(w, "loragen_dead_letter_jobs") == dead  # read at scrape time, on both kinds of node
    assert metric(httpx.Client(base_url=api.url), "loragen_dead_letter_jobs") == dead
    lines = [line for line in worker.log_path.read_text().splitlines() if "dead-lettered" in line]
    assert any(line.endswith("request_id=poison-1") for line in lines), lines
    assert w.get("/ready").status_code == 200 and worker.proc.poll() is None
    r = httpx.post(api.url + "/generate", json={"embedding": embedding(1)}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_dead_lettered_job_answers_its_waiter_at_once(faulty, redis_server):
    """The API accepts a text the worker refuses (its limit is lower): the waiter hears why, not a timeout."""
    api, prefix = faulty["api"], faulty["prefix"]
    text = "count the words " * 20  # 320 characters: within the API's limit, over the worker's
    r = httpx.post(api.url + "/generate", json={"task": text}, headers={"X-Request-Id": "too-long-1"}, timeout=60)
    assert_error(r, 422, "invalid_input", f"the limit of this worker is {WORKER_TEXT_LIMIT}")
    records = dead_letters(redis_server.client(), prefix).values()
    assert any(rec["rid"] == b"too-long-1" and b"characters" in rec["reason"] for rec in records), records


def test_a_failure_while_generating_is_a_503_that_a_retry_overcomes(faulty, redis_server):
    api, worker, flag, prefix = faulty["api"], faulty["worker"], faulty["flag"], faulty["prefix"]
    c = httpx.Client(base_url=api.url, timeout=60)
    body = {"embedding": embedding(7)}
    flag.touch()
    try:
        r = c.post("/generate", json=body)
    finally:
        flag.unlink()
    assert_error(r, 503, "generation_failed", "OutOfMemoryError")  # not the 504 of the request timeout
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    assert "Traceback" in worker.log_path.read_text()  # logged with its traceback, for us
    again = c.post("/generate", json=body)  # nothing was stored: the same request generates now
    assert again.status_code == 200, again.text
    assert not redis_server.client().exists(f"{prefix}error:{again.headers['x-adapter-id']}")
    assert worker.proc.poll() is None and httpx.get(worker.url + "/ready").status_code == 200


def test_a_job_handed_out_too_often_is_dead_lettered(ckpt_dir, tiny_sha, redis_server,  # noqa: F811
                                                     redis_prefix, tmp_path):
    """Two jobs left pending by consumers that vanished: one handed out twice already (the limit), one once.
    The worker that claims them sets the first aside unrun and generates the second."""
    admin = redis_server.client()
    stream = f"{redis_prefix}jobs"
    admin.xgroup_create(stream, GROUP, id="0", mkstream=True)
    poison, fine = "a" * 64, "b" * 64
    for adapter_id, seed in ((poison, 11), (fine, 12)):
        item = TaskInput.from_embedding(embedding(seed))
        admin.xadd(stream, encode_job(Job(adapter_id, "tiny", tiny_sha, item, "float32", "float32", f"rid-{seed}")))
    (_, entries), = admin.xreadgroup(GROUP, "vanished-1", {stream: ">"}, count=2)  # handed out once each
    poison_entry = entries[0][0]
    admin.xclaim(stream, GROUP, "vanished-2", 0, [poison_entry])  # and the first once more
    env = node_env(redis_server, redis_prefix, LORAGEN_CLAIM_IDLE_MS="100", LORAGEN_MAX_DELIVERIES="2")
    worker = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "worker.log", env, command="worker")
    try:
        records = wait_until(lambda: dead_letters(admin, redis_prefix), 60)
        wait_until(lambda: admin.exists(f"{redis_prefix}adapter:{fine}"), 60)
        w = httpx.Client(base_url=worker.url)
        assert metric(w, "loragen_jobs_dead_total") == 1
        assert metric(w, "loragen_jobs_claimed_total") == 2
    finally:
        worker.stop()
    assert list(records) == [poison_entry.decode()]
    assert b"handed out 3 times" in records[poison_entry.decode()]["reason"], records
    assert not admin.exists(f"{redis_prefix}adapter:{poison}")  # never run
    failure = json.loads(admin.get(f"{redis_prefix}failed:{poison_entry.decode()}"))  # what its waiter hears
    assert failure["type"] == "generation_failed" and "LORAGEN_MAX_DELIVERIES=2" in failure["message"]


def test_no_live_worker_is_503_at_once(ckpt_dir, tiny_sha, redis_server, redis_prefix, tmp_path):  # noqa: F811
    env = node_env(redis_server, redis_prefix, LORAGEN_WORKER_TTL_S="5")
    admin = redis_server.client()
    worker = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "worker.log", env, command="worker")
    api = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "api.log", env, "--queue", "redis")
    again = None
    try:
        c = httpx.Client(base_url=api.url, timeout=90)
        name = httpx.get(worker.url + "/health").json()["workers"][0]
        ready = wait_until(lambda: (r := c.get("/ready").json())["workers"] == {"tiny": [name]} and r, 30)
        assert ready["status"] == "ready"
        assert c.post("/generate", json={"embedding": embedding(1)}).status_code == 200

        # frozen (a hung host): it stops beating, and a request already waiting for it is answered
        worker.proc.send_signal(signal.SIGSTOP)
        try:
            r = c.post("/generate", json={"embedding": embedding(2)})
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        assert_error(r, 503, "no_workers", "went silent while this job waited")  # well before the 60 s timeout
        assert int(r.headers["retry-after"]) >= 1
        wait_until(lambda: c.get("/ready").json()["workers"] == {"tiny": [name]}, 30)
        assert c.post("/generate", json={"embedding": embedding(2)}).status_code == 200  # it stayed queued

        # gone (SIGTERM): it withdraws at once, and requests are refused before anything is queued
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on
        assert admin.zscore(f"{redis_prefix}workers:{tiny_sha}", name) is None
        ready = wait_until(lambda: (r := c.get("/ready").json())["workers"] == {"tiny": []} and r, 30)
        assert ready["status"] == "degraded" and "no live worker serves checkpoint tiny" in ready["reason"]
        assert metric(c, "loragen_live_workers") == 0
        r = c.post("/generate", json={"embedding": embedding(3)})
        assert_error(r, 503, "no_workers", "no live worker serves checkpoint tiny")
        assert r.headers["retry-after"] == "5"
        assert admin.xlen(f"{redis_prefix}jobs") == 0  # refused, not queued for nobody

        again = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "again.log", env, command="worker")
        name = httpx.get(again.url + "/health").json()["workers"][0]
        wait_until(lambda: c.get("/ready").json()["workers"] == {"tiny": [name]}, 30)
        assert metric(c, "loragen_live_workers") == 1
        r = c.post("/generate", json={"embedding": embedding(3)})
        assert r.status_code == 200, r.text
    finally:
        api.stop()
        worker.stop()
        if again is not None:
            again.stop()


def test_a_dead_consumer_loop_ends_the_worker(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """The stream key replaced by a string (WRONGTYPE: no retry can help): the consumer loops of a worker and of
    a node with an embedded worker end. The worker says why on /ready, then exits 1; the node stays up and
    reports it."""
    env = node_env(redis_server, redis_prefix)
    worker = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "worker.log", env, command="worker")
    node = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "node.log", env, "--queue", "redis", "--embedded-worker")
    try:
        admin = redis_server.client()
        admin.delete(f"{redis_prefix}jobs")
        admin.set(f"{redis_prefix}jobs", "not a stream")

        def not_ready_or_exited():
            if worker.proc.poll() is not None:
                return "exited"
            try:
                r = httpx.get(worker.url + "/ready", timeout=5)
            except httpx.HTTPError:
                return None
            return r if r.status_code == 503 and "died" in r.json().get("reason", "") else None

        r = wait_until(not_ready_or_exited, 60, every_s=0.02)
        assert r != "exited", "the worker exited before /ready said why"
        assert r.json()["status"] == "not_ready" and "WRONGTYPE" in r.json()["reason"], r.json()
        assert worker.proc.wait(timeout=30) == 1
        log = worker.log_path.read_text()
        assert "stream consumer" in log and "died" in log and "Traceback" in log

        ready = wait_until(lambda: "embedded worker" in (b := httpx.get(node.url + "/ready").json()).get("reason", "")
                           and b, 30)
        assert ready["status"] == "degraded" and "WRONGTYPE" in ready["reason"], ready
        assert node.proc.poll() is None and httpx.get(node.url + "/health").status_code == 200
    finally:
        node.stop()
        worker.stop()


def test_the_queue_on_a_redis_of_its_own(ckpt_dir, tiny_sha, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """LORAGEN_QUEUE_REDIS_URL: jobs, heartbeats, locks and rate limits on one Redis, adapters on the other; a
    queue Redis that may evict keys gets a warning at start."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("a second Redis needs redis-server on PATH")
    queue_redis = RedisServer.launch(binary)
    nodes = []
    try:
        queue_redis.config_set("maxmemory-policy", "allkeys-lru")  # as a cache would be: wrong for a queue
        env = node_env(redis_server, redis_prefix, LORAGEN_QUEUE_REDIS_URL=queue_redis.url,
                       LORAGEN_RATE_LIMIT_PER_S="100")
        nodes.append(worker := ServiceProcess({"tiny": ckpt_dir}, tmp_path / "worker.log", env, command="worker"))
        nodes.append(api := ServiceProcess({"tiny": ckpt_dir}, tmp_path / "api.log", env, "--queue", "redis"))
        queue, cache = queue_redis.client(), redis_server.client()
        worker.proc.send_signal(signal.SIGSTOP)  # the job waits, and the API node holds its single-flight lock
        try:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, api.url + "/generate", json={"embedding": embedding(21)}, timeout=90)
                wait_until(lambda: list(queue.scan_iter(match=f"{redis_prefix}lock:*")), 30)
                assert not list(cache.scan_iter(match=f"{redis_prefix}lock:*"))
                worker.proc.send_signal(signal.SIGCONT)
                r = waiting.result()
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        assert r.status_code == 200, r.text
        adapter = f"{redis_prefix}adapter:{r.headers['x-adapter-id']}"
        assert queue.exists(f"{redis_prefix}jobs") and queue.xinfo_groups(f"{redis_prefix}jobs")
        assert queue.zcard(f"{redis_prefix}workers:{tiny_sha}") == 1
        assert list(queue.scan_iter(match=f"{redis_prefix}ratelimit:*"))
        assert not queue.exists(adapter)
        assert cache.exists(adapter)
        assert not cache.exists(f"{redis_prefix}jobs") and not cache.exists(f"{redis_prefix}workers:{tiny_sha}")
        for node in nodes:
            assert "has maxmemory-policy allkeys-lru" in node.log_path.read_text(), node.log()
    finally:
        for node in nodes:
            node.stop()
        queue_redis.close()
