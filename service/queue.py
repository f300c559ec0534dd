"""Distributed mode: API nodes enqueue jobs on a Redis Stream; `loragen worker` processes, anywhere, generate.

    API node (StreamQueue)                    queue Redis                    worker (StreamWorker)
    a live worker for the checkpoint?    ◄─  {prefix}workers:{sha}       ◄─  heartbeat every worker_ttl_s / 3
    XADD {prefix}jobs {id, sha, input…}  ─►  stream + consumer group  ─►  XREADGROUP COUNT max_batch
    wait: PUBLISH {prefix}done, or poll  ◄─  cache: {prefix}adapter:{id} ◄─ generate, cache put, XACK + XDEL,
    the cache, then {prefix}failed:{entry}   or {prefix}failed:{entry}      PUBLISH done
                                              pending entries of a dead worker ─► XAUTOCLAIM by another
                                              a malformed entry, or one handed out more than max_deliveries
                                              times ─► {prefix}jobs:dead (dead letters), its waiter answered

Adapter ids are content hashes, so a job delivered twice (a claimed entry whose first worker was only slow)
costs a generation and nothing else. API nodes hold no state: any number of them sit behind a load balancer.

How a job can end, and what its waiter hears:
- generated: the adapter in the cache, its id published on {prefix}done;
- refused for its input (a LoragenError: deterministic): 422, kept at {prefix}error:{adapter id} for every
  waiter of that id;
- failed while generating (out of memory, a device error, a bug): 503 generation_failed at
  {prefix}failed:{entry id}, for that entry's waiter only and stored nowhere else, so a retry generates again;
- dead-lettered (an entry that fails its checks, or one every worker that took it died holding): moved to
  {prefix}jobs:dead with the reason, and its waiter answered through {prefix}failed:{entry id}.
A worker never dies of one job: every entry is checked before use and any exception while generating fails
only its batch. A consumer loop that ends anyway is logged, reported by /ready, and ends a `loragen worker`
with a non-zero status, for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import get_args

import redis.asyncio as aioredis
import torch
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from generator.adapter import DTYPES
from generator.errors import LoragenError
from generator.pipeline import LoraGenerator, TaskInput
from service.cache import AdapterCache, CacheUnavailable, redact_url
from service.errors import ApiError, GenerationFailed, InvalidInput, NoWorkers, Overloaded, Unavailable
from service.logctx import NO_REQUEST, REQUEST_ID, serving
from service.malloc import keep_freed_memory
from service.metrics import Metrics
from service.pool import Job
from service.settings import Settings

log = logging.getLogger(__name__)

GROUP = "loragen-workers"
ERROR_TTL_S = 300  # how long a job's error stays readable for its waiters
DEAD_MAXLEN = 10_000  # dead letters kept (approximately: XADD MAXLEN ~), the oldest dropped first
LIVE_CACHE_S = 1.0  # an API node asks Redis which workers live at most this often per checkpoint
EXIT_GRACE_S = 3.0  # a worker whose consumer died answers /ready (503, the reason) this long, then exits
COMPUTE_DTYPES = get_args(Settings.model_fields["compute_dtype"].annotation)  # what a node may compute in
KINDS = ("task", "document", "embedding")
_HEX64 = re.compile(r"[0-9a-f]{64}")

# KEYS: the worker sets of the checkpoints a worker serves; ARGV[1] its name, ARGV[2] ttl in ms (0: withdraw).
# Scores are expiry times on the Redis server's clock, so the clocks of the workers' machines do not matter.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if ttl > 0 then
        redis.call('ZADD', key, now + ttl, ARGV[1])
        redis.call('PEXPIRE', key, ttl)
    else
        redis.call('ZREM', key, ARGV[1])
    end
end
return 1
"""
# KEYS: worker sets; returns, per key, the names of the workers whose heartbeat has not expired
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('ZRANGEBYSCORE', key, '(' .. string.format('%d', now), '+inf')
end
return out
"""


class Keys:
    def __init__(self, prefix: str):
        self.stream = f"{prefix}jobs"
        self.dead = f"{prefix}jobs:dead"
        self.done = f"{prefix}done"
        self.prefix = prefix

    def error(self, adapter_id: str) -> str:
        """A deterministic input error, shared by every waiter of the adapter id."""
        return f"{self.prefix}error:{adapter_id}"

    def failed(self, entry_id: str) -> str:
        """How one stream entry failed (JSON {"type", "message"}), for the waiter that queued it."""
        return f"{self.prefix}failed:{entry_id}"

    def workers(self, sha: str) -> str:
        """The live workers of a checkpoint: a sorted set, member = worker name, score = heartbeat expiry."""
        return f"{self.prefix}workers:{sha}"


class BadEntry(ValueError):
    """A stream entry no worker can run: it is dead-lettered and its waiter answered. `input_error`: the
    client's input is at fault (422); otherwise the entry is (503 generation_failed)."""

    def __init__(self, reason: str, *, input_error: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.input_error = input_error


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


def _shown(raw: bytes) -> str:
    return repr(raw[:80]) + ("..." if len(raw) > 80 else "")


def _token(f: dict[str, bytes], name: str, allowed: Iterable[str] | re.Pattern, expected: str) -> str:
    raw = f.get(name)
    if raw is None:
        raise BadEntry(f"the entry has no {name!r} field")
    value = raw.decode("ascii", errors="replace")
    ok = allowed.fullmatch(value) if isinstance(allowed, re.Pattern) else value in allowed
    if not ok:
        raise BadEntry(f"{name} {_shown(raw)} is not {expected}")
    return value


def decode_job(fields: dict[bytes, bytes], max_text_chars: int) -> Job:
    """A stream entry back into a Job, every field checked first; BadEntry says what is wrong with it."""
    f = {k.decode(errors="replace"): v for k, v in fields.items()}
    adapter_id = _token(f, "id", _HEX64, "an adapter id (64 lowercase hex characters)")
    sha = _token(f, "sha", _HEX64, "a checkpoint sha256 (64 lowercase hex characters)")
    kind = _token(f, "kind", KINDS, f"one of {', '.join(KINDS)}")
    dtype = _token(f, "dtype", DTYPES, f"one of {', '.join(DTYPES)}")
    compute_dtype = _token(f, "compute_dtype", COMPUTE_DTYPES, f"one of {', '.join(COMPUTE_DTYPES)}")
    if kind == "embedding":
        raw = f.get("embedding", b"")
        if not raw or len(raw) % 4:
            raise BadEntry(f"the embedding field holds {len(raw)} bytes, not float32 values")
        values = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise BadEntry("the embedding holds NaN or infinite values")
        item = TaskInput.from_embedding(values)
    else:
        raw = f.get("text")
        if raw is None:
            raise BadEntry(f"the entry has no 'text' field for its {kind}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEntry(f"the {kind} is not UTF-8 text", input_error=True) from None
        if len(text) > max_text_chars:
            raise BadEntry(f"{kind} has {len(text)} characters; the limit of this worker is {max_text_chars}",
                           input_error=True)
        if "\x00" in text:
            raise BadEntry(f"the {kind} holds a NUL character", input_error=True)
        try:
            item = TaskInput.task(text) if kind == "task" else TaskInput.document(text)
        except LoragenError as e:
            raise BadEntry(str(e), input_error=True) from None
    return Job(adapter_id, "", sha, item, dtype, compute_dtype, _request_id(fields))


def _request_id(fields: dict[bytes, bytes]) -> str:
    """The id of the request an entry was queued for ("-" for entries queued by older API nodes, or for an id
    that is not one the API would have given)."""
    rid = fields.get(b"rid", NO_REQUEST.encode()).decode(errors="replace")
    return rid if REQUEST_ID.fullmatch(rid) else NO_REQUEST


def _failure(raw: bytes) -> ApiError:
    """The error a worker recorded for one entry, as the API error its waiter gets."""
    try:
        failure = json.loads(raw)
        kind, message = failure["type"], str(failure["message"])
    except (ValueError, KeyError, TypeError):
        return GenerationFailed("a worker failed this job and its record of why is unreadable; retry")
    return InvalidInput(message) if kind == InvalidInput.type else GenerationFailed(message)


def _hopeless(e: ResponseError) -> bool:
    """Redis answered, and no retry can help: the stream key holds another type, the ACL forbids a command, or
    the server lacks one (XAUTOCLAIM needs Redis 6.2). A consumer loop ends on these rather than spin."""
    text = str(e)
    return isinstance(e, NoPermissionError) or text.startswith("WRONGTYPE") or text.startswith("unknown command")


async def warn_if_evicting(redis: aioredis.Redis, url: str) -> None:
    """One warning line when the queue Redis may evict keys; silent where CONFIG is disabled or Redis is down."""
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    except (RedisError, OSError):
        return
    if policy and policy != "noeviction":
        log.warning("the queue Redis at %s has maxmemory-policy %s: under memory pressure it may evict queued jobs, "
                    "heartbeats and locks; set maxmemory-policy noeviction on it, or give the queue a Redis of its "
                    "own with LORAGEN_QUEUE_REDIS_URL (the cache keeps allkeys-lru)", redact_url(url), policy)


class StreamQueue:
    """API-side backend: submit a job to the stream and wait for a worker to cache its result."""

    stores_results = True

    def __init__(self, redis_url: str, prefix: str, cache: AdapterCache, *, max_pending: int,
                 socket_timeout_s: float, poll_s: float = 1.0, checkpoints: dict[str, str] | None = None,
                 metrics: Metrics | None = None):
        self.keys = Keys(prefix)
        self.cache = cache
        self.max_pending = max_pending
        self.poll_s = poll_s  # fallback when a notification is missed (e.g. across a Redis restart)
        self.url = redis_url
        self.checkpoints = checkpoints or {}  # id -> sha256, of the checkpoints this node serves
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                             socket_connect_timeout=socket_timeout_s)
        self._live_script = self.redis.register_script(_LIVE)
        self._live: dict[str, tuple[float, list[str]]] = {}  # sha -> (monotonic time it is good until, names)
        self._events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task | None = None
        self.metrics = metrics  # for the gauges read at scrape time: dead letters, live workers
        if metrics is not None:
            metrics.on_scrape(self._scrape)

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def warn_if_evicting(self) -> None:
        await warn_if_evicting(self.redis, self.url)

    async def _listen(self) -> None:
        """Wake local waiters when a worker announces an id; reconnect after Redis outages."""
        while True:
            try:
                async with self.redis.pubsub() as ps:
                    await ps.subscribe(self.keys.done)
                    async for message in ps.listen():
                        if message["type"] == "message":
                            event = self._events.get(message["data"].decode(errors="replace"))
                            if event is not None:
                                event.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("job notifications interrupted (%s); polling the cache until they return", e)
                await asyncio.sleep(1.0)

    async def live_workers(self, shas: Iterable[str], *, fresh: bool = False) -> dict[str, list[str]]:
        """The names of the live workers per checkpoint sha256; an answer is reused for LIVE_CACHE_S unless
        `fresh`, so the hot path pays about one round trip a second, not one a request."""
        shas, now = list(shas), time.monotonic()
        out = {sha: hit[1] for sha in shas if (hit := self._live.get(sha)) is not None and hit[0] > now and not fresh}
        missing = [sha for sha in shas if sha not in out]
        if missing:
            answers = await self._live_script(keys=[self.keys.workers(sha) for sha in missing])
            for sha, names in zip(missing, answers, strict=True):
                out[sha] = [n.decode(errors="replace") for n in names]
                self._live[sha] = (now + LIVE_CACHE_S, out[sha])
        return out

    async def submit(self, job: Job) -> bytes:
        sha = job.checkpoint_sha256
        try:
            depth = await self.redis.xlen(self.keys.stream)
            if depth >= self.max_pending:
                raise Overloaded(f"{depth} jobs queued for the workers; retry shortly", headers={"Retry-After": "1"})
            if not (await self.live_workers([sha]))[sha]:
                raise NoWorkers(f"no live worker serves checkpoint {job.checkpoint or sha[:12]}: start a "
                                f"`loragen worker` for it, or retry shortly")
            event = self._events.setdefault(job.adapter_id, asyncio.Event())
            entry = (await self.redis.xadd(self.keys.stream, encode_job(job))).decode()
        except (RedisError, OSError) as e:
            self._events.pop(job.adapter_id, None)
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
                    failed, error = await self.redis.mget(self.keys.failed(entry), self.keys.error(job.adapter_id))
                    live = (await self.live_workers([sha]))[sha] if failed is None and error is None else True
                except (CacheUnavailable, RedisError, OSError):
                    continue  # Redis blinked: keep waiting, the timeout still applies
                if failed is not None:
                    raise _failure(failed)
                if error is not None:
                    raise InvalidInput(error.decode())
                if not live:
                    raise NoWorkers(f"every worker serving checkpoint {job.checkpoint or sha[:12]} went silent "
                                    "while this job waited; it stays queued for the next one, retry shortly")
        finally:
            self._events.pop(job.adapter_id, None)

    async def readiness(self) -> tuple[bool, dict]:
        """(every served checkpoint has a live worker, {"workers": {checkpoint id: [worker names]}})."""
        try:
            live = await self.live_workers(self.checkpoints.values(), fresh=True)
        except (RedisError, OSError):
            return False, {"workers": None, "reason": "the queue Redis is unreachable"}
        workers = {cid: live[sha] for cid, sha in self.checkpoints.items()}
        idle = [cid for cid, names in workers.items() if not names]
        info: dict = {"workers": workers}
        if idle:
            info["reason"] = f"no live worker serves checkpoint {', '.join(idle)}"
        return not idle, info

    async def _scrape(self) -> None:
        try:
            self.metrics.dead_letters.set(await self.redis.xlen(self.keys.dead))
            live = await self.live_workers(self.checkpoints.values(), fresh=True)
        except (RedisError, OSError):
            return  # the gauges keep their last values; /ready says Redis is unreachable
        for cid, sha in self.checkpoints.items():
            self.metrics.live_workers.labels(cid).set(len(live[sha]))

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
                 socket_timeout_s: float = 2.0, name: str | None = None, max_deliveries: int = 3,
                 worker_ttl_s: float = 10.0, max_text_chars: int = 200_000):
        self.keys = Keys(prefix)
        self.cache = cache
        self.generators = generators  # by checkpoint sha256
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.worker_ttl_s = worker_ttl_s
        self.max_text_chars = max_text_chars
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        # blocking reads need a socket timeout longer than the block
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s + block_ms / 1000,
                                             socket_connect_timeout=socket_timeout_s)
        self._beat_script = self.redis.register_script(_BEAT)
        self.compute_dtype = next(iter(generators.values())).compute_dtype if generators else torch.float32
        self.ready = False

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        beat = asyncio.create_task(self._beat())  # only while this loop runs: a dead loop goes silent
        try:
            while not stop.is_set():
                try:
                    await self.ensure_group()
                    self.ready = True
                    entries = await self._claim() or await self._read()
                    if entries:
                        await self._process(entries)
                except (RedisError, OSError, CacheUnavailable) as e:
                    self.ready = False
                    if isinstance(e, ResponseError) and _hopeless(e):
                        raise
                    log.warning("worker %s: Redis unavailable (%s); retrying", self.name, e)
                    await asyncio.sleep(1.0)
        finally:
            self.ready = False
            beat.cancel()
            await self._announce(0)  # gone: API nodes stop sending this checkpoint's jobs our way at once
            await self.redis.aclose()

    # ---- liveness ----

    async def _announce(self, ttl_ms: int) -> bool:
        try:
            await self._beat_script(keys=[self.keys.workers(sha) for sha in self.generators], args=[self.name, ttl_ms])
            return True
        except (RedisError, OSError) as e:
            if ttl_ms:
                log.debug("worker %s: heartbeat failed: %s", self.name, e)
            return False

    async def _beat(self) -> None:
        ttl_ms = max(1, round(self.worker_ttl_s * 1000))
        while True:
            await self._announce(ttl_ms)
            await asyncio.sleep(self.worker_ttl_s / 3)

    # ---- reading ----

    async def _claim(self) -> list:
        """Entries another consumer took and left idle past claim_idle_ms: its process most likely died.
        An entry handed out more than max_deliveries times is dead-lettered: whatever it does to the workers
        that take it, it stops here."""
        _, claimed, _ = await self.redis.xautoclaim(self.keys.stream, GROUP, self.name, self.claim_idle_ms,
                                                   start_id="0-0", count=self.max_batch_size)
        claimed = [(eid, fields) for eid, fields in claimed if fields]
        if not claimed:
            return []
        with serving(_request_id(fields) for _, fields in claimed):
            log.warning("worker %s claimed %d abandoned jobs", self.name, len(claimed))
        self.metrics.claimed.inc(len(claimed))
        pipe = self.redis.pipeline(transaction=False)
        for eid, _ in claimed:
            pipe.xpending_range(self.keys.stream, GROUP, min=eid, max=eid, count=1)
        deliveries = [rows[0]["times_delivered"] if rows else 0 for rows in await pipe.execute()]
        keep = []
        for (eid, fields), n in zip(claimed, deliveries, strict=True):
            if n > self.max_deliveries:
                await self._dead_letter(eid, fields, BadEntry(
                    f"handed out {n} times, more than LORAGEN_MAX_DELIVERIES={self.max_deliveries}: every worker "
                    "that took it stopped before finishing it"))
            else:
                keep.append((eid, fields))
        return keep

    async def _read(self) -> list:
        got = await self.redis.xreadgroup(GROUP, self.name, {self.keys.stream: ">"}, count=self.max_batch_size,
                                          block=self.block_ms)
        return got[0][1] if got else []

    # ---- running ----

    async def _process(self, entries: list) -> None:
        groups: dict[tuple[str, str], list[tuple[bytes, Job]]] = defaultdict(list)
        finished: list[tuple[bytes, str]] = []  # (entry id, what to announce on the done channel)
        for eid, fields in entries:
            try:
                job = decode_job(fields, self.max_text_chars)
            except BadEntry as e:
                await self._dead_letter(eid, fields, e)
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
            # a deployment mismatch, not the input's fault: another worker may serve it, so nothing is stored
            why = (f"no worker here serves checkpoint {sha[:12]}" if gen is None else
                   f"this worker computes in {str(self.compute_dtype).removeprefix('torch.')}, the job asks {wanted}")
            return [await self._fail_entry(eid, job, f"{why}; retry") for eid, job in items]
        start = time.perf_counter()
        try:  # serialised on the worker thread too: ~14 MB of bytes are no work for the event loop
            data = await asyncio.to_thread(
                lambda: [a.safetensors_bytes() for a in gen.generate([job.item for _, job in items], dtype)])
        except LoragenError as e:
            if len(items) > 1:  # one bad input must not fail its neighbours
                out = []
                for one in items:
                    out += await self._generate(sha, dtype, [one])
                return out
            eid, job = items[0]
            return [await self._fail(eid, job, str(e))]
        except Exception as e:  # out of memory, a device error, a bug: not the input's fault, so worth a retry
            log.exception("worker %s: generating %d adapters (checkpoint %s, %s) failed", self.name, len(items),
                          sha[:12], dtype)
            return [await self._fail_entry(eid, job, f"generation failed on {gen.device} ({type(e).__name__}); "
                                           "retry") for eid, job in items]
        elapsed = time.perf_counter() - start
        log.info("worker %s generated %d adapters (checkpoint %s, %s) in %.1f ms", self.name, len(items), sha[:12],
                 dtype, elapsed * 1000)
        self.metrics.generation_seconds.observe(elapsed / len(items))
        self.metrics.batch_generated.labels(str(gen.device)).observe(len(items))
        done = []
        for (eid, job), payload in zip(items, data, strict=True):
            await self.cache.put(job.adapter_id, payload)
            self.metrics.generated.inc()
            done.append((eid, job.adapter_id))
        return done

    async def _fail(self, eid: bytes, job: Job, why: str) -> tuple[bytes, str]:
        """A deterministic input error: every waiter of the adapter id gets it (422) for ERROR_TTL_S."""
        with serving([job.request_id]):
            log.warning("worker %s: job %s failed: %s", self.name, job.adapter_id[:12], why)
        await self.redis.set(self.keys.error(job.adapter_id), why, ex=ERROR_TTL_S)
        return eid, job.adapter_id

    async def _fail_entry(self, eid: bytes, job: Job, why: str) -> tuple[bytes, str]:
        """A failure that a retry may not meet: only this entry's waiter hears it (503 generation_failed)."""
        with serving([job.request_id]):
            log.warning("worker %s: job %s failed: %s", self.name, job.adapter_id[:12], why)
        failure = json.dumps({"type": GenerationFailed.type, "message": why})
        await self.redis.set(self.keys.failed(eid.decode()), failure, ex=ERROR_TTL_S)
        return eid, job.adapter_id

    async def _dead_letter(self, eid: bytes, fields: dict[bytes, bytes], bad: BadEntry) -> None:
        """Set an entry aside in the dead-letter stream, with why, and answer its waiter."""
        entry, rid = eid.decode(), _request_id(fields)
        with serving([rid]):
            log.error("worker %s: job %s dead-lettered to %s: %s", self.name, entry, self.keys.dead, bad.reason)
        record: dict[str, bytes | str] = {"reason": bad.reason, "rid": rid, "entry": entry, "worker": self.name}
        if b"id" in fields:
            record["id"] = fields[b"id"]
        if bad.input_error:
            failure = {"type": InvalidInput.type, "message": bad.reason}
        else:
            failure = {"type": GenerationFailed.type, "message": f"the job was set aside, not generated: {bad.reason}"}
        pipe = self.redis.pipeline(transaction=True)  # the record and the acknowledgement together, or neither
        pipe.xadd(self.keys.dead, record, maxlen=DEAD_MAXLEN, approximate=True)
        pipe.set(self.keys.failed(entry), json.dumps(failure), ex=ERROR_TTL_S)
        pipe.xack(self.keys.stream, GROUP, eid)
        pipe.xdel(self.keys.stream, eid)
        adapter_id = fields.get(b"id", b"")
        pipe.publish(self.keys.done, adapter_id if _HEX64.fullmatch(adapter_id.decode(errors="replace")) else eid)
        await pipe.execute()
        self.metrics.jobs_dead.inc()

    async def _ack(self, ids: list[bytes]) -> None:
        if ids:
            await self.redis.xack(self.keys.stream, GROUP, *ids)
            await self.redis.xdel(self.keys.stream, *ids)  # the stream length is the queue depth


