"""`loragen serve --api-processes N`: N real API processes on one port, one model-holding worker, a real Redis.
Every API process answers, every body equals direct generation, SIGTERM stops them all; bad combinations of
flags are one line and exit 2. And the settings reach the children unchanged."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from generator.checkpoint import load_checkpoint
from generator.pipeline import LoraGenerator, TaskInput
from service.cli import main
from service.processes import settings_env
from service.settings import Settings
from tests.helpers import wait_until
from tests.service_server import ServiceProcess
from tests.test_service import ckpt_dir, metric  # noqa: F401  (the checkpoint fixture)


def children(pid: int) -> set[int]:
    """The direct children of process `pid` (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(p) for p in (task / "children").read_text().split()}
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def embedding(seed: int) -> list[float]:
    return torch.randn(384, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def two_apis(ckpt_dir, redis_server, redis_prefix, tmp_path):  # noqa: F811
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix,
           "LORAGEN_MAX_BATCH_SIZE": "8", "LORAGEN_LOG_LEVEL": "info"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log", env, "--api-processes", "2")
    yield proc
    proc.stop()


def test_two_api_processes_answer_and_their_bodies_equal_direct_generation(two_apis, ckpt_dir):  # noqa: F811
    kids = children(two_apis.proc.pid)
    assert len(kids) == 3  # two API processes and the model worker

    seen: set[int] = set()

    def both_answered() -> bool:  # a new connection each time: the kernel spreads them over the two sockets
        with httpx.Client(base_url=two_apis.url, timeout=30) as c:
            seen.add(int(metric(c, "loragen_process_id")))
        return len(seen) == 2

    wait_until(both_answered, timeout_s=60, every_s=0.01)
    assert seen < kids and two_apis.proc.pid not in seen  # API children answer; the supervisor holds no socket

    inputs = [{"embedding": embedding(i)} for i in range(12)] + [{"task": f"task number {i}"} for i in range(4)]

    def post(body):
        with httpx.Client(base_url=two_apis.url, timeout=120) as c:  # one connection per request: both processes
            return c.post("/v1/adapters", json=body)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, inputs))
    assert [r.status_code for r in responses] == [200] * len(inputs), responses[0].text
    assert {r.headers["x-cache"] for r in responses} == {"miss"}
    direct = LoraGenerator(load_checkpoint(ckpt_dir))
    for body, r in zip(inputs, responses, strict=True):  # float32 is exact: the worker's batches change nothing
        item = TaskInput.from_embedding(body["embedding"]) if "embedding" in body else TaskInput.task(body["task"])
        assert r.content == direct.generate([item])[0].safetensors_bytes()
    again = post(inputs[0])
    assert again.headers["x-cache"] == "hit" and again.content == responses[0].content

    two_apis.stop()  # SIGTERM to the supervisor: it stops the API processes, then the worker
    assert two_apis.proc.returncode == 0
    wait_until(lambda: not any(alive(p) for p in kids), timeout_s=30)
    log = two_apis.log_path.read_text()
    assert f"started 2 API processes on 127.0.0.1:{two_apis.port}" in log


@pytest.mark.parametrize("argv, env, match", [
    (["--api-processes", "2"], {}, "--api-processes 2 needs --redis-url"),
    (["--api-processes", "0"], {}, "invalid setting api_processes"),
    (["--api-processes", "3", "--queue", "redis"], {"LORAGEN_REDIS_URL": "redis://127.0.0.1:1/0"},
     "does not combine with --queue redis or --embedded-worker"),
    (["--api-processes", "2", "--embedded-worker"], {"LORAGEN_REDIS_URL": "redis://127.0.0.1:1/0"},
     "does not combine with --queue redis or --embedded-worker"),
    ([], {"LORAGEN_API_PROCESSES": "two"}, "invalid setting api_processes"),
])
def test_bad_combinations_are_one_line_exit_2(capsys, monkeypatch, argv, env, match):
    for key in [k for k in os.environ if k.startswith("LORAGEN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["serve", "--port", "0", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_a_taken_port_is_one_line_exit_2(capsys, monkeypatch, redis_server):
    import socket

    for key in [k for k in os.environ if k.startswith("LORAGEN_")]:
        monkeypatch.delenv(key)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--api-processes", "2", "--redis-url", redis_server.url, "--port", str(port)])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"port {port}" in err and "in use" in err, err


def test_the_children_get_the_same_settings(monkeypatch, tmp_path):
    """What the supervisor hands its children as LORAGEN_* variables reads back as the same Settings."""
    keys = tmp_path / "keys.sha256"
    keys.write_text("# none\n")
    given = Settings(checkpoints={"a": "/models/a", "b": "hf://owner/repo@v1"}, default_checkpoint="b",
                     api_keys="k1,k2", api_keys_file=keys, hf_allow="owner,me/mine", redis_url="redis://h:1/2",
                     rate_limit_per_s=2.5, compute_dtype="bfloat16", max_wait_ms=7.5, api_processes=3,
                     trust_remote_code=True, metrics_public=False)
    env = settings_env(given)
    assert env["LORAGEN_QUEUE_REDIS_URL"] is None and env["LORAGEN_RATE_LIMIT_BURST"] is None  # unset, not "None"
    for key in [k for k in os.environ if k.startswith("LORAGEN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    assert Settings() == given
