"""Distributed mode on real processes: two API nodes (`serve --queue redis`), two `loragen worker`s, one
Redis. Nothing is lost when a worker dies; the queue pushes back; SIGTERM drains a worker."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from generator.checkpoint import load_checkpoint
from generator.pipeline import LoraGenerator, TaskInput
from tests.helpers import wait_until
from tests.service_server import ServiceProcess
from tests.test_service import assert_error, ckpt_dir, metric  # noqa: F401  (the checkpoint fixture)


def node_env(redis_server, prefix: str, **extra: str) -> dict[str, str]:
    return {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": prefix, "LORAGEN_REQUEST_TIMEOUT_S": "60",
            "LORAGEN_CLAIM_IDLE_MS": "1500", "LORAGEN_MAX_BATCH_SIZE": "8", **extra}


@pytest.fixture
def cluster(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    env = node_env(redis_server, redis_prefix)
    procs = {"workers": [], "apis": []}
    try:
        for i in range(2):
            procs["workers"].append(ServiceProcess({"tiny": ckpt_dir}, tmp_path / f"worker{i}.log", env, command="worker"))
        for i in range(2):
            procs["apis"].append(ServiceProcess({"tiny": ckpt_dir}, tmp_path / f"api{i}.log", env, "--queue", "redis"))
        yield procs
    finally:
        for p in procs["apis"] + procs["workers"]:
            p.stop()


def embedding(seed: int) -> list[float]:
    return torch.randn(384, generator=torch.Generator().manual_seed(seed)).tolist()


def test_200_requests_over_two_apis_and_two_workers(cluster, ckpt_dir):  # noqa: F811
    apis, workers = cluster["apis"], cluster["workers"]
    inputs = [{"embedding": embedding(i)} for i in range(30)] + [{"task": f"task {i}"} for i in range(20)]
    requests = [(i % 2, inputs[i % len(inputs)]) for i in range(200)]  # each input 4 times, over both APIs

    def post(req):
        api, body = req
        with httpx.Client(base_url=apis[api].url, timeout=90) as c:
            return c.post("/generate", json=body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, requests))
    assert [r.status_code for r in responses] == [200] * 200
    by_input: dict[int, set[bytes]] = {}
    for (_, body), r in zip(requests, responses, strict=True):
        by_input.setdefault(inputs.index(body), set()).add(r.content)
    assert all(len(bodies) == 1 for bodies in by_input.values())  # every replica serves the same bytes

    # each distinct input generated once, counted by the workers themselves
    generated = sum(metric(httpx.Client(base_url=w.url), "loragen_adapters_generated_total") for w in workers)
    assert generated == len(inputs)

    direct = LoraGenerator(load_checkpoint(ckpt_dir))
    for i, body in enumerate(inputs):  # float32 is exact: every body equals direct generation, byte for byte
        item = TaskInput.from_embedding(body["embedding"]) if "embedding" in body else TaskInput.task(body["task"])
        assert by_input[i] == {direct.generate([item])[0].safetensors_bytes()}


def test_worker_killed_mid_batch_loses_nothing(cluster, redis_server, redis_prefix):
    apis, workers = cluster["apis"], cluster["workers"]
    # long enough that a batch takes a while (so the victim dies holding jobs), short enough that one
    # surviving worker finishes all 24 well within the request timeout on a slow, busy 2-core machine
    doc = " ".join(f"Line {i}: the totals of each column are written below it." for i in range(200))
    bodies = [{"document": f"{doc} (variant {i})"} for i in range(24)]
    results: list[httpx.Response | None] = [None] * len(bodies)

    def post(i):
        with httpx.Client(base_url=apis[i % 2].url, timeout=90) as c:
            results[i] = c.post("/generate", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    victim = httpx.get(workers[0].url + "/health").json()["workers"][0]  # its consumer name
    admin = redis_server.client()

    def victim_holds_jobs() -> int:  # unacknowledged jobs in the victim's hands
        pending = admin.xpending(f"{redis_prefix}jobs", "loragen-workers")
        return next((int(c["pending"]) for c in pending["consumers"] if c["name"].decode() == victim), 0)

    wait_until(victim_holds_jobs, 20)
    workers[0].proc.send_signal(signal.SIGKILL)  # mid-batch: its jobs stay pending in the group
    for t in threads:
        t.join(timeout=90)
    # every request answered 200 (within the 60 s request timeout, or it would be a 504)
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.status_code for r in results]
    survivor = httpx.Client(base_url=workers[1].url)
    assert metric(survivor, "loragen_jobs_claimed_total") >= 1  # it took over the dead worker's jobs


def test_full_queue_is_429(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """Jobs pile up in the stream until max_pending, then the API pushes back: the stream's length is the limit
    (jobs other API nodes queued count), not this node's own count of the generations it waits for."""
    env = node_env(redis_server, redis_prefix, LORAGEN_MAX_PENDING="2")
    api = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "api.log", env, "--queue", "redis")
    try:
        c = httpx.Client(base_url=api.url, timeout=30)
        admin = redis_server.client()
        for i in range(2):  # queued by other API nodes, no worker to take them
            admin.xadd(f"{redis_prefix}jobs", {"id": f"{i:064x}", "rid": f"elsewhere-{i}"})
        r = c.post("/generate", json={"embedding": embedding(200)})
        assert_error(r, 429, "overloaded", "2 jobs queued")
        assert r.headers["retry-after"] == "1"
        admin.xtrim(f"{redis_prefix}jobs", maxlen=0)  # the queue drained: no longer overloaded (but no worker)
        assert_error(c.post("/generate", json={"embedding": embedding(200)}), 503, "no_workers")
    finally:
        api.stop()


