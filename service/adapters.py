"""AdapterService: adapter ids, cache look-ups, single-flight generation off the event loop.

    request ─► id = sha256(checkpoint hash, normalised input, dtype, compute dtype, format version)
            ─► cache hit: stored bytes
            ─► miss: one generation per id in this process (waiters share a task), and across replicas
               through a Redis lock; the worker pool batches it with others, off the event loop
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Protocol

from generator.checkpoint import Checkpoint
from generator.errors import InputError
from generator.pipeline import TaskInput
from generator.stack import check_weights, stack_adapters
from service.cache import AdapterCache, CacheUnavailable
from service.errors import InvalidInput, NotFound, Overloaded, Timeout, Unavailable
from service.logctx import request_id_var
from service.metrics import Metrics
from service.pool import Job
from service.settings import Settings

log = logging.getLogger(__name__)

# bump when the bytes for the same input may change (layout, metadata, arithmetic). 2: float32 generation runs the
# exact batched forward, whose head products are split in column blocks (bit-identical to the plain forward on
# the machines measured, but not guaranteed to be on every one)
ADAPTER_FORMAT_VERSION = 2


@dataclass(frozen=True)
class Result:
    adapter_id: str
    data: bytes
    hit: bool


class Backend(Protocol):
    """Where generation happens: the in-process WorkerPool, or remote workers through a Redis Stream."""

    stores_results: bool  # True: the backend writes the cache itself (remote workers)

    def start(self) -> None: ...

    async def submit(self, job: Job) -> bytes: ...

    async def readiness(self) -> tuple[bool, dict]:
        """(ready, what /ready shows of it; a "reason" key when not ready)."""
        ...

    async def close(self) -> None: ...


class AdapterService:
    def __init__(self, settings: Settings, checkpoints: dict[str, Checkpoint], cache: AdapterCache, metrics: Metrics,
                 backend: Backend, identities: dict[str, dict] | None = None):
        self.settings = settings
        self.checkpoints = checkpoints
        # per Doc-to-LoRA checkpoint: the base model's hash and the chunking, which its adapters depend on too
        self.identities = identities or {}
        self.default = settings.default_checkpoint or next(iter(checkpoints), None)
        self.cache = cache
        self.metrics = metrics
        self.backend = backend
        self.cache_ok = True  # False while the cache backend is unreachable: we generate uncached
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._waiters: dict[str, int] = {}  # per in-flight id: requests still waiting for it
        self._combining: dict[str, asyncio.Task[bytes]] = {}  # stacked adapters being made, by id
        metrics.pending.set_function(lambda: len(self._inflight))

    # ---- identity ----

    @property
    def default_dtype(self) -> str:
        """The output dtype of a request that names none: what the server computes in. A bfloat16-computed
        adapter stored in bfloat16 is exactly what was computed, in half the bytes of float32."""
        return "bfloat16" if self.settings.compute_dtype == "bfloat16" else "float32"

    def resolve(self, checkpoint: str | None) -> tuple[str, Checkpoint]:
        cid = checkpoint or self.default
        if cid not in self.checkpoints:
            served = ", ".join(self.checkpoints) or "none"
            raise InvalidInput(f"unknown checkpoint {checkpoint!r}; served: {served}")
        return cid, self.checkpoints[cid]

    def adapter_id(self, ckpt: Checkpoint, item: TaskInput, dtype: str, cid: str | None = None) -> str:
        key = {
            "checkpoint": ckpt.sha256,
            "input": [item.kind, item.digest()],
            "dtype": dtype,
            "compute_dtype": self.settings.compute_dtype,
            "format_version": ADAPTER_FORMAT_VERSION,
        }
        if cid in self.identities:  # a Doc-to-LoRA checkpoint: its base model and chunking decide the bytes too
            key["reader"] = self.identities[cid]
        return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # ---- cache, degrading to uncached when the backend is down ----

    async def cached(self, adapter_id: str) -> bytes | None:
        near_hits = self.cache.stats.near_hits
        try:
            data = await self.cache.get(adapter_id)
        except CacheUnavailable as e:
            self._cache_down(e)
            return None
        if self.cache.stats.near_hits == near_hits:  # a hit from process memory says nothing about Redis
            self._cache_up()
        self.metrics.cache_lookups.labels("hit" if data is not None else "miss").inc()
        return data

    async def _store(self, adapter_id: str, data: bytes) -> None:
        try:
            await self.cache.put(adapter_id, data)
            self._cache_up()
        except CacheUnavailable as e:
            self._cache_down(e)

    def _cache_down(self, e: Exception) -> None:
        if self.cache_ok:
            log.warning("cache unavailable, serving uncached until it returns: %s", e)
        self.cache_ok = False

    def _cache_up(self) -> None:
        if not self.cache_ok:
            log.info("cache reachable again")
        self.cache_ok = True

    async def size(self, adapter_id: str) -> int | None:
        """The stored size of a cached adapter, without reading it; None when it is not cached. 503 while the
        cache is unreachable (absence cannot be told from an outage)."""
        try:
            size = await self.cache.size(adapter_id)
        except CacheUnavailable as e:
            self._cache_down(e)
            raise Unavailable("the adapter cache is unreachable; retry shortly", headers={"Retry-After": "2"}) from None
        self._cache_up()
        return size

    async def get(self, adapter_id: str) -> bytes:
        data = await self.cached(adapter_id)
        if data is None:
            if not self.cache_ok:
                raise Unavailable("the adapter cache is unreachable; retry shortly", headers={"Retry-After": "2"})
            raise NotFound(f"no cached adapter {adapter_id}; POST /v1/adapters to generate it")
        return data

    # ---- generation ----

    async def get_or_generate(self, checkpoint: str | None, item: TaskInput, dtype: str | None = None) -> Result:
        """The adapter for `item`, from the cache or generated; `dtype` None: `default_dtype`. The id is made from
        the dtype resolved, so a request naming the default and one naming none share one id and one entry."""
        dtype = dtype or self.default_dtype
        cid, ckpt = self.resolve(checkpoint)
        if item.kind == "embedding" and ckpt.kind == "d2l":
            raise InvalidInput(f"checkpoint {cid} is a Doc-to-LoRA checkpoint: its base model reads a text, so a ready "
                               "embedding cannot condition it; send the document or task description as text")
        if item.kind == "embedding" and ckpt.config.reader is not None:
            raise InvalidInput(f"checkpoint {cid} reads the token states of a text (it has a token reader), so a "
                               "ready embedding cannot condition it; send the task or document as text instead")
        if item.kind == "embedding" and len(item.embedding) != ckpt.config.task_emb_dim:
            raise InvalidInput(f"embedding has {len(item.embedding)} values; checkpoint {cid} takes "
                               f"{ckpt.config.task_emb_dim}")
        adapter_id = self.adapter_id(ckpt, item, dtype, cid)
        data = await self.cached(adapter_id)
        if data is not None:
            return Result(adapter_id, data, hit=True)
        task = self._inflight.get(adapter_id)
        if task is None:
            if len(self._inflight) >= self.settings.max_pending:
                raise Overloaded(f"{len(self._inflight)} generations pending; retry shortly",
                                 headers={"Retry-After": "1"})
            job = Job(adapter_id, cid, ckpt.sha256, item, dtype, self.settings.compute_dtype, request_id_var.get())
            task = asyncio.create_task(self._generate(job))
            self._inflight[adapter_id] = task
            task.add_done_callback(lambda _t: self._inflight.pop(adapter_id, None))
        self._waiters[adapter_id] = self._waiters.get(adapter_id, 0) + 1
        try:
            # shield: a waiter that times out leaves the generation running, to be cached for a retry
            data = await asyncio.wait_for(asyncio.shield(task), self.settings.request_timeout_s)
        except TimeoutError:
            raise Timeout(f"generation took longer than {self.settings.request_timeout_s:g} s; "
                          "the adapter will be cached when it completes, retry later") from None
        except asyncio.CancelledError:
            # the client hung up: if nobody else waits for this id, its queued job is dropped unrun
            if self._waiters[adapter_id] == 1:
                task.cancel()
            raise
        finally:
            self._waiters[adapter_id] -= 1
            if not self._waiters[adapter_id]:
                del self._waiters[adapter_id]
        return Result(adapter_id, data, hit=False)

    async def _generate(self, job: Job) -> bytes:
        try:
            async with self.cache.lock(job.adapter_id, self.settings.lock_ttl_s) as owner:
                if owner:  # another replica may have finished between our miss and our lock
                    data = await self.cache.get(job.adapter_id)
                else:  # another replica generates it: wait for its result, else do it ourselves
                    data = await self.cache.wait_for(job.adapter_id, self.settings.lock_ttl_s)
                if data is not None:
                    return data
                return await self._run(job)
        except CacheUnavailable as e:
            self._cache_down(e)
            return await self._run(job)

    async def _run(self, job: Job) -> bytes:
        data = await self.backend.submit(job)  # batched with others, on a worker thread or a remote worker
        if not self.backend.stores_results:  # remote workers cache (and count) what they generate
            self.metrics.generated.inc()
            await self._store(job.adapter_id, data)
        return data

    # ---- stacking cached adapters (generator/stack.py) ----

    @staticmethod
    def combine_id(sources: list[tuple[str, float]], dtype: str | None) -> str:
        """The stacked adapter's id: its sources' ids and weights, in order, the dtype asked for (None: the
        sources' own) and the format version."""
        key = {"adapters": [[i, w] for i, w in sources], "dtype": dtype, "format_version": ADAPTER_FORMAT_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    async def combine(self, sources: list[tuple[str, float]], dtype: str | None = None) -> Result:
        """The cached adapters `sources` (id, weight) stacked into one, from the cache or made (once per id in
        this process, off the event loop) and cached. 404 naming a source not cached, 503 while the cache is
        unreachable, 422 for sources that do not stack."""
        try:
            check_weights([w for _, w in sources])
        except InputError as e:
            raise InvalidInput(str(e)) from None
        adapter_id = self.combine_id(sources, dtype)
        data = await self.cached(adapter_id)
        if data is not None:
            return Result(adapter_id, data, hit=True)
        task = self._combining.get(adapter_id)
        if task is None:
            task = self._combining[adapter_id] = asyncio.create_task(self._combine(adapter_id, sources, dtype))

            def done(t: asyncio.Task[bytes]) -> None:
                del self._combining[adapter_id]
                if not t.cancelled():
                    t.exception()  # retrieved: a failure nobody awaited any more is not logged as unhandled

            task.add_done_callback(done)
        # shield: a caller that hangs up leaves the stacking to finish and be cached
        return Result(adapter_id, await asyncio.shield(task), hit=False)

    async def _combine(self, adapter_id: str, sources: list[tuple[str, float]], dtype: str | None) -> bytes:
        ids = [i for i, _ in sources]
        unique = list(dict.fromkeys(ids))  # a source named twice is fetched once
        files = dict(zip(unique, await asyncio.gather(*(self.get(i) for i in unique)), strict=True))

        def stacked() -> bytes:  # on a worker thread: the tensor work and the serialising
            return stack_adapters([files[i] for i in ids], [w for _, w in sources], ids, dtype=dtype).safetensors_bytes()

        try:
            data = await asyncio.to_thread(stacked)
        except InputError as e:
            raise InvalidInput(str(e)) from None
        await self._store(adapter_id, data)
        return data
