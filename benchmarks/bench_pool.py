#!/usr/bin/env python
"""Throughput and latency of the in-process worker pool (service/pool.py) at the Mistral-7B T2L dims.

A WorkerPool with one CPU worker holds one LoraGenerator (random, seeded weights shaped like the released
Mistral-7B-Instruct-v0.2 T2L checkpoint; see bench_generate.py). Clients are asyncio tasks in a closed loop:
each submits a Job, awaits its safetensors bytes, then submits the next, until the run's n jobs are done.
Every job has its own adapter id and its own random task embedding (no cache exists at this level, and no
text encoder runs). What is measured, per compute dtype:

  (a) batch sweep        max_batch_size in {1, 4, 16} at a fixed, high client concurrency (32):
                         adapters/s, and its ratio to max_batch_size=1 (unbatched)
  (b) concurrency sweep  client concurrency in {1, 4, 16, 32} at max_batch_size=16:
                         adapters/s, p50/p95 latency (submit → bytes back), ratio to concurrency 1
  direct (reference)     the same work without the pool: `generate([x])` + `safetensors_bytes()` one job
                         at a time, and in chunks of max(batch sizes), one call after another on a thread

Every row also reports the mean batch size the worker actually formed (sum/count of the pool's
`loragen_generation_batch_size` histogram over the timed jobs only) and the other processes' CPU use
during the row (from /proc/stat; above ~0.1 cores the row was taken under contention). Each row is
`--repeats` runs of n jobs, each on a fresh pool (same generator) after an untimed warm-up of
min(concurrency, 16) jobs; adapters/s is n / wall time of a run (median over runs, [min–max]); latency
percentiles pool the jobs of all runs of the row.

Since 3b97e85, a float32 LoraGenerator is `batch_invariant`: `generate()` runs each input as its own forward
pass, so that an adapter's bytes never depend on its batch. The pool still forms batches (the histogram
counts jobs per `generate()` call), but in float32 the math is not batched; bfloat16 batches the forward.
The JSON records `batch_invariant` per dtype and the git commit measured.

    .venv/bin/python benchmarks/bench_pool.py --json benchmarks/results/pool-cpu.json
    .venv/bin/python benchmarks/bench_pool.py --wait-idle 300 --retries 2 --json benchmarks/results/pool-cpu.json
    .venv/bin/python benchmarks/bench_pool.py --quick      # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402

from benchmarks.bench_generate import mistral_t2l_config  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DTYPES,
    IdleWaiter,
    add_common_args,
    git_state,
    guarded,
    machine_info,
    peak_rss_mib,
    report,
)
from generator.checkpoint import Checkpoint  # noqa: E402
from generator.hypernet import build_hypernet  # noqa: E402
from generator.pipeline import LoraGenerator, TaskInput  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.pool import Job, WorkerPool  # noqa: E402

CKPT_ID = "mistral-t2l-dims"
DEVICE = "cpu"
HIST = "loragen_generation_batch_size"
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


# ------------------------------------------------------------------------------------------- inputs

class Inputs:
    """Distinct task embeddings (T2L-style: unit L2 norm times sqrt(E)), built outside any timed region.
    Every input of the whole run is checked to be distinct (by its digest)."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.g, self.count, self.seen = dim, torch.Generator().manual_seed(seed), 0, set()

    def take(self, n: int) -> list[TaskInput]:
        e = torch.randn(n, self.dim, generator=self.g)
        e = e / e.norm(dim=-1, keepdim=True) * self.dim**0.5
        out = [TaskInput.from_embedding(row) for row in e]
        for x in out:
            d = x.digest()
            if d in self.seen:
                raise RuntimeError("duplicate task embedding: every job must be distinct")
            self.seen.add(d)
        self.count += n
        return out


def make_jobs(items: list[TaskInput], gen: LoraGenerator, dn: str, tag: str, out: str = "float32") -> list[Job]:
    """One job per input: compute dtype `dn`, output dtype `out`."""
    return [Job(f"bench-{tag}-{x.digest()[:16]}", CKPT_ID, gen.checkpoint.sha256, x, out, dn) for x in items]


# ------------------------------------------------------------------------------------------ pool runs

def hist_snapshot(metrics: Metrics) -> dict:
    """count, sum and cumulative bucket counts of the batch-size histogram of the CPU worker."""
    r, lab = metrics.registry, {"device": DEVICE}
    get = lambda name, extra=None: r.get_sample_value(name, {**lab, **(extra or {})}) or 0.0  # noqa: E731
    return {"count": get(f"{HIST}_count"), "sum": get(f"{HIST}_sum"),
            "le": {b: get(f"{HIST}_bucket", {"le": str(float(b))}) for b in BUCKETS}}


