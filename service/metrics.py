"""Prometheus metrics, one registry per app (so tests and several apps in a process never collide)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loragen_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("loragen_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("loragen_generation_seconds", "time to generate one adapter",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("loragen_adapters_generated", "adapters generated (cache misses run)", registry=r)
        self.cache_lookups = Counter("loragen_cache_lookups", "cache look-ups", ["result"], registry=r)
        self.cache_bytes = Gauge("loragen_cache_bytes", "bytes held by the in-process cache", registry=r)
        self.batch_size = Histogram("loragen_batch_size", "inputs per POST /v1/adapters/batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_generated = Histogram("loragen_generation_batch_size",
                                         "jobs a worker generated together (one forward pass of the hypernetwork; "
                                         "in float32, its exact form: every job's bytes as if it ran alone)",
                                         ["device"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("loragen_queue_depth", "generation jobs waiting for a worker", registry=r)
        self.worker_restarts = Counter("loragen_worker_restarts", "in-process workers restarted after dying",
                                       registry=r)
        self.claimed = Counter("loragen_jobs_claimed", "stream jobs taken over from a worker that went silent",
                               registry=r)
        self.disconnects = Counter("loragen_client_disconnects", "clients that hung up before their adapter was ready",
                                   registry=r)
        self.pending = Gauge("loragen_pending_generations", "generations queued or running", registry=r)
        self.jobs_dead = Counter("loragen_jobs_dead", "stream jobs this worker moved to the dead-letter stream",
                                 registry=r)
        self.dead_letters = Gauge("loragen_dead_letter_jobs", "entries in the dead-letter stream (read at scrape time)",
                                  registry=r)
        self.live_workers = Gauge("loragen_live_workers", "workers with a live heartbeat, per checkpoint (read at "
                                  "scrape time)", ["checkpoint"], registry=r)
        self.model_bytes = Gauge("loragen_model_bytes", "memory of the models a worker holds, per checkpoint, device "
                                 "and part (hypernetwork; base, the base model a Doc-to-LoRA checkpoint reads with)",
                                 ["checkpoint", "device", "part"], registry=r)
        # several API processes can share one port (loragen serve --api-processes N): which one answered
        self.process_id = Gauge("loragen_process_id", "the operating-system id of the process that answered",
                                registry=r)
        self.process_id.set(os.getpid())
        self._scrape_hooks: list[Callable[[], Awaitable[None]]] = []
        self._near_hits = _Counted("loragen_cache_near_hits",
                                   "cache hits answered from the in-process near cache, without Redis", lambda: 0)
        r.register(self._near_hits)

    def count_near_hits(self, near_hits: Callable[[], int]) -> None:
        """Export the cache's own count of hits answered from process memory (service.cache.NearCache)."""
        self._near_hits.value = near_hits

    def on_scrape(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` before every render: it sets gauges whose values live elsewhere (in Redis)."""
        self._scrape_hooks.append(hook)

    async def refresh(self) -> None:
        for hook in self._scrape_hooks:
            await hook()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Counted:
    """A counter whose value something else keeps (a Prometheus custom collector)."""

    def __init__(self, name: str, doc: str, value: Callable[[], int]):
        self.name, self.doc, self.value = name, doc, value

    def describe(self) -> list:
        return [CounterMetricFamily(self.name, self.doc)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.value())
