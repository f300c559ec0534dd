"""The in-process worker pool: dynamic batching, grouping, isolation of bad inputs, backpressure, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from safetensors.torch import load

from generator.config import EncoderSpec
from generator.pipeline import LoraGenerator, TaskInput
from service.errors import InvalidInput, Overloaded
from service.metrics import Metrics
from service.pool import Job, WorkerPool
from tests.helpers import tiny_checkpoint, until


@pytest.fixture(scope="module")
def generators():
    text = LoraGenerator(tiny_checkpoint("M", seed=1, e=384))
    assert text.config.encoder == EncoderSpec()
    remote = tiny_checkpoint("L", seed=2, e=384)
    # same weights, but declaring an encoder that needs remote code: text inputs fail, embeddings work
    from dataclasses import replace

    from generator.checkpoint import Checkpoint

    cfg = replace(remote.config, encoder=EncoderSpec(name="Alibaba-NLP/gte-large-en-v1.5", dim=384,
                                                     requires_remote_code=True))
    return {"text": text, "remote": LoraGenerator(Checkpoint.from_state_dict(cfg, remote.state_dict))}


def job(cid: str, item: TaskInput, dtype: str) -> Job:
    return Job(f"{cid}-{item.digest()[:8]}-{dtype}", cid, "sha-not-used-in-process", item, dtype, "float32")


def emb(seed: int) -> TaskInput:
    return TaskInput.from_embedding(torch.randn(384, generator=torch.Generator().manual_seed(seed)))


def batches(metrics: Metrics) -> tuple[float, float]:
    """(forward passes, adapters generated) from the batch-size histogram."""
    count = sum(s.value for m in metrics.batch_generated.collect() for s in m.samples if s.name.endswith("_count"))
    total = sum(s.value for m in metrics.batch_generated.collect() for s in m.samples if s.name.endswith("_sum"))
    return count, total


async def with_pool(generators, coro, **kw):
    metrics = Metrics()
    pool = WorkerPool([generators], metrics, **{"max_batch_size": 8, "max_wait_ms": 50, "max_queue": 64, **kw})
    pool.start()
    try:
        return await coro(pool), metrics
    finally:
        await pool.close()


def test_concurrent_jobs_are_batched_and_match_direct_generation(generators):
    items = [emb(i) for i in range(12)] + [TaskInput.task(f"task number {i}") for i in range(4)]

    async def run(pool):
        return await asyncio.gather(*(pool.submit(job("text", x, "float32")) for x in items))

    results, metrics = asyncio.run(with_pool(generators, run))
    passes, total = batches(metrics)
    assert total == len(items) and passes < len(items)  # batched: fewer forward passes than jobs
    for x, raw in zip(items, results, strict=True):  # float32 is exact: the same bytes as a direct call
        assert raw == generators["text"].generate([x])[0].safetensors_bytes()


def test_bfloat16_compute_batches_the_math():
    """bfloat16 trades batch invariance for speed: one forward pass per batch, results close to direct."""
    gen = LoraGenerator(tiny_checkpoint("L", seed=5, e=384), compute_dtype=torch.bfloat16)
    assert not gen.batch_invariant
    items = [emb(i) for i in range(8)]

    async def run(pool):
        return await asyncio.gather(*(pool.submit(job("bf", x, "float32")) for x in items))

    results, metrics = asyncio.run(with_pool({"bf": gen}, run))
    assert batches(metrics)[0] < len(items)
    for x, raw in zip(items, results, strict=True):
        direct, got = gen.generate([x])[0].tensors, load(raw)
        assert all(torch.allclose(got[k], direct[k], atol=2e-2, rtol=2e-2) for k in got)


def test_groups_by_checkpoint_and_dtype(generators):
    jobs = [job("text", emb(1), "float32"), job("text", emb(1), "bfloat16"), job("remote", emb(1), "float16")]

    async def run(pool):
        return await asyncio.gather(*(pool.submit(j) for j in jobs))

    results, _ = asyncio.run(with_pool(generators, run))
    dtypes = [next(iter(load(r).values())).dtype for r in results]
    assert dtypes == [torch.float32, torch.bfloat16, torch.float16]
    a, c = load(results[0]), load(results[2])
    assert any(not torch.equal(a[k], c[k].float()) for k in a)  # two checkpoints, two different adapters


def test_a_bad_input_fails_alone(generators):
    jobs = [job("remote", emb(3), "float32"), job("remote", TaskInput.task("needs gte"), "float32"),
            job("remote", emb(4), "float32")]

    async def run(pool):
        return await asyncio.gather(*(pool.submit(j) for j in jobs), return_exceptions=True)

    results, _ = asyncio.run(with_pool(generators, run))
    assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
    assert isinstance(results[1], InvalidInput) and "trust-remote-code" in results[1].message


def test_an_overflowing_adapter_in_a_batch_fails_alone(generators):
    """The adapters of a batch go to their waiters one by one; when one of them has non-finite weights (a
    finite embedding that overflows), it fails with a 422 and every other job gets the bytes of direct
    generation: those before it from the batch, those after it generated alone."""
    gen = generators["text"]
    items = [emb(11), TaskInput.from_embedding([3e38] * 384), emb(12)]
    jobs = [job("text", x, "float32") for x in items]

    async def run(pool):
        return await asyncio.gather(*(pool.submit(j) for j in jobs), return_exceptions=True)

    results, _ = asyncio.run(with_pool(generators, run))
    assert isinstance(results[1], InvalidInput) and "non-finite" in results[1].message
    for i in (0, 2):
        assert results[i] == gen.generate([items[i]])[0].safetensors_bytes()


class Held:
    """A generator whose generation blocks until `release` is set: the worker that takes its job stays busy for
    as long as the test needs, however fast the machine."""

    def __init__(self, gen: LoraGenerator):
        self.gen, self.release = gen, threading.Event()

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def iter_generate(self, inputs, dtype: str = "float32"):
        if not self.release.wait(timeout=60):
            raise RuntimeError("Held generator never released")
        return self.gen.iter_generate(inputs, dtype)

    def generate(self, inputs, dtype: str = "float32"):
        return list(self.iter_generate(inputs, dtype))


async def holding(pool: WorkerPool, held: Held, seed: int) -> asyncio.Task:
    """Submit a job to `held` and return its task once the (only) worker has it in hand and the queue is empty."""
    task = asyncio.create_task(pool.submit(job("held", emb(seed), "float32")))
    await until(lambda: pool.workers[0].current and pool.queue.qsize() == 0, timeout_s=30)
    return task


def test_full_queue_is_overloaded(generators):
    held = Held(generators["text"])

    async def run(pool):
        try:
            first = await holding(pool, held, seed=10)  # the worker holds it; the queue (size 1) takes one more
            second = asyncio.create_task(pool.submit(job("text", emb(5), "float32")))
            await until(lambda: pool.queue.qsize() == 1, timeout_s=30)
            with pytest.raises(Overloaded) as exc:
                await pool.submit(job("text", emb(6), "float32"))
            assert exc.value.headers["Retry-After"] == "1"
        finally:
            held.release.set()
        return await asyncio.gather(first, second)

    results, _ = asyncio.run(with_pool({**generators, "held": held}, run, max_queue=1, max_batch_size=1))
    assert all(isinstance(r, bytes) for r in results)


def test_a_job_whose_waiter_left_is_not_generated(generators):
    held = Held(generators["text"])

    async def run(pool):
        try:
            first = await holding(pool, held, seed=10)
            gone = asyncio.create_task(pool.submit(job("text", emb(7), "float32")))
            await until(lambda: pool.queue.qsize() == 1, timeout_s=30)
            gone.cancel()  # the client disconnected while its job was queued
            await until(lambda: pool.queue.queue[0].future.cancelled(), timeout_s=30)
        finally:
            held.release.set()
        await first
        # one worker, one job per batch, first in first out: once a job queued after the cancelled one is
        # done, the worker has taken (and dropped) the cancelled job
        await pool.submit(job("text", emb(8), "float32"))
        return gone

    gone, metrics = asyncio.run(with_pool({**generators, "held": held}, run, max_batch_size=1))
    assert gone.cancelled()
    assert batches(metrics) == (2, 2)  # the held job and the one after: not the cancelled one


def test_a_dead_worker_is_replaced_and_its_jobs_fail_fast(generators):
    """A job that crashes its worker thread (here: one naming a checkpoint the worker lacks, which the
    service never sends) fails with a retryable 503, and a new worker serves the next job."""
    from service.errors import Unavailable

    async def run(pool):
        with pytest.raises(Unavailable) as exc:
            await asyncio.wait_for(pool.submit(job("missing", emb(8), "float32")), timeout=10)
        assert exc.value.headers["Retry-After"] == "1"
        return await asyncio.wait_for(pool.submit(job("text", emb(9), "float32")), timeout=30)

    result, metrics = asyncio.run(with_pool(generators, run))
    assert isinstance(result, bytes)
    assert metrics.worker_restarts._value.get() == 1