def hist_delta(a: dict, b: dict) -> dict:
    count, total = b["count"] - a["count"], b["sum"] - a["sum"]
    cum = {k: b["le"][k] - a["le"][k] for k in BUCKETS}
    per_bucket, prev, lo = {}, 0.0, 1
    for k in BUCKETS:  # cumulative → per bucket, labelled by the sizes each bucket holds
        n = cum[k] - prev
        if n:
            per_bucket[str(k) if lo == k else f"{lo}-{k}"] = int(n)
        prev, lo = cum[k], k + 1
    return {"forward_passes": int(count), "adapters": int(total),
            "mean_batch": total / count if count else None, "batches_by_size": per_bucket}


async def closed_loop(pool: WorkerPool, jobs: list[Job], concurrency: int) -> tuple[list[float], set[int]]:
    """`concurrency` clients share the job list; each submits one job, awaits it, takes the next."""
    it = iter(enumerate(jobs))  # one event loop thread: sharing a plain iterator is safe
    lat = [0.0] * len(jobs)
    sizes: set[int] = set()

    async def client() -> None:
        for i, job in it:
            t0 = time.perf_counter()
            raw = await pool.submit(job)
            lat[i] = time.perf_counter() - t0
            sizes.add(len(raw))  # the bytes are dropped at once, as a streamed response would

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, sizes


async def pool_run(gen: LoraGenerator, warm: list[Job], jobs: list[Job], *, max_batch_size: int,
                   max_wait_ms: float, concurrency: int) -> dict:
    metrics = Metrics()
    pool = WorkerPool([{CKPT_ID: gen}], metrics, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      max_queue=max(64, 2 * concurrency))
    pool.start()
    try:
        await closed_loop(pool, warm, concurrency)
        h0 = hist_snapshot(metrics)
        t0, c0 = time.perf_counter(), time.process_time()
        lat, sizes = await closed_loop(pool, jobs, concurrency)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        h1 = hist_snapshot(metrics)
    finally:
        await pool.close()
    return {"wall_s": wall, "cpu_s": cpu, "latencies_s": lat, "bytes_sizes": sorted(sizes), "hist": hist_delta(h0, h1)}


def direct_run(gen: LoraGenerator, warm: list[TaskInput], items: list[TaskInput], chunk: int) -> dict:
    """The pool's work without the pool: generate + serialise, `chunk` inputs per call, one call after another,
    on a fresh thread as the pool's worker is (on this machine a busy other process slowed the main thread's
    torch calls more than a fresh thread's)."""
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(_direct(gen, warm, items, chunk)), name="bench-direct")
    th.start()
    th.join()
    if not out:
        raise RuntimeError("the direct run failed (see the traceback above)")
    return out


def _direct(gen: LoraGenerator, warm: list[TaskInput], items: list[TaskInput], chunk: int) -> dict:
    def go(xs: list[TaskInput]) -> tuple[list[float], set[int]]:
        lat, sizes = [], set()
        for i in range(0, len(xs), chunk):
            t0 = time.perf_counter()
            for a in gen.generate(xs[i:i + chunk], "float32"):
                sizes.add(len(a.safetensors_bytes()))
            lat += [time.perf_counter() - t0] * len(xs[i:i + chunk])  # each job waits for its whole chunk
        return lat, sizes

    go(warm)
    gc.collect()
    t0 = time.perf_counter()
    lat, sizes = go(items)
    return {"wall_s": time.perf_counter() - t0, "latencies_s": lat, "bytes_sizes": sorted(sizes)}


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) >= 2 else xs[0]