def test_sigterm_drains_a_worker(cluster):
    apis, workers = cluster["apis"], cluster["workers"]
    workers[1].proc.send_signal(signal.SIGTERM)  # one worker leaves gracefully ...
    assert workers[1].proc.wait(timeout=30) in (0, -signal.SIGTERM)
    r = httpx.post(apis[0].url + "/generate", json={"task": "after a graceful exit"}, timeout=60)
    assert r.status_code == 200  # ... and the other keeps serving


def test_single_node_that_workers_join(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """`serve --queue redis --embedded-worker` is a complete single node; a `loragen worker` started later
    on another host (here: another process) takes a share of the same stream."""
    env = node_env(redis_server, redis_prefix)
    node = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "node.log", env, "--queue", "redis", "--embedded-worker")
    extra = None
    try:
        c = httpx.Client(base_url=node.url, timeout=90)
        alone = c.post("/generate", json={"task": "served by the node alone"})
        assert alone.status_code == 200  # no external worker yet: the node generated it itself
        assert metric(c, "loragen_adapters_generated_total") == 1
        extra = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "extra.log", env, command="worker")
        doc = " ".join(f"Row {i}: add the numbers in the row." for i in range(600))
        bodies = [{"document": f"{doc} (job {i})"} for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda b: httpx.post(node.url + "/generate", json=b, timeout=90), bodies))
        assert all(r.status_code == 200 for r in responses)
        by_node = metric(c, "loragen_adapters_generated_total") - 1
        by_extra = metric(httpx.Client(base_url=extra.url), "loragen_adapters_generated_total")
        assert by_node + by_extra == len(bodies)  # every job generated exactly once, by one of the two
    finally:
        if extra is not None:
            extra.stop()
        node.stop()


def test_request_id_travels_with_the_job_into_the_worker_log(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    """A worker's lines name the request that caused them: the id rides in the stream entry. Every line of
    both nodes, from the first (checkpoint loading, uvicorn's startup), ends with a request_id= field."""
    env = node_env(redis_server, redis_prefix, LORAGEN_LOG_LEVEL="info")
    worker = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "worker.log", env, command="worker")
    api = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "api.log", env, "--queue", "redis")
    try:
        c = httpx.Client(base_url=api.url, timeout=60)
        r = c.post("/generate", json={"task": "carry my id to the worker"}, headers={"X-Request-Id": "trace-me-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-1"
        # an entry no API node would write (no checkpoint hash, unknown input kind), queued for request
        # forged-9: dead-lettered, and the worker's complaint names that request
        redis_server.client().xadd(f"{redis_prefix}jobs", {"id": "0" * 64, "sha": "x", "kind": "riddle",
                                                           "dtype": "float32", "compute_dtype": "float32",
                                                           "rid": "forged-9"})
        wait_until(lambda: "dead-lettered" in worker.log_path.read_text(), 30)
        assert httpx.get(worker.url + "/health", headers={"X-Request-Id": "probe-3"}).status_code == 200
    finally:
        api.stop()
        worker.stop()
    worker_lines, api_lines = worker.log_records(), api.log_records()  # every line, from the first
    for lines in (worker_lines, api_lines):
        assert any("read checkpoint tiny" in line for line in lines)  # before uvicorn starts
        assert any("Application startup complete" in line for line in lines)
    generated = [line for line in worker_lines if "generated 1 adapters" in line]
    assert generated and all(line.endswith(" request_id=trace-me-1") for line in generated), generated
    dropped = [line for line in worker_lines if "dead-lettered" in line]
    assert dropped and dropped[0].endswith(" request_id=forged-9"), dropped
    assert any("/health HTTP/1.1" in line and line.endswith(" request_id=probe-3") for line in worker_lines)
    assert any("POST /generate HTTP/1.1" in line and line.endswith(" request_id=trace-me-1") for line in api_lines)
