"""Closed-loop HTTP load on a real service, a mix of cache hits and misses, with every answer checked.

Used by tests/test_faults.py (seconds) and `python -m benchmarks.reliability` (a minute). Each client is
an asyncio task with its own connection: it POSTs /generate, checks the answer, and sends the next. A hit
is one of a small hot set of tasks whose bytes were recorded at warm-up: every 200 for it must be those
exact bytes (float32 generation is exact, so even a regenerated adapter must match). A miss is a task
never sent before: its body must be a whole safetensors file of the length announced. An answer is

- ok: 200 and the body checks out;
- retryable: 429 or 503 with Retry-After, or 504 (the generation goes on and is cached);
- an error: anything else (another status, a transport error, a timeout);
- corrupt: 200 with a body that fails its check. This is the one outcome that must never happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.hostile import is_whole_safetensors

RETRYABLE = (429, 503, 504)


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    retryable: Counter = field(default_factory=Counter)  # status -> count
    errors: Counter = field(default_factory=Counter)  # what went wrong -> count
    latencies_s: list[float] = field(default_factory=list)  # of ok answers
    hit_latencies_s: list[float] = field(default_factory=list)  # of ok answers served from the cache
    duration_s: float = 0.0  # until the last answer (clients finish the request in hand after the deadline)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def percentile_ms(self, q: float, which: str = "all") -> float | None:
        xs = sorted({"all": self.latencies_s, "hit": self.hit_latencies_s}[which])
        if not xs:
            return None
        return 1000 * xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

    def summary(self) -> dict:
        return {
            "requests": self.sent, "ok": self.ok, "hits": self.hits, "misses": self.misses,
            "retryable": dict(sorted(self.retryable.items())), "errors": self.n_errors,
            "error_kinds": dict(self.errors.most_common(10)), "corrupt_served": self.corrupt,
            "p50_ms": _round(self.percentile_ms(50)), "p99_ms": _round(self.percentile_ms(99)),
            "hit_p50_ms": _round(self.percentile_ms(50, "hit")), "hit_p99_ms": _round(self.percentile_ms(99, "hit")),
            "duration_s": round(self.duration_s, 1),
            "requests_per_s": round(self.sent / self.duration_s, 1) if self.duration_s else None,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


class Workload:
    """Hot tasks (hits once warmed) and never-seen tasks (misses), in a seeded mix."""

    def __init__(self, url: str, *, n_hot: int = 16, miss_ratio: float = 0.1, seed: int = 0, label: str = "load",
                 timeout_s: float = 60.0):
        self.url = url
        self.hot = [f"{label}: hot task number {i}, sort a list of numbers" for i in range(n_hot)]
        self.expected: dict[str, str] = {}  # hot task -> sha256 of its adapter
        self.ids: dict[str, str] = {}  # hot task -> adapter id
        self.miss_ratio = miss_ratio
        self.seed = seed
        self.label = label
        self.timeout_s = timeout_s
        self._serial = 0

    async def warm(self) -> None:
        """Generate every hot task once and record its bytes (fails loudly: the service must be up)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s) as c:
            for task in self.hot:
                r = await c.post("/generate", json={"task": task})
                r.raise_for_status()
                self.expected[task] = hashlib.sha256(r.content).hexdigest()
                self.ids[task] = r.headers["x-adapter-id"]

    async def run(self, clients: int, duration_s: float) -> LoadResult:
        result = LoadResult()
        start = time.monotonic()
        deadline = start + duration_s
        await asyncio.gather(*(self._client(i, deadline, result) for i in range(clients)))
        result.duration_s = time.monotonic() - start
        return result

    async def _client(self, index: int, deadline: float, result: LoadResult) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s) as c:
            while time.monotonic() < deadline:
                if rng.random() < self.miss_ratio:
                    self._serial += 1
                    task, want = f"{self.label}: miss {self.seed}-{index}-{self._serial}, reverse a string", None
                else:
                    task = rng.choice(self.hot)
                    want = self.expected[task]
                result.sent += 1
                t0 = time.monotonic()
                try:
                    r = await c.post("/generate", json={"task": task})
                except httpx.HTTPError as e:
                    result.errors[f"transport: {type(e).__name__}"] += 1
                    await asyncio.sleep(0.05)
                    continue
                elapsed = time.monotonic() - t0
                if r.status_code == 200:
                    body_ok = (hashlib.sha256(r.content).hexdigest() == want if want is not None
                               else is_whole_safetensors(r.content))
                    if not body_ok or int(r.headers.get("content-length", -1)) != len(r.content):
                        result.corrupt += 1
                        continue
                    result.ok += 1
                    result.latencies_s.append(elapsed)
                    if r.headers.get("x-cache") == "hit":
                        result.hits += 1
                        result.hit_latencies_s.append(elapsed)
                    else:
                        result.misses += 1
                elif r.status_code in RETRYABLE and (r.status_code == 504 or "retry-after" in r.headers):
                    result.retryable[r.status_code] += 1
                    await asyncio.sleep(0.1)  # a client that honours Retry-After backs off
                else:
                    result.errors[f"status {r.status_code}: {r.text[:120]}"] += 1


async def at(delay_s: float, action, *args) -> float:
    """Run the blocking `action(*args)` on a thread after `delay_s`; returns when it ran (monotonic)."""
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(action, *args)
    return time.monotonic()


async def until_ready(url: str, timeout_s: float = 30.0) -> float | None:
    """Seconds until /ready says "ready" (not "degraded"), or None if it did not within `timeout_s`."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while time.monotonic() - start < timeout_s:
            try:
                r = await c.get("/ready")
                if r.status_code == 200 and r.json().get("status") == "ready":
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    return None


async def hot_hit_again(workload: Workload, timeout_s: float = 30.0) -> bool:
    """After a fault: a hot task is served from the cache again (regenerated if the cache lost it), with
    its recorded bytes."""
    task = workload.hot[0]
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=workload.url, timeout=60) as c:
        while time.monotonic() < deadline:
            r = await c.post("/generate", json={"task": task})
            if r.status_code == 200:
                if hashlib.sha256(r.content).hexdigest() != workload.expected[task]:
                    return False
                if r.headers.get("x-cache") == "hit":
                    return True
            await asyncio.sleep(0.2)
    return False


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
