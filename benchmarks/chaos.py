"""Chaos under load in the distributed mode, from real processes on loopback: two API nodes and three
`loragen worker`s on one Redis, `clients` closed-loop clients for `duration_s`, while a seeded script
SIGKILLs workers at random and restarts them, SIGKILLs one API node and restarts it, and injects poison
entries into the job stream.

The clients stand in for a load balancer: each request goes to the next API node that accepts connections (a
refused connection, to a node that is down, is tried on the other node and counted as such). Every answer is
classed as in tests/load.py (ok, retryable with Retry-After, error, corrupt). A request cut off because its
API node was SIGKILLed while it waited is counted apart and sent to the other node, as a balancer retries an
idempotent request (the same input is the same adapter id, the same job); a connection broken by a node that
was not killed is an error. At the end the run checks, with every worker up again:

- every 200 body is byte-identical to direct generation of the same input (float32 generation is exact);
- no job is left queued or pending in the stream (XLEN and XPENDING are 0);
- the dead-letter stream holds exactly the poison entries.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.redis_server import RedisServer
from tests.service_server import ServiceProcess
from tests.test_service import metric

GROUP = "loragen-workers"  # service.queue.GROUP
REQUEST_TIMEOUT_S = 30.0
# malformed stream entries, as a buggy or hostile producer could write them (none passes a worker's checks)
POISON = [
    {"id": "bad/../id", "rid": "poison-0"},
    {"id": "f" * 64, "sha": "0" * 64, "kind": "task", "dtype": "float32", "compute_dtype": "float32", "rid": "poison-1"},
    {"id": "e" * 64, "sha": "0" * 64, "kind": "embedding", "embedding": b"\x00\x01\x02", "dtype": "float32",
     "compute_dtype": "float32", "rid": "poison-2"},
    {"id": "d" * 64, "sha": "0" * 64, "kind": "riddle", "text": "x", "dtype": "float32", "compute_dtype": "float32",
     "rid": "poison-3"},
    {"garbage": b"\xff\xfe\x00", "rid": "poison-4"},
]


@dataclass
class ChaosLoad:
    sent: int = 0
    ok: int = 0
    hits: int = 0
    refused_by_down_node: int = 0  # connection refused: the balancer's next node took the request
    cut_by_node_kill: int = 0  # in the hands of an API node when it was SIGKILLed
    retryable: Counter = field(default_factory=Counter)  # status -> count (429/503 with Retry-After, 504)
    errors: Counter = field(default_factory=Counter)
    corrupt: int = 0
    bodies: dict[str, set[str]] = field(default_factory=dict)  # task -> sha256 of every 200 body for it
    latencies_s: list[float] = field(default_factory=list)


class Balancer:
    """The API nodes' URLs as a load balancer sees them: which accept connections, which were killed."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        self.killed: set[str] = set()  # URLs of API nodes SIGKILLed during the run
        self.lock = threading.Lock()

    def pick(self, k: int) -> str:
        with self.lock:
            return self.urls[k % len(self.urls)]

    def replace(self, old: str, new: str) -> None:
        with self.lock:
            self.urls[self.urls.index(old)] = new


def _percentile_ms(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 1) if xs else None


async def _client(index: int, lb: Balancer, hot: list[str], deadline: float, load: ChaosLoad, seed: int) -> None:
    rng = random.Random(f"{seed}-{index}")
    serial = 0
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 15) as c:
        while time.monotonic() < deadline:
            if rng.random() < 0.3:
                serial += 1
                task = f"chaos: miss {seed}-{index}-{serial}, reverse a string"
            else:
                task = rng.choice(hot)
            load.sent += 1
            for attempt in range(len(lb.urls) + 1):
                url = lb.pick(index + attempt)
                t0 = time.monotonic()
                try:
                    r = await c.post(url + "/generate", json={"task": task})
                except httpx.ConnectError:
                    load.refused_by_down_node += 1
                    await asyncio.sleep(0.05)  # the other node, or this one restarted
                    continue
                except httpx.TimeoutException:
                    load.errors["hung past the request timeout"] += 1
                except httpx.HTTPError as e:
                    if url in lb.killed:  # cut off by the node's death: POST /generate is idempotent (the adapter
                        load.cut_by_node_kill += 1  # id is a content hash), so the balancer sends it to the other
                        continue
                    load.errors[f"transport: {type(e).__name__}"] += 1
                else:
                    if r.status_code == 200:
                        if int(r.headers.get("content-length", -1)) != len(r.content):
                            load.corrupt += 1
                        else:
                            load.ok += 1
                            load.hits += r.headers.get("x-cache") == "hit"
                            load.latencies_s.append(time.monotonic() - t0)
                            load.bodies.setdefault(task, set()).add(hashlib.sha256(r.content).hexdigest())
                    elif r.status_code in (429, 503) and "retry-after" in r.headers or r.status_code == 504:
                        load.retryable[r.status_code] += 1
                        await asyncio.sleep(0.1)  # a client that honours Retry-After backs off
                    else:
                        load.errors[f"status {r.status_code}: {r.text[:120]}"] += 1
                break
            else:
                load.errors["no API node accepted the connection"] += 1


