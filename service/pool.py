"""In-process worker pool: one worker thread per device, a bounded queue, dynamic batching.

    submit(job) ─► bounded queue ─► worker (one per device) takes up to max_batch_size jobs, waiting at most
                   max_wait_ms after the first; groups them by (checkpoint, dtype); one encoder + hypernetwork
                   pass per group; each waiter gets its own adapter bytes

Torch runs on the worker threads (it releases the GIL), never on the event loop. A job whose waiters all
left before a worker took it is skipped. A worker whose thread dies is replaced, and the jobs it held fail
at once with a retryable 503 instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from generator.errors import DocumentTooLarge, LoragenError
from generator.pipeline import LoraGenerator, TaskInput
from service.errors import GenerationFailed, InvalidInput, Overloaded, PayloadTooLarge, Unavailable
from service.logctx import NO_REQUEST, serving
from service.malloc import keep_freed_memory
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    adapter_id: str
    checkpoint: str  # id on this node
    checkpoint_sha256: str  # identity across nodes: a remote worker finds its generator by this
    item: TaskInput
    dtype: str  # output dtype
    compute_dtype: str
    request_id: str = NO_REQUEST  # of the request that asked first: the worker's log lines name it


@dataclass(eq=False)
class _Entry:
    job: Job
    future: concurrent.futures.Future  # bytes, or an ApiError


class Worker:
    """A thread on one device holding that device's generators (encoder + hypernetwork per checkpoint)."""

    def __init__(self, pool: WorkerPool, index: int, generators: dict[str, LoraGenerator]):
        self.pool, self.index, self.generators = pool, index, generators
        self.device = str(next(iter(generators.values())).device) if generators else "cpu"
        self.current: list[_Entry] = []
        # every compute dtype batches (float32 through the exact forward, bit-identical to one input alone); only
        # generators that run inputs one at a time (exact_batching off) gain nothing from waiting for a batch
        one_at_a_time = bool(generators) and all(g.batch_invariant and not g.exact_batching
                                                 for g in generators.values())
        self.wait_s = 0.0 if one_at_a_time else pool.max_wait_s
        self.thread = threading.Thread(target=self._loop, name=f"loragen-worker-{index}", daemon=True)

    def _loop(self) -> None:
        while not self.pool.stopping.is_set():
            batch = self.pool.take_batch(self.wait_s)
            if not batch:
                continue
            self.current = batch
            try:
                self._run(batch)
            except BaseException:  # a bug: the thread ends; the supervisor fails `current` and replaces it
                with serving(e.job.request_id for e in batch):
                    log.exception("worker %d (%s) crashed with %d jobs in hand", self.index, self.device, len(batch))
                return
            self.current = []

    def _run(self, batch: list[_Entry]) -> None:
        groups: dict[tuple[str, str], list[_Entry]] = defaultdict(list)
        for e in batch:
            groups[(e.job.checkpoint, e.job.dtype)].append(e)
        for (cid, dtype), entries in groups.items():
            with serving(e.job.request_id for e in entries):
                self._run_group(self.generators[cid], dtype, entries)

    def _run_group(self, gen: LoraGenerator, dtype: str, entries: list[_Entry]) -> None:
        """One forward pass for the group; each waiter gets its adapter's bytes as soon as that adapter is laid
        out, so the event loop sends the first while the worker lays out the next."""
        start = time.perf_counter()
        done, serialising = 0, 0.0
        try:
            for e, adapter in zip(entries, gen.iter_generate([e.job.item for e in entries], dtype), strict=True):
                t = time.perf_counter()
                body = adapter.safetensors_bytes()
                serialising += time.perf_counter() - t
                _settle(e, result=body)
                done += 1
        except LoragenError:
            for e in entries[done:]:  # one bad input must not fail its neighbours: run each of the rest alone
                self._alone(e, gen, dtype)
            return
        except Exception:  # a bug or a device failure: retryable for the client, logged for us
            log.exception("worker %d (%s) failed a batch of %d", self.index, self.device, len(entries))
            for e in entries[done:]:
                _settle(e, error=GenerationFailed(f"generation failed on {self.device}; retry"))
            return
        elapsed = time.perf_counter() - start - serialising  # generation alone, as the metric says
        log.debug("worker %d (%s) generated %d adapters in %.1f ms", self.index, self.device, len(entries),
                  elapsed * 1000)
        self.pool.metrics.generation_seconds.observe(elapsed / len(entries))
        self.pool.metrics.batch_generated.labels(self.device).observe(len(entries))

    @staticmethod
    def _alone(e: _Entry, gen: LoraGenerator, dtype: str) -> None:
        """One job on its own; its LoragenError (a bad input) becomes its waiter's 422."""
        try:
            (adapter,) = gen.generate([e.job.item], dtype)
            _settle(e, result=adapter.safetensors_bytes())
        except LoragenError as err:
            with serving([e.job.request_id]):
                log.info("refused an input: %s", err)
            # a document past the server's token limit is a 413, any other refusal a 422; the message names why
            _settle(e, error=(PayloadTooLarge if isinstance(err, DocumentTooLarge) else InvalidInput)(str(err)))


