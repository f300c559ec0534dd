"""Distributed mode: API nodes enqueue jobs on a Redis Stream; `loragen worker` processes, anywhere, generate.

    API node (StreamQueue)                    Redis                         worker (StreamWorker)
    XADD {prefix}jobs {id, sha, input…}  ─►  stream + consumer group  ─►  XREADGROUP COUNT max_batch
    wait: PUBLISH {prefix}done, or poll  ◄─  {prefix}adapter:{id}      ◄─  generate, cache put, XACK + XDEL,
    the cache                                                               PUBLISH done
                                              pending entries of a dead worker ─► XAUTOCLAIM by another

Adapter ids are content hashes, so a job delivered twice (a claimed entry whose first worker was only slow)
costs a generation and nothing else. API nodes hold no state: any number of them sit behind a load balancer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict

import redis.asyncio as aioredis
import torch
from redis.exceptions import RedisError, ResponseError

from generator.errors import LoragenError
from generator.pipeline import LoraGenerator, TaskInput
from service.cache import AdapterCache, CacheUnavailable
from service.errors import InvalidInput, Overloaded, Unavailable
from service.logctx import NO_REQUEST, serving
from service.malloc import keep_freed_memory
from service.metrics import Metrics
from service.pool import Job

log = logging.getLogger(__name__)

GROUP = "loragen-workers"
ERROR_TTL_S = 300  # how long a job's error stays readable for its waiters


class Keys:
    def __init__(self, prefix: str):
        self.stream = f"{prefix}jobs"
        self.done = f"{prefix}done"
        self.prefix = prefix

    def error(self, adapter_id: str) -> str:
        return f"{self.prefix}error:{adapter_id}"


def encode_job(job: Job) -> dict[str, bytes | str]:
    item = job.item
    fields: dict[str, bytes | str] = {"id": job.adapter_id, "sha": job.checkpoint_sha256, "kind": item.kind,
                                      "dtype": job.dtype, "compute_dtype": job.compute_dtype, "t": str(time.time()),
                                      "rid": job.request_id}
    if item.kind == "embedding":
        fields["embedding"] = torch.tensor(item.embedding, dtype=torch.float32).numpy().tobytes()
    else:
        fields["text"] = item.text.encode()
    return fields


def decode_job(fields: dict[bytes, bytes]) -> Job:
    """A stream entry back into a Job; ValueError for an entry that is not one of ours."""
    f = {k.decode(): v for k, v in fields.items()}
    kind = f["kind"].decode()
    if kind == "embedding":
        item = TaskInput.from_embedding(torch.frombuffer(bytearray(f["embedding"]), dtype=torch.float32))
    elif kind == "task":
        item = TaskInput.task(f["text"].decode())
    elif kind == "document":
        item = TaskInput.document(f["text"].decode())
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return Job(f["id"].decode(), "", f["sha"].decode(), item, f["dtype"].decode(), f["compute_dtype"].decode(),
               _request_id(fields))


def _request_id(fields: dict[bytes, bytes]) -> str:
    """The id of the request an entry was queued for ("-" for entries queued by older API nodes)."""
    return fields.get(b"rid", NO_REQUEST.encode()).decode(errors="replace")


class StreamQueue:
    """API-side backend: submit a job to the stream and wait for a worker to cache its result."""

    stores_results = True

    def __init__(self, redis_url: str, prefix: str, cache: AdapterCache, *, max_pending: int,
                 socket_timeout_s: float, poll_s: float = 1.0):
        self.keys = Keys(prefix)
        self.cache = cache
        self.max_pending = max_pending
        self.poll_s = poll_s  # fallback when a notification is missed (e.g. across a Redis restart)
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                             socket_connect_timeout=socket_timeout_s)
        self._events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task | None = None

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Wake local waiters when a worker announces an id; reconnect after Redis outages."""
        while True:
            try:
                async with self.redis.pubsub() as ps:
                    await ps.subscribe(self.keys.done)
                    async for message in ps.listen():
                        if message["type"] == "message":
                            event = self._events.get(message["data"].decode())
                            if event is not None:
                                event.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("job notifications interrupted (%s); polling the cache until they return", e)
                await asyncio.sleep(1.0)

    async def submit(self, job: Job) -> bytes:
        try:
            depth = await self.redis.xlen(self.keys.stream)
            if depth >= self.max_pending:
                raise Overloaded(f"{depth} jobs queued for the workers; retry shortly", headers={"Retry-After": "1"})
            event = self._events.setdefault(job.adapter_id, asyncio.Event())
            await self.redis.xadd(self.keys.stream, encode_job(job))
        except (RedisError, OSError) as e:
            raise Unavailable(f"the job queue is unreachable; retry shortly ({type(e).__name__})",
                              headers={"Retry-After": "2"}) from None
        try:
            while True:  # the caller's timeout (AdapterService) bounds this loop
                try:
                    await asyncio.wait_for(event.wait(), self.poll_s)
                except TimeoutError:
                    pass
                event.clear()
                try:
                    data = await self.cache.get(job.adapter_id)
                    if data is not None:
                        return data
                    error = await self.redis.get(self.keys.error(job.adapter_id))
                except (CacheUnavailable, RedisError, OSError):
                    continue  # Redis blinked: keep waiting, the timeout still applies
                if error is not None:
                    raise InvalidInput(error.decode())
        finally:
            self._events.pop(job.adapter_id, None)

    async def depth(self) -> int | None:
        try:
            return await self.redis.xlen(self.keys.stream)
        except (RedisError, OSError):
            return None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self.redis.aclose()