def chaos(ckpt: Path, tmp: Path, redis: RedisServer, *, clients: int = 32, duration_s: float = 60.0,
          seed: int = 0) -> dict:
    from generator.checkpoint import load_checkpoint
    from generator.pipeline import LoraGenerator, TaskInput

    prefix = "rel:chaos:"
    env = {"LORAGEN_REDIS_URL": redis.url, "LORAGEN_CACHE_PREFIX": prefix, "LORAGEN_CLAIM_IDLE_MS": "2000",
           "LORAGEN_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S), "LORAGEN_WORKER_TTL_S": "3",
           "LORAGEN_MAX_BATCH_SIZE": "8"}
    rng = random.Random(seed)
    serial = iter(range(1000))
    workers: list[ServiceProcess] = []
    apis: list[ServiceProcess] = []
    actions: list[str] = []
    started = time.monotonic()  # reset when the load starts: actions are timed from there

    def note(what: str) -> None:
        actions.append(f"{time.monotonic() - started:.1f} s: {what}")

    def worker() -> ServiceProcess:
        w = ServiceProcess({"tiny": ckpt}, tmp / f"chaos-worker{next(serial)}.log", env, command="worker")
        workers.append(w)
        return w

    def api() -> ServiceProcess:
        a = ServiceProcess({"tiny": ckpt}, tmp / f"chaos-api{next(serial)}.log", env, "--queue", "redis")
        apis.append(a)
        return a

    admin = redis.client()
    try:
        for _ in range(3):
            worker()
        for _ in range(2):
            api()
        lb = Balancer([a.url for a in apis])
        hot = [f"chaos: hot task number {i}, sort a list of numbers" for i in range(16)]
        with httpx.Client(timeout=60) as c:
            for task in hot:
                c.post(lb.urls[0] + "/generate", json={"task": task}).raise_for_status()
        load = ChaosLoad()
        started = time.monotonic()
        deadline = started + duration_s

        def kill_workers() -> None:  # a random live worker every 3 to 7 s, restarted 2 to 5 s later
            while time.monotonic() < deadline - 8:
                time.sleep(rng.uniform(3, 7))  # the chaos schedule, not synchronisation
                live = [w for w in workers if w.proc.poll() is None]
                if not live:
                    continue
                victim = rng.choice(live)
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                note(f"worker on :{victim.port} SIGKILLed ({len(live) - 1} left)")
                time.sleep(rng.uniform(2, 5))
                worker()
                note("a fresh worker started")

        def kill_api() -> None:  # one API node SIGKILLed at a third of the run, restarted at a half
            time.sleep(duration_s / 3)
            victim = apis[1]
            lb.killed.add(victim.url)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            note(f"API node on :{victim.port} SIGKILLed")
            time.sleep(duration_s / 6)
            fresh = api()
            lb.replace(victim.url, fresh.url)
            note(f"API node restarted on :{fresh.port}")

        def poison() -> None:  # the poison entries at random moments of the first two thirds
            for fields in POISON:
                time.sleep(rng.uniform(0, duration_s * 2 / 3 / len(POISON)))
                admin.xadd(f"{prefix}jobs", fields)
                note(f"poison entry {fields['rid']} queued")

        scripts = [threading.Thread(target=f, daemon=True) for f in (kill_workers, kill_api, poison)]
        for t in scripts:
            t.start()

        async def run() -> None:
            await asyncio.gather(*(_client(i, lb, hot, deadline, load, seed) for i in range(clients)))

        asyncio.run(run())
        elapsed = time.monotonic() - started
        for t in scripts:
            t.join()
        # the end: every worker up again, the stream drained and nothing pending
        while sum(w.proc.poll() is None for w in workers) < 3:
            worker()
        drained_by = time.monotonic() + 60
        while time.monotonic() < drained_by:
            queued = admin.xlen(f"{prefix}jobs")
            pending = admin.xpending(f"{prefix}jobs", GROUP)["pending"]
            if queued == 0 and pending == 0:
                break
            time.sleep(0.2)  # polling the stream under the deadline above
        dead = admin.xlen(f"{prefix}jobs:dead")
        # every body served equals direct generation of its input
        direct = LoraGenerator(load_checkpoint(ckpt))
        mismatched, served = 0, sorted(load.bodies)
        for i in range(0, len(served), 32):
            batch = served[i:i + 32]
            for task, adapter in zip(batch, direct.generate([TaskInput.task(t) for t in batch]), strict=True):
                want = hashlib.sha256(adapter.safetensors_bytes()).hexdigest()
                mismatched += load.bodies[task] != {want}
        claimed = sum(metric(httpx.Client(base_url=w.url, timeout=10), "loragen_jobs_claimed_total")
                      for w in workers if w.proc.poll() is None)
        errors = sum(load.errors.values())
        result = {
            "clients": clients, "sending_s": duration_s, "duration_s": round(elapsed, 1),
            "api_nodes": 2, "workers": 3, "requests": load.sent, "ok": load.ok, "hits": load.hits,
            "retryable": dict(sorted(load.retryable.items())), "errors": errors,
            "error_kinds": dict(load.errors.most_common(10)), "corrupt_served": load.corrupt,
            "refused_by_down_node": load.refused_by_down_node, "cut_by_api_node_kill": load.cut_by_node_kill,
            "distinct_inputs_served": len(served), "bodies_not_identical_to_direct_generation": mismatched,
            "queued_at_end": queued, "pending_at_end": pending, "poison_injected": len(POISON),
            "dead_letters": dead, "jobs_claimed_by_live_workers_at_end": claimed,
            "p50_ms": _percentile_ms(load.latencies_s, 50), "p99_ms": _percentile_ms(load.latencies_s, 99),
            "actions": actions,
        }
        result["passed"] = (errors == 0 and load.corrupt == 0 and mismatched == 0 and queued == 0 and pending == 0
                            and dead == len(POISON))
        return result
    finally:
        for p in apis + workers:
            p.stop()
        redis.reset()