def summarise_row(runs: list[dict], n: int, concurrency: int) -> dict:
    rates = [n / r["wall_s"] for r in runs]
    lat = [t for r in runs for t in r["latencies_s"]]
    row = {
        "n_jobs": n, "runs": len(runs), "concurrency": concurrency,
        "adapters_per_s": statistics.median(rates), "adapters_per_s_runs": rates,
        "adapters_per_s_range": [min(rates), max(rates)],
        "latency_p50_ms": 1e3 * pct(lat, 50), "latency_p95_ms": 1e3 * pct(lat, 95),
        "latency_mean_ms": 1e3 * statistics.fmean(lat), "latency_max_ms": 1e3 * max(lat),
        # closed loop, Little's law: mean latency ≈ concurrency / throughput
        "littles_law_latency_ms": 1e3 * concurrency / statistics.median(rates),
        "other_load_cores": [r["other_load_cores"] for r in runs],
        "attempts": [r["attempts"] for r in runs],
        "bytes_per_adapter": sorted({s for r in runs for s in r["bytes_sizes"]}),
        "wall_s_runs": [r["wall_s"] for r in runs],
        "peak_rss_mib_after": peak_rss_mib(),
    }
    if "hist" in runs[0]:
        passes = sum(r["hist"]["forward_passes"] for r in runs)
        adapters = sum(r["hist"]["adapters"] for r in runs)
        row["forward_passes"], row["mean_batch"] = passes, adapters / passes if passes else None
        row["hist_adapters"] = adapters
        row["batches_by_size"] = [r["hist"]["batches_by_size"] for r in runs]
        row["hist_ok"] = adapters == n * len(runs)  # the histogram saw every timed job, and nothing else
    loads = [x for x in row["other_load_cores"] if x is not None]
    row["other_load_cores_max"] = max(loads) if loads else None
    return row


# ------------------------------------------------------------------------------------------ phases

def sanity(gen: LoraGenerator, inputs: Inputs, dn: str) -> dict:
    """4 jobs through a pool (max_batch_size 4): the bytes parse, hold every tensor, and match a direct
    generate of the same input (batched kernels may differ from a batch of one in the last bits)."""
    items = inputs.take(4)
    jobs = make_jobs(items, gen, dn, f"{dn}-sanity")

    async def go():
        metrics = Metrics()
        pool = WorkerPool([{CKPT_ID: gen}], metrics, max_batch_size=4, max_wait_ms=200, max_queue=8)
        pool.start()
        try:
            return await asyncio.gather(*(pool.submit(j) for j in jobs)), hist_snapshot(metrics)
        finally:
            await pool.close()

    raws, h = asyncio.run(go())
    worst, keys_ok = 0.0, True
    for x, raw in zip(items, raws, strict=True):
        got, direct = st_load(raw), gen.generate([x], "float32")[0].tensors
        keys_ok &= sorted(got) == sorted(direct) and all(got[k].shape == direct[k].shape for k in got)
        for k in got:
            scale = direct[k].abs().max().item() or 1.0
            worst = max(worst, (got[k] - direct[k]).abs().max().item() / scale)
    return {"keys_and_shapes_match_direct": bool(keys_ok), "tensors_per_adapter": len(st_load(raws[0])),
            "bytes_per_adapter": len(raws[0]), "max_abs_diff_vs_direct_rel_to_max": worst,
            "forward_passes": int(h["count"]), "adapters": int(h["sum"])}


def bench_dtype(ckpt: Checkpoint, dn: str, inputs: Inputs, args) -> dict:
    gen = LoraGenerator(ckpt, compute_dtype=DTYPES[dn])
    n = args.jobs[dn]
    # float32 generators are batch-invariant: they batch through the exact forward
    res: dict = {"n_jobs": n, "repeats": args.repeats, "batch_invariant": getattr(gen, "batch_invariant", None)}
    res["sanity"] = sanity(gen, inputs, dn)
    print(f"  {dn}: batch_invariant {res['batch_invariant']}; sanity {res['sanity']}", flush=True)

    def measure(label: str, *, mbs: int | None, conc: int, direct_chunk: int | None = None) -> dict:
        runs = []
        for _ in range(args.repeats):
            warm_n = max(2, min(conc, 16)) if direct_chunk is None else max(2, direct_chunk)
            warm, items = inputs.take(warm_n), inputs.take(n)  # fresh, distinct inputs for every run
            if direct_chunk is None:
                wj, jj = make_jobs(warm, gen, dn, label), make_jobs(items, gen, dn, label)
                block = lambda wj=wj, jj=jj: asyncio.run(pool_run(  # noqa: E731
                    gen, wj, jj, max_batch_size=mbs, max_wait_ms=args.max_wait_ms, concurrency=conc))
            else:
                block = lambda warm=warm, items=items: direct_run(gen, warm, items, direct_chunk)  # noqa: E731
            gc.collect()
            out, load, attempts = guarded(args, block)
            out["other_load_cores"], out["attempts"] = load, attempts
            runs.append(out)
        row = summarise_row(runs, n, conc)
        row.update({"max_batch_size": mbs, "max_wait_ms": args.max_wait_ms if mbs else None})
        for r in runs:
            del r["latencies_s"]  # pooled into the row's percentiles; the raw list would bloat the JSON
        row["run_details"] = runs
        mb = row.get("mean_batch")
        print(f"  {dn:8s} {label:22s} {row['adapters_per_s']:7.2f} adapters/s "
              f"[{row['adapters_per_s_range'][0]:.2f}–{row['adapters_per_s_range'][1]:.2f}] "
              f"p50 {row['latency_p50_ms']:7.1f} ms p95 {row['latency_p95_ms']:7.1f} ms "
              f"mean batch {'–' if mb is None else f'{mb:.2f}'} | n={n}×{args.repeats} | "
              f"RSS {peak_rss_mib():.0f} MiB | other procs' cores {row['other_load_cores']}", flush=True)
        return row

    res["batch_sweep"] = {str(b): measure(f"max_batch={b} c={args.concurrency}", mbs=b, conc=args.concurrency)
                          for b in args.batch_sizes}
    base = res["batch_sweep"][str(min(args.batch_sizes))]["adapters_per_s"]
    for row in res["batch_sweep"].values():
        row["vs_unbatched"] = row["adapters_per_s"] / base
    res["concurrency_sweep"] = {str(c): measure(f"c={c} max_batch={args.sweep_batch_size}",
                                                mbs=args.sweep_batch_size, conc=c)
                                for c in args.concurrencies}
    base = res["concurrency_sweep"][str(min(args.concurrencies))]["adapters_per_s"]
    for row in res["concurrency_sweep"].values():
        row["vs_lowest_concurrency"] = row["adapters_per_s"] / base
    if not args.skip_direct:
        res["direct"] = {str(k): measure(f"direct chunk={k}", mbs=None, conc=1, direct_chunk=k)
                         for k in sorted({1, max(args.batch_sizes)})}
    return res  # the generator goes with this frame