class StreamWorker:
    """One generation node: reads jobs in batches, generates, caches, acknowledges, announces."""

    def __init__(self, redis_url: str, prefix: str, cache: AdapterCache, generators: dict[str, LoraGenerator],
                 metrics: Metrics, *, max_batch_size: int, block_ms: int = 1000, claim_idle_ms: int = 30000,
                 socket_timeout_s: float = 2.0, name: str | None = None):
        self.keys = Keys(prefix)
        self.cache = cache
        self.generators = generators  # by checkpoint sha256
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        # blocking reads need a socket timeout longer than the block
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s + block_ms / 1000,
                                             socket_connect_timeout=socket_timeout_s)
        self.compute_dtype = next(iter(generators.values())).compute_dtype if generators else torch.float32
        self.ready = False

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.ensure_group()
                self.ready = True
                entries = await self._claim() or await self._read()
                if entries:
                    await self._process(entries)
            except (RedisError, OSError, CacheUnavailable) as e:
                self.ready = False
                log.warning("worker %s: Redis unavailable (%s); retrying", self.name, e)
                await asyncio.sleep(1.0)
        await self.redis.aclose()

    async def _claim(self) -> list:
        """Entries another consumer took and left idle past claim_idle_ms: its process most likely died."""
        _, claimed, _ = await self.redis.xautoclaim(self.keys.stream, GROUP, self.name, self.claim_idle_ms,
                                                   start_id="0-0", count=self.max_batch_size)
        if claimed:
            with serving(_request_id(fields) for _, fields in claimed if fields):
                log.warning("worker %s claimed %d abandoned jobs", self.name, len(claimed))
            self.metrics.claimed.inc(len(claimed))
        return [(eid, fields) for eid, fields in claimed if fields]

    async def _read(self) -> list:
        got = await self.redis.xreadgroup(GROUP, self.name, {self.keys.stream: ">"}, count=self.max_batch_size,
                                          block=self.block_ms)
        return got[0][1] if got else []

    async def _process(self, entries: list) -> None:
        groups: dict[tuple[str, str], list[tuple[bytes, Job]]] = defaultdict(list)
        finished: list[tuple[bytes, str]] = []
        for eid, fields in entries:
            try:
                job = decode_job(fields)
            except (KeyError, ValueError, LoragenError) as e:
                with serving([_request_id(fields)]):
                    log.error("worker %s: dropping malformed job %s: %s", self.name, eid, e)
                await self._ack([eid])
                continue
            if await self.cache.contains(job.adapter_id):  # done by someone else already
                finished.append((eid, job.adapter_id))
            else:
                groups[(job.checkpoint_sha256, job.dtype)].append((eid, job))
        keepalive = asyncio.create_task(self._keep_claimed([eid for items in groups.values() for eid, _ in items]))
        try:
            for (sha, dtype), items in groups.items():
                with serving(job.request_id for _, job in items):
                    finished += await self._generate(sha, dtype, items)
        finally:
            keepalive.cancel()
        await self._ack([eid for eid, _ in finished])
        for _, adapter_id in finished:
            await self.redis.publish(self.keys.done, adapter_id)

    async def _keep_claimed(self, ids: list[bytes]) -> None:
        """While a long batch runs, re-claim its entries (JUSTID: no delivery count) so that their idle time
        stays below claim_idle_ms and no live worker's jobs are taken over as if it had died."""
        if not ids:
            return
        while True:
            await asyncio.sleep(self.claim_idle_ms / 3000)
            try:
                await self.redis.xclaim(self.keys.stream, GROUP, self.name, 0, ids, justid=True)
            except (RedisError, OSError) as e:
                log.warning("worker %s: could not refresh its claim on %d jobs: %s", self.name, len(ids), e)

    async def _generate(self, sha: str, dtype: str, items: list[tuple[bytes, Job]]) -> list[tuple[bytes, str]]:
        gen = self.generators.get(sha)
        wanted = items[0][1].compute_dtype
        if gen is None or wanted != str(self.compute_dtype).removeprefix("torch."):
            why = (f"no worker here serves checkpoint {sha[:12]}" if gen is None else
                   f"this worker computes in {str(self.compute_dtype).removeprefix('torch.')}, the job asks {wanted}")
            return [await self._fail(eid, job, why) for eid, job in items]
        start = time.perf_counter()
        try:
            adapters = await asyncio.to_thread(gen.generate, [job.item for _, job in items], dtype)
        except LoragenError:
            if len(items) == 1:
                eid, job = items[0]
                try:
                    (adapter,) = await asyncio.to_thread(gen.generate, [job.item], dtype)
                except LoragenError as e:
                    return [await self._fail(eid, job, str(e))]
                adapters = [adapter]
            else:  # one bad input must not fail its neighbours
                out = []
                for one in items:
                    out += await self._generate(sha, dtype, [one])
                return out
        elapsed = time.perf_counter() - start
        log.info("worker %s generated %d adapters (checkpoint %s, %s) in %.1f ms", self.name, len(items), sha[:12],
                 dtype, elapsed * 1000)
        self.metrics.generation_seconds.observe(elapsed / len(items))
        self.metrics.batch_generated.labels(str(gen.device)).observe(len(items))
        done = []
        for (eid, job), adapter in zip(items, adapters, strict=True):
            await self.cache.put(job.adapter_id, adapter.safetensors_bytes())
            self.metrics.generated.inc()
            done.append((eid, job.adapter_id))
        return done

    async def _fail(self, eid: bytes, job: Job, why: str) -> tuple[bytes, str]:
        with serving([job.request_id]):
            log.warning("worker %s: job %s failed: %s", self.name, job.adapter_id[:12], why)
        await self.redis.set(self.keys.error(job.adapter_id), why, ex=ERROR_TTL_S)
        return eid, job.adapter_id

    async def _ack(self, ids: list[bytes]) -> None:
        if ids:
            await self.redis.xack(self.keys.stream, GROUP, *ids)
            await self.redis.xdel(self.keys.stream, *ids)  # the stream length is the queue depth