def model_memory(generators_per_device: list[dict[str, LoraGenerator]]) -> dict[tuple[str, str, str], int]:
    """Bytes of each held model: (checkpoint, device, 'hypernetwork' | 'base') -> bytes."""
    out = {}
    for generators in generators_per_device:
        for cid, gen in generators.items():
            net = sum(t.numel() * t.element_size() for t in gen.net.parameters())
            out[(cid, str(gen.device), "hypernetwork")] = net
            base = getattr(gen, "base", None)  # a Doc-to-LoRA checkpoint holds its base model beside the hypernetwork
            if base is not None:
                out[(cid, str(gen.device), "base")] = base.n_bytes
    return out


def _settle(e: _Entry, result: bytes | None = None, error: Exception | None = None) -> None:
    if e.future.done():  # cancelled by its waiter meanwhile
        return
    if error is not None:
        e.future.set_exception(error)
    else:
        e.future.set_result(result)


class WorkerPool:
    stores_results = False  # AdapterService caches what the pool returns

    def __init__(self, generators_per_device: list[dict[str, LoraGenerator]], metrics: Metrics, *,
                 max_batch_size: int, max_wait_ms: float, max_queue: int):
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue: queue.Queue[_Entry] = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.workers = [Worker(self, i, g) for i, g in enumerate(generators_per_device)]
        self._supervisor: asyncio.Task | None = None
        metrics.queue_depth.set_function(self.queue.qsize)
        self.memory = model_memory(generators_per_device)
        for (cid, device, part), n in self.memory.items():
            metrics.model_bytes.labels(cid, device, part).set(n)

    def start(self) -> None:
        keep_freed_memory()  # this process now allocates and frees adapter-sized blocks all day long
        for w in self.workers:
            w.thread.start()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self, every_s: float = 0.5) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(every_s)
            for i, w in enumerate(self.workers):
                if not w.thread.is_alive() and not self.stopping.is_set():
                    with serving(e.job.request_id for e in w.current):
                        log.error("worker %d (%s) died; failing its %d jobs and restarting it", i, w.device,
                                  len(w.current))
                    for e in w.current:
                        _settle(e, error=Unavailable("the worker holding this request died; retry",
                                                     headers={"Retry-After": "1"}))
                    self.workers[i] = Worker(self, i, w.generators)
                    self.workers[i].thread.start()
                    self.metrics.worker_restarts.inc()

    def take_batch(self, wait_s: float) -> list[_Entry]:
        """Called on a worker thread: block briefly for a first job, then gather more until the batch is
        full or `wait_s` has passed since the first. Jobs whose waiters left are dropped here."""
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return [e for e in batch if e.future.set_running_or_notify_cancel()]

    async def submit(self, job: Job) -> bytes:
        entry = _Entry(job, concurrent.futures.Future())
        try:
            self.queue.put_nowait(entry)
        except queue.Full:
            raise Overloaded(f"generation queue full ({self.queue.maxsize} waiting); retry shortly",
                             headers={"Retry-After": "1"}) from None
        # cancelling the awaiting task cancels the future: a job not yet taken by a worker is skipped
        return await asyncio.wrap_future(entry.future)

    async def readiness(self) -> tuple[bool, dict]:
        # a dead worker thread is replaced by the supervisor; the models' memory is what an operator sizes hosts by
        memory: dict[str, dict[str, int]] = defaultdict(dict)
        for (cid, _device, part), n in self.memory.items():  # summed over devices
            memory[cid][f"{part}_bytes"] = memory[cid].get(f"{part}_bytes", 0) + n
        return True, {"model_memory": dict(memory)}

    async def close(self, timeout_s: float = 5.0) -> None:
        self.stopping.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
        while True:  # nobody will take what is still queued: fail it rather than leave it hanging
            try:
                _settle(self.queue.get_nowait(), error=Unavailable("shutting down; retry", headers={"Retry-After": "1"}))
            except queue.Empty:
                break
        for w in self.workers:  # a worker finishes the batch in hand; joining blocks, so not on the loop
            await asyncio.to_thread(w.thread.join, timeout_s)