def markdown(c: dict) -> list[str]:
    retry = ", ".join(f"{k}: {v}" for k, v in c["retryable"].items()) or "0"
    return [
        "",
        f"Chaos: {c['api_nodes']} API nodes and {c['workers']} workers on one Redis, {c['clients']} clients sending for "
        f"{c['sending_s']:g} s (last answer at {c['duration_s']:g} s); {'PASSED' if c['passed'] else 'FAILED'}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests / ok (cache hits) | {c['requests']} / {c['ok']} ({c['hits']}) |",
        f"| retryable answers (status: count) | {retry} |",
        f"| errors / corrupt bodies | {c['errors']} / {c['corrupt_served']} |",
        f"| connections refused by a down API node (sent to the other) | {c['refused_by_down_node']} |",
        f"| requests cut off by the API node's SIGKILL (sent again to the other) | {c['cut_by_api_node_kill']} |",
        f"| distinct inputs served / bodies not identical to direct generation | {c['distinct_inputs_served']} / "
        f"{c['bodies_not_identical_to_direct_generation']} |",
        f"| jobs queued / pending at the end | {c['queued_at_end']} / {c['pending_at_end']} |",
        f"| poison entries injected / dead letters | {c['poison_injected']} / {c['dead_letters']} |",
        f"| latency p50 / p99 of ok answers | {c['p50_ms']} ms / {c['p99_ms']} ms |",
        "",
        "Chaos actions: " + "; ".join(c["actions"]) + ".",
    ]
