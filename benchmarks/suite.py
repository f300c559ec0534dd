"""Every measurement of the benchmark suite, in one run, on the machine at hand: a JSON and a markdown report.

    python -m benchmarks                 # or: loragen bench
    python -m benchmarks --quick         # smoke run: every section, tiny sizes (seconds, numbers meaningless)

Sections (each module's docstring says exactly what it times):
  generation  generation.py  adapters/s at the three T2L checkpoints' dims, batch 1/4/16/64, float32 and
                             bfloat16 compute; the machine's matmul rate at the same shapes; efficiency;
                             peak memory; float32 vs bfloat16 output
  encoder     encoder.py     texts/s of all-MiniLM-L6-v2 and of a gte-large-sized encoder; its share of
                             end-to-end time
  baseline    baseline.py    one process per adapter (`loragen generate`), as with the reference scripts
  http        serving.py     `loragen serve` + Redis on loopback: misses, hits, p50/p95/p99, the serving
                             overhead, redis-benchmark GET of the same size
  batching    batching.py    float32 exact batching against one input at a time, B=1/4/16/64, in process and
                             over HTTP; the float32 matmul rate at the batched shapes; bfloat16 compute
  processes   batching.py    cache misses/s of `loragen serve --api-processes N` against N
On a GPU (`--device auto` finds one) the generation and encoder sections and the server run there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.common import ROOT, IdleWaiter, git_state, loadavg, machine_info, versions
from benchmarks.dims import CHECKPOINTS

SECTIONS = ("generation", "encoder", "baseline", "http", "batching", "processes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: every section at tiny sizes, one repeat (checks the machinery, not the machine)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", metavar="DIR",
                   help="where bench-<device>.json and .md go (default benchmarks/results)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one, else cpu), cpu or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("generation")
    g.add_argument("--checkpoints", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS))
    g.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                   help="compute dtypes (generation, encoder share, http)")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], metavar="B")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement (default 1)")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    g.add_argument("--repeats-large", type=int, default=3, help="timed repeats from --large-batch on (default 3)")
    g.add_argument("--large-batch", type=int, default=64)
    g.add_argument("--layers", type=int, default=None,
                   help="override the decoder layers of every checkpoint (smoke runs; --quick uses 2)")
    e = p.add_argument_group("encoder and baseline")
    e.add_argument("--share-batches", type=int, nargs="+", default=[1, 16], metavar="B",
                   help="batch sizes of the encoder's share of end-to-end time (default 1 16)")
    e.add_argument("--encoder-layers", type=int, default=24, help="layers of the gte-large-sized encoder (default 24)")
    e.add_argument("--baseline-runs", type=int, default=3, help="processes of the per-request baseline (default 3)")
    h = p.add_argument_group("http")
    h.add_argument("--redis-url", default=None, help="Redis to cache in (default: start our own redis-server)")
    h.add_argument("--redis-maxmemory", default="2gb",
                   help="our own redis-server's maxmemory (allkeys-lru), filled before every cache-miss run "
                        "(default 2gb, as in docker-compose.yml)")
    h.add_argument("--output-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the adapters' output dtype in the http section, over HTTP and in-process (default float32; "
                        "the API's default is the compute dtype)")
    h.add_argument("--http-batch", type=int, default=16, help="server max_batch_size (default 16)")
    h.add_argument("--http-concurrency", type=int, default=32, help="concurrent clients (default 32)")
    h.add_argument("--http-n", type=int, default=64, help="cache-miss requests per run (default 64)")
    h.add_argument("--http-text-n", type=int, default=32, help="cache-miss requests from task texts per run (default 32)")
    h.add_argument("--http-runs", type=int, default=3, help="runs per row (default 3)")
    h.add_argument("--hit-n", type=int, default=200, help="cache-hit requests per run and redis-benchmark requests")
    h.add_argument("--hot-set", type=int, default=16,
                   help="distinct cached adapters the hits cycle over (default 16: 218 MB in float32 at the Mistral "
                        "dims, within the server's default 512 MiB near cache)")
    b = p.add_argument_group("batching and processes")
    b.add_argument("--batching-n", type=int, default=48,
                   help="cache misses per HTTP run, at least twice the clients (default 48)")
    b.add_argument("--processes-clients", type=int, default=16,
                   help="clients of the processes rows and of the bfloat16 batching row (default 16)")
    b.add_argument("--api-processes", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                   help="API processes of the processes rows (default 1 2 4; 1: the process generates itself)")
    c = p.add_argument_group("contention (a shared machine)")
    c.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement wait until other processes use under --idle-threshold cores, "
                        "spending at most SECONDS in all (default 0: never wait)")
    c.add_argument("--idle-threshold", type=float, default=0.25, metavar="CORES")
    c.add_argument("--retries", type=int, default=1, help="with --wait-idle: re-run a contended measurement")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's malloc defaults in this process (the service applies service/malloc.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.checkpoints, args.layers = ["mistral"], args.layers or 2
        args.batches, args.share_batches = [1, 2], [2]
        args.warmup, args.repeats, args.repeats_large = 0, 1, 1
        args.encoder_layers, args.baseline_runs = 2, 1
        args.http_batch, args.http_concurrency, args.http_n, args.http_text_n = 2, 2, 4, 2
        args.http_runs, args.hit_n, args.hot_set, args.redis_maxmemory = 1, 4, 2, "32mb"
        args.batching_n, args.processes_clients, args.api_processes = 4, 2, [1, 2]
    if min(args.batches + args.share_batches + args.api_processes + [
            args.repeats, args.repeats_large, args.http_n, args.http_runs, args.hit_n, args.hot_set, args.http_batch,
            args.http_concurrency, args.batching_n, args.processes_clients]) < 1:
        p.error("batch sizes, repeats, request counts, concurrency and process counts must be positive")
    args.batches, args.share_batches = sorted(set(args.batches)), sorted(set(args.share_batches))
    args.api_processes = sorted(set(args.api_processes))
    args.dtypes = list(dict.fromkeys(args.dtypes))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    args.reps = lambda b: args.repeats_large if b >= args.large_batch else args.repeats
    args.wait = IdleWaiter(args.wait_idle, args.idle_threshold)
    malloc_tuned = False
    if not args.no_malloc_tuning:
        from service.malloc import keep_freed_memory

        malloc_tuned = keep_freed_memory()

    t0 = time.perf_counter()
    results: dict = {
        "benchmark": "loragen suite", "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "versions": versions(), "git": git_state(), "device": args.device,
        "malloc_tuned": malloc_tuned, "loadavg_before": loadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("reps", "wait")},
    }
    m = results["machine"]
    print(f"loragen benchmark suite on {m['cpu_model']} ({m['os_cpu_count']} CPUs, {m['threads']} torch threads"
          f"{', GPU ' + ', '.join(m['gpus']) if m['gpus'] else ''}); device {args.device}; load average "
          f"{results['loadavg_before']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{'quick-' if args.quick else ''}{'gpu' if args.device.startswith('cuda') else 'cpu'}"

    def write(complete: bool) -> str:
        """The report so far: written after every step, so an interrupted run keeps what it measured."""
        results["complete"] = complete
        results["loadavg_after"] = loadavg()
        results["idle_wait_s"] = round(args.wait.waited, 1)
        results["wall_s"] = time.perf_counter() - t0
        results["targets"] = report.targets(results)
        md = report.markdown(results)
        results["markdown"] = md
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(md + "\n")
        return md

    # the first checkpoint's generation and the HTTP section decide the targets: they go first, and
    # the other checkpoints' generation (the longest part) last
    steps = []
    if "generation" in args.sections:
        steps.append(("generation", args.checkpoints[:1]))
    steps += [(s, None) for s in ("batching", "processes", "http", "encoder", "baseline") if s in args.sections]
    if "generation" in args.sections and len(args.checkpoints) > 1:
        steps.append(("generation", args.checkpoints[1:]))
    workdir = Path(tempfile.mkdtemp(prefix="loragen-bench-"))
    try:
        assets = None
        if {"encoder", "baseline", "http", "batching", "processes"} & set(args.sections):
            from benchmarks import assets as assets_mod

            # the batching and processes sections send embeddings: their encoder is never run, one layer will do
            layers = args.encoder_layers if {"encoder", "baseline", "http"} & set(args.sections) else 1
            print("building assets (random gte-large-sized encoder, Mistral-dims checkpoint)...", flush=True)
            assets = assets_mod.build(workdir, seed=args.seed, encoder_layers=layers, n_layers=args.layers)
        for section, checkpoints in steps:
            print(f"{section}:", flush=True)
            if section == "generation":
                from benchmarks import generation

                part = generation.run(args, args.device, checkpoints)
                if "generation" in results:
                    results["generation"]["checkpoints"].update(part["checkpoints"])
                else:
                    results["generation"] = part
            elif section == "encoder":
                from benchmarks import encoder

                results["encoder"] = encoder.run(assets, args, args.device)
            elif section == "baseline":
                from benchmarks import baseline

                results["baseline"] = baseline.run(assets, args)
            elif section == "batching":
                from benchmarks import batching

                results["batching"] = batching.run_batching(assets, args)
            elif section == "processes":
                from benchmarks import batching

                results["processes"] = batching.run_processes(assets, args)
            else:
                from benchmarks import serving

                results["http"] = serving.run(assets, args)
            write(complete=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    md = write(complete=True)
    print()
    print(md)
    print(f"\nwall time {results['wall_s']:.0f} s; load average before {results['loadavg_before']}, after "
          f"{results['loadavg_after']}; wrote {args.out / stem}.json and .md")
    return 0
