"""Exact float32 batching, bfloat16 compute and several API processes, each against the one-at-a-time float32
path, measured side by side in one run (Mistral-7B T2L dims, random weights, task embeddings as input).

Section `batching`:
  in process  for B in --batches (1 4 16 64), float32 compute: the hypernetwork's forward alone and generate +
              safetensors bytes (e2e), batched through the exact forward (`LoraGenerator.generate`, what float32
              runs) and one input at a time through the plain forward (`exact_batching` False: how float32
              generated before the exact forward); the machine's float32 matmul rate at the batched shapes
              (every Linear of the plain batched forward timed alone, as in generation.py) and the exact
              forward's efficiency against it (1.0 = running at that rate)
  over HTTP   `loragen serve` and its own Redis (full when a run starts, as a cache in production), for c in
              --batches closed-loop clients (curl when installed, else httpx) and max(--batching-n, 2c) cache
              misses per run: a server with exact batching off (one input at a time, as before), a server with it
              (max_batch_size the largest B; at c <= 16 clients that is the default settings' behaviour, a batch
              never holding more than c jobs), and at 16 clients (--processes-clients) a bfloat16-compute server
              answering in bfloat16 (the default output of bfloat16 compute). Requests name no dtype: the API's
              defaults.
Section `processes`: cache misses/s of `loragen serve --api-processes N` for N in --api-processes (1: the one
  process generates; N > 1: N API processes and one model worker through the Redis job stream), float32
  defaults (and bfloat16 compute on a GPU), --processes-clients clients, CPU per miss of all the server's
  processes; on a GPU, `generate()`'s rate in process at the same batch size (max_batch_size), which the HTTP
  rate is held against.
"""

from __future__ import annotations

import gc
import json
import shutil
import time

import torch

from benchmarks.assets import Assets
from benchmarks.common import PeakMemory, guarded, stats
from benchmarks.dims import describe, forward_flops
from benchmarks.generation import embeddings, ideal_time, time_calls
from benchmarks.serving import Redis, Server, http_phase
from generator.pipeline import LoraGenerator, TaskInput, cpu_has_native_bfloat16

# `loragen serve` with float32's exact batching turned off: each input its own plain forward pass, one after another
ONE_AT_A_TIME = ["-c", "import sys; from generator.pipeline import LoraGenerator; LoraGenerator.exact_batching = False; "
                       "from service.cli import main; sys.exit(main())"]


def _client() -> str:
    return "curl" if shutil.which("curl") else "httpx"


def _rate(times: list[float], b: int) -> dict:
    s = stats(times)
    return {**s, "adapters_per_s": b / s["median"], "ms_per_adapter": 1e3 * s["median"] / b,
            "adapters_per_s_iqr": [b / s["p75"], b / s["p25"]]}


def in_process(ckpt, args) -> dict:
    """float32 at every B: exact batched and one at a time, forward and e2e, and the matmul rate."""
    gen = LoraGenerator(ckpt, device=args.device)
    assert gen.batch_invariant and gen.exact_batching
    emb_all = embeddings(max(args.batches), gen.config.task_emb_dim, args.seed + 3)
    rows = {}
    for b in args.batches:
        reps = args.reps(b)
        ideal, load_i, _ = guarded(args, lambda b=b: ideal_time(gen, b, args))
        x = emb_all[:b].to(gen.device)
        inputs = [TaskInput.from_embedding(e) for e in emb_all[:b]]

        def forwards(x=x, b=b, reps=reps):
            with torch.inference_mode():
                new = time_calls(lambda: gen.net(x, exact=True), args.warmup, reps, gen.device)
                old = time_calls(lambda: [gen.net(x[i : i + 1]) for i in range(b)], args.warmup, reps, gen.device)
            return new, old

        (t_new, t_old), load_f, _ = guarded(args, forwards)

        def e2e(exact: bool, inputs=inputs, reps=reps):
            gen.exact_batching = exact
            try:
                with PeakMemory(gen.device) as peak:
                    times = time_calls(lambda: [a.safetensors_bytes() for a in gen.generate(inputs)], args.warmup,
                                       reps, gen.device)
            finally:
                gen.exact_batching = True
            return times, peak.rss_mib

        (e_new, rss_new), load_n, _ = guarded(args, lambda: e2e(True))
        (e_old, rss_old), load_o, _ = guarded(args, lambda: e2e(False))
        flops = forward_flops(gen.config, b)
        row = {"batch": b, "flops": flops, "ideal_s": ideal["ideal_s"],
               "matmul_gflops": flops / ideal["ideal_s"] / 1e9, "ideal_by_shape": ideal["by_shape"],
               "forward_exact": _rate(t_new, b), "forward_one_at_a_time": _rate(t_old, b),
               "e2e_exact": _rate(e_new, b), "e2e_one_at_a_time": _rate(e_old, b),
               "peak_rss_mib": max(x for x in (rss_new, rss_old, 0) if x is not None),
               "other_load_cores": [load_i, load_f, load_n, load_o]}
        for k in ("forward_exact", "forward_one_at_a_time", "e2e_exact", "e2e_one_at_a_time"):
            row[k]["efficiency"] = ideal["ideal_s"] / row[k]["median"]
            row[k]["gflops"] = flops / row[k]["median"] / 1e9
        row["e2e_speedup"] = row["e2e_exact"]["adapters_per_s"] / row["e2e_one_at_a_time"]["adapters_per_s"]
        rows[str(b)] = row
        print(f"  float32 B={b:<3d} matmul {row['matmul_gflops']:6.0f} GFLOP/s | exact forward "
              f"{row['forward_exact']['adapters_per_s']:7.2f}/s ({100 * row['forward_exact']['efficiency']:3.0f}%) | "
              f"e2e exact {row['e2e_exact']['adapters_per_s']:7.2f}/s, one at a time "
              f"{row['e2e_one_at_a_time']['adapters_per_s']:7.2f}/s ({row['e2e_speedup']:.2f}x) | other procs' cores "
              f"{max((v for v in row['other_load_cores'] if v is not None), default=None)}", flush=True)
        gc.collect()
    return rows  # the generator goes with this frame