class Consumers:
    """A process's stream consumers, watched. One that ends with an exception, or returns while not asked to
    stop, is logged with its traceback and named in `failure` (for /ready), and `died` is set."""

    def __init__(self, workers: list[StreamWorker]):
        self.workers = workers
        self.stop = asyncio.Event()
        self.died = asyncio.Event()
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self.workers:
            task = loop.create_task(w.run(self.stop), name=f"stream consumer {w.name}")
            task.add_done_callback(functools.partial(self._ended, w))
            self._tasks.append(task)

    def _ended(self, worker: StreamWorker, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is None and self.stop.is_set():
            return  # asked to stop: a clean end
        if exc is not None:
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.error("stream consumer %s died: %s", worker.name, why, exc_info=exc)
        else:
            why = "it was cancelled" if task.cancelled() else "it stopped without being asked to"
            log.error("stream consumer %s died: %s", worker.name, why)
        if self.failure is None:
            self.failure = f"stream consumer {worker.name} died: {why}"
        self.died.set()

    async def close(self) -> None:
        """Stop reading; each consumer finishes and acknowledges the batch in hand."""
        self.stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def make_workers(settings, generators_per_device: list[dict[str, LoraGenerator]], cache: AdapterCache,
                 metrics: Metrics) -> list[StreamWorker]:
    """A stream consumer per device, each finding its generators by checkpoint content hash."""
    keep_freed_memory()  # this process now allocates and frees adapter-sized blocks all day long
    base = f"{socket.gethostname()}-{os.getpid()}"
    return [
        StreamWorker(settings.queue_url(), settings.cache_prefix, cache,
                     {g.checkpoint.sha256: g for g in gens.values()}, metrics,
                     max_batch_size=settings.max_batch_size, claim_idle_ms=settings.claim_idle_ms,
                     socket_timeout_s=settings.redis_timeout_s, name=f"{base}-{i}",
                     max_deliveries=settings.max_deliveries, worker_ttl_s=settings.worker_ttl_s,
                     max_text_chars=settings.max_text_chars)
        for i, gens in enumerate(generators_per_device)
    ]


async def run_worker(settings, generators_per_device: list[dict[str, LoraGenerator]], metrics: Metrics) -> int:
    """`loragen worker`: a stream consumer per device plus a small HTTP server for /health, /ready and
    /metrics. SIGTERM: stop reading, finish and acknowledge the batch in hand, withdraw the heartbeat, exit.
    A consumer that dies: /ready answers 503 naming it for EXIT_GRACE_S, then the process exits 1, for its
    supervisor to restart it."""
    from contextlib import asynccontextmanager

    import uvicorn
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse

    from service.app import RequestId
    from service.cache import RedisCache

    cache = RedisCache(settings.redis_url.get_secret_value(), prefix=settings.cache_prefix,
                       ttl_s=settings.cache_ttl_s, socket_timeout_s=settings.redis_timeout_s)
    workers = make_workers(settings, generators_per_device, cache, metrics)
    consumers = Consumers(workers)
    queue = aioredis.Redis.from_url(settings.queue_url(), socket_timeout=settings.redis_timeout_s,
                                    socket_connect_timeout=settings.redis_timeout_s)
    keys = workers[0].keys
    server: uvicorn.Server | None = None

    async def count_dead_letters() -> None:
        try:
            metrics.dead_letters.set(await queue.xlen(keys.dead))
        except (RedisError, OSError):
            pass  # the gauge keeps its last value; /ready says what is unreachable

    async def exit_when_a_consumer_dies() -> None:
        await consumers.died.wait()
        log.error("a stream consumer died; exiting in %.0f s for a supervisor to restart this worker", EXIT_GRACE_S)
        await asyncio.sleep(EXIT_GRACE_S)  # probes and scrapers see why first
        server.should_exit = True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # consumers live inside the server's lifespan: on SIGTERM uvicorn runs the shutdown below (the batch in
        # hand finished and acknowledged, the heartbeat withdrawn) before it re-raises the signal to exit
        await warn_if_evicting(queue, settings.queue_url())
        consumers.start()
        watchdog = asyncio.create_task(exit_when_a_consumer_dies())
        log.info("%d worker(s) consuming %s (group %s), health on %s:%d", len(workers), keys.stream, GROUP,
                 settings.host, settings.port)
        try:
            yield
        finally:
            watchdog.cancel()
            await consumers.close()
            await cache.close()
            await queue.aclose()

    metrics.on_scrape(count_dead_letters)
    app = FastAPI(title="loragen worker", lifespan=lifespan)
    app.add_middleware(RequestId)  # probes' access lines carry their ids, as on the API

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "workers": [w.name for w in workers]}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"workers": [w.name for w in workers], "checkpoints": sorted(generators_per_device[0])}
        if consumers.failure is not None:
            reason = consumers.failure
        elif not all(w.ready for w in workers):
            reason = "the queue Redis is unreachable"
        elif not await cache.ping():
            reason = "the cache Redis is unreachable"
        else:
            return JSONResponse({"status": "ready", **body})
        return JSONResponse({"status": "not_ready", "reason": reason, **body}, status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        await metrics.refresh()
        return Response(metrics.render(), media_type=metrics.content_type)

    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           log_config=None))  # one format with ours, through the root handler
    await server.serve()  # returns after SIGTERM/SIGINT (uvicorn handles the signals) or a consumer's death
    if consumers.failure is not None:
        return 1
    return 0 if server.started else 3  # uvicorn's exit status for a startup failure (it logged why)