# ------------------------------------------------------------------------------------------ report

def _load(row: dict) -> str:
    x = row["other_load_cores_max"]
    return "–" if x is None else f"{x:.2f}"


def _rate(row: dict) -> str:
    lo, hi = row["adapters_per_s_range"]
    return f"{row['adapters_per_s']:.2f} [{lo:.2f}–{hi:.2f}]" if row["runs"] > 1 else f"{row['adapters_per_s']:.2f}"


def _n(row: dict) -> str:
    return f"{row['n_jobs']}×{row['runs']}"


def markdown(results: dict, args) -> str:
    m = results["machine"]
    dts = list(results["pool"])
    lines = [
        f"CPU: {m['cpu_model']} ({m['threads']} torch threads); torch {m['torch']}; loragen at "
        f"{(results['git'].get('commit') or 'unknown commit')[:7]}"
        f"{' (modified)' if results['git'].get('library_modified') else ''}. One in-process CPU worker; "
        f"Mistral-7B T2L dims (L, 32 layers, q_proj+v_proj, r=8, D=128, H=512, E=1024), random weights, "
        f"random distinct embeddings, float32 output ({results['sanity_bytes_per_adapter'] / 1e6:.2f} MB each). "
        f"n = jobs per run × runs; adapters/s is the median over runs [min–max]; latency pools all runs' jobs.",
        "",
        f"(a) Batch size sweep: {args.concurrency} concurrent clients, max_wait_ms={args.max_wait_ms:g}.",
        "",
        "| compute dtype | max_batch_size | n | adapters/s | vs max_batch_size=1 | mean batch formed | "
        "p50 / p95 latency (ms) | other procs' cores (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dn in dts:
        for b, row in results["pool"][dn]["batch_sweep"].items():
            lines.append(f"| {dn} | {b} | {_n(row)} | {_rate(row)} | {row['vs_unbatched']:.2f}× | "
                         f"{row['mean_batch']:.2f} | {row['latency_p50_ms']:.0f} / {row['latency_p95_ms']:.0f} | "
                         f"{_load(row)} |")
    inv = [dn for dn in dts if results["pool"][dn].get("batch_invariant")]
    if inv:
        lines += ["", f"{', '.join(inv)}: the generator is batch-invariant: a batch of k jobs runs as k forward "
                  "passes of one input, so \"mean batch formed\" counts jobs per generate() call, not inputs per "
                  "forward pass."]
    c0 = min(args.concurrencies)
    lines += [
        "",
        f"(b) Concurrency sweep: max_batch_size={args.sweep_batch_size}, max_wait_ms={args.max_wait_ms:g}.",
        "",
        f"| compute dtype | concurrency | n | adapters/s | vs concurrency {c0} | mean batch formed | p50 latency (ms) | "
        "p95 latency (ms) | mean latency (ms) / c÷throughput | other procs' cores (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dn in dts:
        for c, row in results["pool"][dn]["concurrency_sweep"].items():
            lines.append(f"| {dn} | {c} | {_n(row)} | {_rate(row)} | {row['vs_lowest_concurrency']:.2f}× | "
                         f"{row['mean_batch']:.2f} | {row['latency_p50_ms']:.0f} | {row['latency_p95_ms']:.0f} | "
                         f"{row['latency_mean_ms']:.0f} / {row['littles_law_latency_ms']:.0f} | {_load(row)} |")
    if any("direct" in results["pool"][dn] for dn in dts):
        lines += ["", "Reference without the pool: `generate(chunk)` + `safetensors_bytes()` on one thread, "
                  "one chunk after another (latency of a job = its chunk's time).", "",
                  "| compute dtype | inputs per generate call | n | adapters/s | ms per adapter | other procs' cores (max) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for dn in dts:
            for k, row in results["pool"][dn].get("direct", {}).items():
                lines.append(f"| {dn} | {k} | {_n(row)} | {_rate(row)} | {1e3 / row['adapters_per_s']:.1f} | "
                             f"{_load(row)} |")
    lines += ["", f"Peak RSS: {results['peak_rss_mib']:.0f} MiB. \"Other procs' cores\": CPU cores kept busy by other "
              "processes during a row's runs (from /proc/stat), the highest over its runs; above ~0.1 the row was "
              "taken under contention."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="compute dtypes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], metavar="B",
                   help="max_batch_size values of the batch sweep (default 1 4 16)")
    p.add_argument("--concurrency", type=int, default=32, help="client concurrency of the batch sweep (default 32)")
    p.add_argument("--concurrencies", type=int, nargs="+", default=[1, 4, 16, 32], metavar="C",
                   help="client concurrencies of the concurrency sweep (default 1 4 16 32)")
    p.add_argument("--sweep-batch-size", type=int, default=16, help="max_batch_size of the concurrency sweep (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="pool max_wait_ms in both sweeps (default 5)")
    p.add_argument("--jobs-float32", type=int, default=96, metavar="N", help="timed jobs per run, float32 (default 96)")
    p.add_argument("--jobs-bfloat16", type=int, default=128, metavar="N", help="timed jobs per run, bfloat16 (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row (default 3)")
    p.add_argument("--skip-direct", action="store_true", help="skip the no-pool reference rows")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 jobs per run, 1 run per row")
    add_common_args(p, "run")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs_float32 = args.jobs_bfloat16 = 32
        args.repeats = 1
    if (min(args.batch_sizes + args.concurrencies + [args.concurrency, args.sweep_batch_size, args.repeats,
                                                    args.jobs_float32, args.jobs_bfloat16]) < 1
            or args.max_wait_ms < 0):
        p.error("batch sizes, concurrencies, job counts and repeats must be positive, max_wait_ms non-negative")
    args.batch_sizes, args.concurrencies = sorted(set(args.batch_sizes)), sorted(set(args.concurrencies))
    args.jobs = {"float32": args.jobs_float32, "bfloat16": args.jobs_bfloat16}
    if args.threads:
        torch.set_num_threads(args.threads)
    waiter = IdleWaiter(args.wait_idle, args.idle_threshold)
    dtypes = list(dict.fromkeys(args.dtypes))

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"torch {machine['torch']}, threads {machine['threads']}, os cpus {machine['os_cpu_count']}, "
          f"affinity {machine['affinity_cpus']}; CPU: {machine['cpu_model']}", flush=True)
    c = mistral_t2l_config()
    torch.manual_seed(args.seed)
    ckpt = Checkpoint.from_module(build_hypernet(c))
    gc.collect()
    print(f"hypernetwork: {ckpt.n_params / 1e6:.1f} M parameters", flush=True)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict = {"benchmark": "bench_pool", "git": git_state(), "machine": machine, "config": c.to_dict(),
                     "n_params": ckpt.n_params, "settings": settings, "pool": {}}
    print(f"git: {results['git']}", flush=True)
    args.wait = waiter
    inputs = Inputs(c.task_emb_dim, args.seed + 3)
    for dn in dtypes:
        print(f"{dn}:", flush=True)
        results["pool"][dn] = bench_dtype(ckpt, dn, inputs, args)
    results["sanity_bytes_per_adapter"] = results["pool"][dtypes[0]]["sanity"]["bytes_per_adapter"]
    results["distinct_inputs"] = inputs.count
    results["peak_rss_mib"] = peak_rss_mib()
    results["idle_wait_s"] = round(waiter.waited, 1)
    results["wall_s"] = time.perf_counter() - t_start

    report(results, markdown(results, args), args.json,
           f"{inputs.count} distinct inputs; idle wait {results['idle_wait_s']} s; wall time {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