def _miss_requests(assets: Assets, args, counter):
    """make_requests(n) → a function of the run index giving n POSTs of fresh, distinct embeddings, no dtype."""
    dim = assets.mistral.config.task_emb_dim

    def make(n: int):
        def requests(_i: int):
            emb = embeddings(n, dim, args.seed + 5000 + next(counter))
            return [("POST", "/v1/adapters", json.dumps({"embedding": [round(float(v), 6) for v in e]}).encode())
                    for e in emb]
        return requests

    return make


def _phase(server, redis, label, make, n, c, args) -> dict:
    row = http_phase(server, redis, label, make(n), n, c, "miss", args, make(c), client=_client())
    row["ms_per_adapter"] = 1e3 / row["per_s"]
    return row


def over_http(assets: Assets, args) -> dict:
    counter = iter(range(10**9))
    make = _miss_requests(assets, args, counter)
    redis = Redis(args.redis_url, assets.workdir, args.redis_maxmemory)
    out: dict = {"client": _client(), "redis_version": redis.version, "rows": {}}
    top = max(args.batches)
    try:
        for key, dn, python in (("one_at_a_time", "float32", ONE_AT_A_TIME), ("exact", "float32", None)):
            server = Server(assets, redis, dn, args, assets.workdir / f"serve-batching-{key}.log",
                            {"LORAGEN_MAX_BATCH_SIZE": str(top)}, python=python)
            try:
                for c in args.batches:
                    n = max(args.batching_n, 2 * c)
                    out["rows"].setdefault(str(c), {})[key] = _phase(
                        server, redis, f"float32 {key.replace('_', ' ')} c={c}", make, n, c, args)
            finally:
                server.stop()
                redis.delete_prefix(server.prefix)
        c = args.processes_clients
        server = Server(assets, redis, "bfloat16", args, assets.workdir / "serve-batching-bf16.log",
                        {"LORAGEN_MAX_BATCH_SIZE": str(args.http_batch)})
        try:
            out["bfloat16"] = _phase(server, redis, f"bfloat16 compute c={c}", make, max(args.batching_n, 2 * c), c,
                                     args)
            out["bfloat16"]["clients"] = c
            if not str(args.device).startswith("cuda"):  # None: unknown (no /proc/cpuinfo)
                out["bfloat16"]["cpu_native_bfloat16"] = cpu_has_native_bfloat16()
        finally:
            server.stop()
            redis.delete_prefix(server.prefix)
    finally:
        redis.close()
    return out


def run_batching(assets: Assets, args) -> dict:
    res = {"dims": describe(assets.mistral.config), "in_process": in_process(assets.mistral, args)}
    res["http"] = over_http(assets, args)
    return res


def generate_rate(ckpt, dn: str, b: int, args) -> dict:
    """`generate()` in process, B inputs per call, compute dtype `dn`, its default output dtype."""
    from benchmarks.common import DTYPES

    gen = LoraGenerator(ckpt, device=args.device, compute_dtype=DTYPES[dn])
    inputs = [TaskInput.from_embedding(e) for e in embeddings(b, gen.config.task_emb_dim, args.seed + 7)]
    times, load, _ = guarded(args, lambda: time_calls(lambda: gen.generate(inputs, dn), args.warmup, args.reps(b),
                                                      gen.device))
    return {**_rate(times, b), "batch": b, "other_load_cores": load}


def run_processes(assets: Assets, args) -> dict:
    counter = iter(range(10**9))
    make = _miss_requests(assets, args, counter)
    redis = Redis(args.redis_url, assets.workdir, args.redis_maxmemory)
    gpu = str(args.device).startswith("cuda")
    dtypes = list(args.dtypes) if gpu else ["float32"]  # bfloat16 is emulated on most CPUs: float32 is their default
    c, n = args.processes_clients, max(args.batching_n, 2 * args.processes_clients)
    out: dict = {"client": _client(), "clients": c, "n": n, "batch_size": args.http_batch, "dtypes": {}}
    try:
        for dn in dtypes:
            rows = {}
            for k in args.api_processes:
                argv = ["--api-processes", str(k)] if k > 1 else []
                t0 = time.perf_counter()
                server = Server(assets, redis, dn, args, assets.workdir / f"serve-processes-{dn}-{k}.log", argv=argv)
                started = time.perf_counter() - t0
                try:
                    rows[str(k)] = _phase(server, redis, f"{dn} {k} API process{'es' if k > 1 else ''} c={c}", make, n,
                                          c, args)
                    rows[str(k)]["start_s"] = started
                    rows[str(k)]["processes"] = len(server.pids())
                finally:
                    server.stop()
                    redis.delete_prefix(server.prefix)
            out["dtypes"][dn] = {"rows": rows}
            if gpu:
                out["dtypes"][dn]["generate"] = g = generate_rate(assets.mistral, dn, args.http_batch, args)
                print(f"  {dn} generate() in process B={args.http_batch}: {g['adapters_per_s']:.1f}/s", flush=True)
    finally:
        redis.close()
    return out