def make_workers(settings, generators_per_device: list[dict[str, LoraGenerator]], cache: AdapterCache,
                 metrics: Metrics) -> list[StreamWorker]:
    """A stream consumer per device, each finding its generators by checkpoint content hash."""
    keep_freed_memory()  # this process now allocates and frees adapter-sized blocks all day long
    url = settings.redis_url.get_secret_value()
    base = f"{socket.gethostname()}-{os.getpid()}"
    return [
        StreamWorker(url, settings.cache_prefix, cache, {g.checkpoint.sha256: g for g in gens.values()}, metrics,
                     max_batch_size=settings.max_batch_size, claim_idle_ms=settings.claim_idle_ms,
                     socket_timeout_s=settings.redis_timeout_s, name=f"{base}-{i}")
        for i, gens in enumerate(generators_per_device)
    ]


async def run_worker(settings, generators_per_device: list[dict[str, LoraGenerator]], metrics: Metrics) -> None:
    """`loragen worker`: a stream consumer per device plus a small HTTP server for /health, /ready and
    /metrics. SIGTERM: stop reading, finish and acknowledge the batch in hand, exit."""
    import uvicorn
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse

    from service.app import RequestId
    from service.cache import RedisCache

    cache = RedisCache(settings.redis_url.get_secret_value(), prefix=settings.cache_prefix,
                       ttl_s=settings.cache_ttl_s, socket_timeout_s=settings.redis_timeout_s)
    workers = make_workers(settings, generators_per_device, cache, metrics)
    app = FastAPI(title="loragen worker")
    app.add_middleware(RequestId)  # probes' access lines carry their ids, as on the API

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "workers": [w.name for w in workers]}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = all(w.ready for w in workers) and await cache.ping()
        return JSONResponse({"status": "ready" if ok else "not_ready", "workers": [w.name for w in workers],
                             "checkpoints": sorted(generators_per_device[0])}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           log_config=None))  # one format with ours, through the root handler
    stop = asyncio.Event()
    consumers = [asyncio.create_task(w.run(stop)) for w in workers]
    log.info("%d worker(s) consuming %s (group %s), health on %s:%d", len(workers), workers[0].keys.stream, GROUP,
             settings.host, settings.port)
    try:
        await server.serve()  # returns on SIGTERM/SIGINT (uvicorn handles the signals)
    finally:
        stop.set()
        await asyncio.gather(*consumers)
        await cache.close()
