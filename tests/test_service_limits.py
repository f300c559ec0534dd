"""Overload and timeouts on a real server: 429 with Retry-After, 504, and the work is not lost."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.helpers import tiny_checkpoint, wait_until
from tests.service_server import ServiceProcess
from tests.test_service import assert_error, ckpt_dir, metric  # noqa: F401  (the checkpoint fixture)

# ~150k characters: many MiniLM windows, so this generation takes a noticeable time on a small CPU
LONG_DOC = " ".join(f"Paragraph {i}: rows of numbers are summed and the totals written below." for i in range(2000))


@pytest.fixture(scope="module")
def tight(ckpt_dir, tmp_path_factory):  # noqa: F811
    """One pending generation at most, 0.2 s per request: the long document overruns both."""
    d = tmp_path_factory.mktemp("tight")
    env = {"LORAGEN_MAX_PENDING": "1", "LORAGEN_REQUEST_TIMEOUT_S": "0.2"}
    proc = ServiceProcess({"tiny": ckpt_dir}, d / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def two(ckpt_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("two")
    other = tiny_checkpoint("L", seed=9, e=384).save(d / "other")
    proc = ServiceProcess({"tiny": ckpt_dir, "other": other}, d / "serve.log", None, "--default-checkpoint", "other")
    yield proc
    proc.stop()


def test_timeout_is_504_then_the_adapter_is_cached(tight):
    c = httpx.Client(base_url=tight.url, timeout=60)
    before = metric(c, "loragen_adapters_generated_total")
    r = c.post("/generate", json={"document": LONG_DOC, "checkpoint": "tiny"})
    assert_error(r, 504, "timeout", "cached when it completes")

    def retried():
        r = c.post("/generate", json={"document": LONG_DOC, "checkpoint": "tiny"})
        return r if r.status_code == 200 else None

    # a retry may join the still-running generation (200, miss) or find it cached (200, hit); after that
    # it is cached either way: the generation that timed out for its first client was not lost
    again = wait_until(retried, timeout_s=120, every_s=0.3)
    cached = c.post("/generate", json={"document": LONG_DOC, "checkpoint": "tiny"})
    assert cached.headers["x-cache"] == "hit" and cached.content == again.content
    assert metric(c, "loragen_adapters_generated_total") - before == 1


def test_full_queue_is_429_with_retry_after(tight):
    c = httpx.Client(base_url=tight.url, timeout=60)
    slow = threading.Thread(target=lambda: httpx.post(tight.url + "/generate", timeout=60,
                                                      json={"document": LONG_DOC + " (second)", "checkpoint": "tiny"}))
    slow.start()
    try:
        wait_until(lambda: metric(c, "loragen_pending_generations") == 1, timeout_s=60)  # the long one is pending
        r = c.post("/generate", json={"task": "a distinct task", "checkpoint": "tiny"})  # so the queue is full
        assert_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == "1"
    finally:
        slow.join(timeout=60)
    assert c.get("/health").status_code == 200


def test_several_checkpoints_and_the_default(two):
    c = httpx.Client(base_url=two.url, timeout=60)
    listed = {cp["id"]: cp for cp in c.get("/v1/checkpoints").json()["checkpoints"]}
    assert set(listed) == {"tiny", "other"} and listed["other"]["default"] and not listed["tiny"]["default"]
    assert listed["other"]["variant"] == "L" and listed["tiny"]["variant"] == "M"
    default = c.post("/generate", json={"task": "reverse a string"})
    named = c.post("/generate", json={"task": "reverse a string", "checkpoint": "other"})
    tiny = c.post("/generate", json={"task": "reverse a string", "checkpoint": "tiny"})
    assert default.status_code == named.status_code == tiny.status_code == 200
    assert default.headers["x-adapter-id"] == named.headers["x-adapter-id"] != tiny.headers["x-adapter-id"]


def test_sigterm_drains_in_flight_requests(ckpt_dir, tmp_path):  # noqa: F811
    import signal

    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log", {"LORAGEN_SHUTDOWN_GRACE_S": "60"})
    results = {}

    def slow():
        results["r"] = httpx.post(proc.url + "/generate", json={"document": LONG_DOC + " (drain)"}, timeout=60)

    t = threading.Thread(target=slow)
    t.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:  # the request is in flight: its generation is pending
        wait_until(lambda: metric(c, "loragen_pending_generations") == 1, timeout_s=60)
    proc.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert results["r"].status_code == 200 and len(results["r"].content) > 0
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit here
    assert proc.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(proc.url + "/health", timeout=2)
    proc.stop()


def test_a_client_that_disconnects_costs_no_generation(ckpt_dir, tmp_path):  # noqa: F811
    """While the worker is busy, a queued request whose client hangs up is dropped, not generated."""
    import json as jsonlib
    import socket

    env = {"LORAGEN_MAX_BATCH_SIZE": "1"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log", env)
    try:
        c = httpx.Client(base_url=proc.url, timeout=60)
        before = metric(c, "loragen_adapters_generated_total")
        passes = metric(c, "loragen_generation_batch_size_count")  # the worker's forward passes
        busy = threading.Thread(target=lambda: httpx.post(proc.url + "/generate", json={"document": LONG_DOC + " (busy)"},
                                                          timeout=60))
        busy.start()
        wait_until(lambda: metric(c, "loragen_pending_generations") == 1, timeout_s=60)  # the long document
        body = jsonlib.dumps({"task": "abandoned by its client"}).encode()
        with socket.create_connection(("127.0.0.1", proc.port)) as s:  # send, then hang up
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            # hang up once its job waits in the queue behind the long document, which the only worker holds
            wait_until(lambda: metric(c, "loragen_pending_generations") == 2
                       and metric(c, "loragen_queue_depth") == 1, timeout_s=60)
        wait_until(lambda: metric(c, "loragen_client_disconnects_total") == 1, timeout_s=60)
        assert metric(c, "loragen_queue_depth") == 1  # still queued when its client left: the worker is busy
        busy.join(timeout=60)
        # one worker, one job per batch, first in first out: once a request queued after the abandoned job is
        # answered, the worker has taken (and dropped) the abandoned job
        assert c.post("/generate", json={"task": "queued after the abandoned one"}).status_code == 200
        assert metric(c, "loragen_adapters_generated_total") - before == 2  # the long document, the one after
        assert metric(c, "loragen_generation_batch_size_count") - passes == 2
        assert metric(c, "loragen_client_disconnects_total") == 1
        after = c.post("/generate", json={"task": "abandoned by its client"})
        assert after.status_code == 200 and after.headers["x-cache"] == "miss"  # it was never generated
    finally:
        proc.stop()
