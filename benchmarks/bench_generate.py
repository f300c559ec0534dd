#!/usr/bin/env python
"""Throughput of LoRA generation at the dims of the released Mistral-7B T2L checkpoint, on this machine.

What it times (random, seeded weights; the task encoder is never loaded because embeddings are fed):
  matmul   F.linear(x, W, b) and torch.matmul(x, W^T) at the two head shapes (B*N, H) @ (H, S_m), per
           compute dtype: the machine's achievable rate for the op that dominates the forward pass
  forward  `net(emb, exact=...)` under torch.inference_mode (hypernetwork only, as generate runs it: the exact
           forward in float32) → adapters/s
  e2e      `LoraGenerator.generate(inputs, "float32")` to LoraAdapter objects, then `safetensors_bytes()`
           of each adapter → adapters/s (generate and serialise are also reported separately)

For each (compute dtype, batch size): warm-up runs, then timed repeats; median, IQR (p25-p75) and min
of the wall time are reported, adapters/s = B / time. "vs B=1" is batched adapters/s over batch-1
adapters/s (medians). "% of matmul" is the forward's achieved GFLOP/s (analytic FLOPs of the forward,
see `forward_flops`) over the F.linear rate at the same batch size and dtype.

    .venv/bin/python benchmarks/bench_generate.py --json benchmarks/results/generate-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks.common import (  # noqa: F401  (re-exported for bench_pool and older callers)
    CPU_FLAGS,
    DTYPES,
    IdleWaiter,
    OtherLoad,
    add_common_args,
    guarded,
    machine_info,
    peak_rss_mib,
    report,
    summarise,
    time_it,
)
from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec, HyperConfig, ModuleSpec
from generator.hypernet import build_hypernet
from generator.pipeline import LoraGenerator, TaskInput


def mistral_t2l_config() -> HyperConfig:
    """The released Mistral-7B-Instruct-v0.2 T2L checkpoint's architecture (variant L)."""
    return HyperConfig(
        variant="L",
        task_emb_dim=1024,
        latent=128,
        head_in=512,
        n_layers=32,
        modules=(ModuleSpec("q_proj", 4096, 4096), ModuleSpec("v_proj", 4096, 1024)),
        r=8,
        lora_alpha=16.0,
        use_rslora=True,
        encoder=EncoderSpec(name="Alibaba-NLP/gte-large-en-v1.5", dim=1024, requires_remote_code=True),
        base_model="mistralai/Mistral-7B-Instruct-v0.2",
    )


# ------------------------------------------------------------------------------------------- FLOPs

def forward_flops(c: HyperConfig, batch: int) -> dict[str, int]:
    """Multiply-add FLOPs (2*M*K*N per Linear) of a variant-L forward for `batch` tasks. Elementwise
    work (LayerNorm, SiLU, bias, offset adds, the depth/module embedding LayerNorms) is not counted."""
    if c.variant != "L":
        raise ValueError("forward_flops models variant L only")
    d, h, e = c.latent, c.head_in, c.task_emb_dim
    rows = batch * len(c.modules) * c.n_layers  # trunk rows: every (task, module, layer)
    mlp = lambda k, hid, n: 2 * rows * (k * hid + hid * n)  # noqa: E731  two Linears of an _mlp
    trunk = (
        2 * batch * e * (d // 2)  # task encoder
        + mlp(d, 4 * d, d)  # mixer
        + mlp(d, 4 * d, d)  # mlp1
        + mlp(d, 4 * d, d)  # mlp2
        + mlp(d, 4 * d, h)  # mlp3
    )
    heads = {m.name: 2 * batch * c.n_layers * h * c.head_out(m) for m in c.modules}
    return {"trunk": trunk, **{f"head_{k}": v for k, v in heads.items()},
            "heads": sum(heads.values()), "total": trunk + sum(heads.values())}


def counted_flops(net: torch.nn.Module, emb: torch.Tensor) -> int | None:
    """Cross-check of forward_flops with torch's FlopCounterMode (None where unavailable)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    # no_grad, not inference_mode: FlopCounterMode's module tracker fails under inference_mode here
    # (it hooks a parameter passed as a module input and expects an autograd node)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(emb)
    except Exception as e:  # a cross-check only: never fail the benchmark for it
        print(f"  (FlopCounterMode cross-check failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------ timing

def reps_for(batch: int, args) -> int:
    return args.repeats_large if batch >= args.large_batch else args.repeats


# ------------------------------------------------------------------------------------------ phases

def bench_matmul(c: HyperConfig, batches: list[int], dtypes: list[str], args) -> dict:
    """F.linear and torch.matmul at each head's shape: x (B*N, H), W (S_m, H) as nn.Linear stores it."""
    g = torch.Generator().manual_seed(args.seed + 1)
    res: dict = {}
    for dn in dtypes:
        dt = DTYPES[dn]
        weights = {m.name: (torch.randn(c.head_out(m), c.head_in, generator=g).to(dt),
                            torch.randn(c.head_out(m), generator=g).to(dt)) for m in c.modules}
        w_t = {k: w.t().contiguous() for k, (w, _) in weights.items()}  # (H, S_m) for torch.matmul
        for b in batches:
            rows = b * c.n_layers
            x = torch.randn(rows, c.head_in, generator=g).to(dt)
            entry = {"rows": rows}
            tot = {"linear": 0.0, "matmul": 0.0}
            flops_all = 0
            for m in c.modules:
                w, bias = weights[m.name]
                flops = 2 * rows * c.head_in * c.head_out(m)
                flops_all += flops
                reps = reps_for(b, args)
                def block(x=x, w=w, bias=bias, wt=w_t[m.name], reps=reps):
                    with torch.inference_mode():
                        return (time_it(lambda: F.linear(x, w, bias), args.warmup, reps),
                                time_it(lambda: torch.matmul(x, wt), args.warmup, reps))

                (t_lin, t_mm), load, attempts = guarded(args, block)
                ml, mm = statistics.median(t_lin), statistics.median(t_mm)
                tot["linear"] += ml
                tot["matmul"] += mm
                entry[m.name] = {
                    "shape": f"({rows}, {c.head_in}) @ ({c.head_in}, {c.head_out(m)})",
                    "flops": flops,
                    "linear_median_s": ml, "linear_min_s": min(t_lin),
                    "linear_gflops": flops / ml / 1e9, "linear_gflops_best": flops / min(t_lin) / 1e9,
                    "matmul_median_s": mm, "matmul_min_s": min(t_mm),
                    "matmul_gflops": flops / mm / 1e9, "matmul_gflops_best": flops / min(t_mm) / 1e9,
                    "linear_times_s": t_lin, "matmul_times_s": t_mm,
                    "other_load_cores": load, "attempts": attempts,
                }
            entry["heads_linear_s"] = tot["linear"]
            entry["heads_linear_gflops"] = flops_all / tot["linear"] / 1e9
            entry["heads_matmul_gflops"] = flops_all / tot["matmul"] / 1e9
            res.setdefault(dn, {})[str(b)] = entry
            print(f"  matmul {dn:8s} B={b:<3d} " + "  ".join(
                f"{m.name}: linear {entry[m.name]['linear_gflops']:7.1f} / matmul {entry[m.name]['matmul_gflops']:7.1f} GFLOP/s"
                for m in c.modules) + "  | other procs' cores " + str([entry[m.name]["other_load_cores"] for m in c.modules]),
                  flush=True)
        del weights, w_t
    return res


def sanity_check(gen: LoraGenerator, emb: torch.Tensor, c: HyperConfig) -> dict:
    """One untimed generate: adapter count, tensor names/shapes/dtypes, and that the adapter's tensors are
    the forward's A/B (cast to float32)."""
    inputs = [TaskInput.from_embedding(e) for e in emb]
    adapters = gen.generate(inputs, "float32")
    with torch.inference_mode():  # the forward generate runs: exact in float32 (bit-identical to each input alone)
        ab = gen.net(emb.to(gen.compute_dtype), exact=gen.batch_invariant)
    want = 2 * len(c.modules) * c.n_layers
    a0 = adapters[0]
    ok = len(adapters) == len(inputs) and len(a0.tensors) == want
    for m in c.modules:
        key_a = f"base_model.model.model.layers.0.self_attn.{m.name}.lora_A.weight"
        key_b = f"base_model.model.model.layers.0.self_attn.{m.name}.lora_B.weight"
        ok &= tuple(a0.tensors[key_a].shape) == (c.r, m.d_in) and tuple(a0.tensors[key_b].shape) == (m.d_out, c.r)
        ok &= a0.tensors[key_a].dtype == torch.float32
        ok &= torch.equal(a0.tensors[key_a], ab[m.name][0][0, 0].float())
        ok &= torch.equal(a0.tensors[key_b], ab[m.name][1][0, 0].float())
    raw = a0.safetensors_bytes()
    return {"ok": bool(ok), "tensors_per_adapter": len(a0.tensors), "safetensors_bytes_per_adapter": len(raw),
            "safetensors_size_matches": len(raw) == a0.safetensors_size()}


def bench_generation(ckpt: Checkpoint, c: HyperConfig, batches: list[int], dtypes: list[str], args) -> dict:
    g = torch.Generator().manual_seed(args.seed + 2)
    n_max = max(batches)
    # T2L-style task embeddings: unit L2 norm times sqrt(E), so entries are of order one
    emb_all = torch.randn(n_max, c.task_emb_dim, generator=g)
    emb_all = emb_all / emb_all.norm(dim=-1, keepdim=True) * c.task_emb_dim**0.5
    inputs_all = [TaskInput.from_embedding(e) for e in emb_all]  # built once, outside timing
    res: dict = {}
    for dn in dtypes:
        gen = LoraGenerator(ckpt, compute_dtype=DTYPES[dn])
        net = gen.net
        res[dn] = {"sanity": sanity_check(gen, emb_all[:2], c)}
        print(f"  {dn}: sanity {res[dn]['sanity']}", flush=True)
        for b in batches:
            emb = emb_all[:b].to(DTYPES[dn])
            inputs = inputs_all[:b]
            reps = reps_for(b, args)

            def forward(net=net, emb=emb, exact=gen.batch_invariant):
                with torch.inference_mode():
                    return net(emb, exact=exact)  # the forward generate runs: the exact one in float32

            t_fwd, load, attempts = guarded(args, lambda forward=forward, reps=reps: time_it(forward, args.warmup, reps))
            fwd = summarise(t_fwd, b)
            fwd["other_load_cores"], fwd["attempts"] = load, attempts
            fwd["peak_rss_mib_after"] = peak_rss_mib()
            entry = {"forward": fwd}

            if not args.skip_e2e:
                def e2e_block(gen=gen, inputs=inputs, reps=reps):
                    t_gen, t_ser, t_tot, nbytes = [], [], [], 0
                    for i in range(args.warmup + reps):
                        gc.collect()
                        t0 = time.perf_counter()
                        adapters = gen.generate(inputs, "float32")
                        t1 = time.perf_counter()
                        nbytes = 0
                        for a in adapters:
                            nbytes += len(a.safetensors_bytes())  # bytes dropped at once, as a stream would
                        t2 = time.perf_counter()
                        del adapters
                        if i >= args.warmup:
                            t_gen.append(t1 - t0)
                            t_ser.append(t2 - t1)
                            t_tot.append(t2 - t0)
                    return t_gen, t_ser, t_tot, nbytes

                (t_gen, t_ser, t_tot, nbytes), load, attempts = guarded(args, e2e_block)
                entry["e2e"] = summarise(t_tot, b)
                entry["e2e"]["other_load_cores"], entry["e2e"]["attempts"] = load, attempts
                entry["e2e"]["generate"] = summarise(t_gen, b)
                entry["e2e"]["serialise"] = summarise(t_ser, b)
                entry["e2e"]["safetensors_bytes_per_batch"] = nbytes
                entry["e2e"]["serialise_mb_per_s"] = nbytes / statistics.median(t_ser) / 1e6
                entry["e2e"]["peak_rss_mib_after"] = peak_rss_mib()
            res[dn][str(b)] = entry
            line = (f"  {dn:8s} B={b:<3d} forward {fwd['adapters_per_s']:8.2f} adapters/s "
                    f"(median {fwd['median_s'] * 1e3:8.1f} ms, IQR {fwd['p25_s'] * 1e3:.1f}-{fwd['p75_s'] * 1e3:.1f}, n={reps})")
            if "e2e" in entry:
                e = entry["e2e"]
                line += (f" | e2e {e['adapters_per_s']:7.2f} adapters/s (generate {e['generate']['median_s'] * 1e3:.1f} ms"
                         f" + serialise {e['serialise']['median_s'] * 1e3:.1f} ms)")
            loads = [fwd["other_load_cores"], entry.get("e2e", {}).get("other_load_cores")]
            print(line + f" | peak RSS {peak_rss_mib():.0f} MiB | other procs' cores {loads}", flush=True)
            del emb
        del gen, net
        gc.collect()
    return res


# ------------------------------------------------------------------------------------------ report

def derive(results: dict, c: HyperConfig, batches: list[int], dtypes: list[str]) -> None:
    """Add speedups vs batch 1, achieved GFLOP/s and the fraction of the matmul rate, in place."""
    b0 = min(batches)
    for dn in dtypes:
        gen = results["generation"][dn]
        for b in batches:
            e = gen[str(b)]
            flops = results["flops_per_batch"][str(b)]["total"]
            f = e["forward"]
            f[f"speedup_vs_b{b0}"] = f["adapters_per_s"] / gen[str(b0)]["forward"]["adapters_per_s"]
            f["gflops"] = flops / f["median_s"] / 1e9
            f["gflops_best"] = flops / f["min_s"] / 1e9
            mm = results["matmul"].get(dn, {}).get(str(b))
            if mm:
                f["fraction_of_linear_rate"] = f["gflops"] / mm["heads_linear_gflops"]
                f["heads_linear_share_of_forward_time"] = mm["heads_linear_s"] / f["median_s"]
            if "e2e" in e:
                e["e2e"][f"speedup_vs_b{b0}"] = e["e2e"]["adapters_per_s"] / gen[str(b0)]["e2e"]["adapters_per_s"]


def _fmt_load(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(results: dict, batches: list[int], dtypes: list[str]) -> str:
    b0 = min(batches)
    m = results["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of the listed"
    lines = [
        f"CPU: {m['cpu_model']} ({m['threads']} torch threads; flags: {flags}); torch {m['torch']}. "
        f"Mistral-7B T2L dims (L, 32 layers, q_proj+v_proj, r=8, D=128, H=512, E=1024), random weights.",
        "",
        f"| compute dtype | batch | forward adapters/s (median [IQR]) | forward vs B={b0} | forward GFLOP/s | "
        f"% of F.linear rate | e2e adapters/s (median [IQR]) | e2e vs B={b0} | e2e ms/adapter (generate + serialise) | "
        f"other procs' cores (fwd / e2e) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dn in dtypes:
        for b in batches:
            e = results["generation"][dn][str(b)]
            f = e["forward"]
            frac = f.get("fraction_of_linear_rate")
            row = [dn, str(b),
                   f"{f['adapters_per_s']:.2f} [{f['adapters_per_s_iqr'][0]:.2f}–{f['adapters_per_s_iqr'][1]:.2f}]",
                   f"{f[f'speedup_vs_b{b0}']:.2f}×", f"{f['gflops']:.0f}",
                   f"{100 * frac:.0f}%" if frac is not None else "–"]
            if "e2e" in e:
                x = e["e2e"]
                row += [f"{x['adapters_per_s']:.2f} [{x['adapters_per_s_iqr'][0]:.2f}–{x['adapters_per_s_iqr'][1]:.2f}]",
                        f"{x[f'speedup_vs_b{b0}']:.2f}×",
                        f"{x['ms_per_adapter']:.1f} ({x['generate']['ms_per_adapter']:.1f} + "
                        f"{x['serialise']['ms_per_adapter']:.1f})"]
            else:
                row += ["–", "–", "–"]
            row.append(" / ".join(_fmt_load(x) for x in (f.get("other_load_cores"), e.get("e2e", {}).get("other_load_cores"))))
            lines.append("| " + " | ".join(row) + " |")
    if results["matmul"]:
        lines += ["", "Head matmuls alone, median GFLOP/s (F.linear with bias / torch.matmul):", "",
                  "| dtype | batch | rows | q_proj (rows,512)@(512,65536) | v_proj (rows,512)@(512,40960) | "
                  "both heads, F.linear | other procs' cores (q / v) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for dn in dtypes:
            for b in batches:
                mm = results["matmul"][dn][str(b)]
                q, v = mm["q_proj"], mm["v_proj"]
                lines.append(f"| {dn} | {b} | {mm['rows']} | {q['linear_gflops']:.0f} / {q['matmul_gflops']:.0f} | "
                             f"{v['linear_gflops']:.0f} / {v['matmul_gflops']:.0f} | {mm['heads_linear_gflops']:.0f} | "
                             f"{_fmt_load(q['other_load_cores'])} / {_fmt_load(v['other_load_cores'])} |")
    lines += ["", f"Peak RSS: {results['peak_rss_mib']:.0f} MiB. \"Other procs' cores\": CPU cores kept busy by other "
              f"processes during that measurement (from /proc/stat); above ~0.1 the numbers were taken under contention."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64], metavar="B")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="compute dtypes")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats below --large-batch (default 9)")
    p.add_argument("--repeats-large", type=int, default=5, help="timed repeats at batch >= --large-batch (default 5)")
    p.add_argument("--large-batch", type=int, default=64, help="batch size from which --repeats-large applies")
    p.add_argument("--skip-matmul", action="store_true", help="do not time the bare head matmuls")
    p.add_argument("--skip-e2e", action="store_true", help="time the hypernetwork forward only")
    add_common_args(p, "measurement")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.repeats_large < 1 or args.warmup < 0:
        p.error("batch sizes and repeats must be positive, warm-up non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    waiter = IdleWaiter(args.wait_idle, args.idle_threshold)
    batches = sorted(set(args.batch_sizes))
    dtypes = list(dict.fromkeys(args.dtypes))

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"torch {machine['torch']}, threads {machine['threads']} (interop {machine['interop_threads']}), "
          f"os cpus {machine['os_cpu_count']}, affinity {machine['affinity_cpus']}")
    print(f"CPU: {machine['cpu_model']}; capability {machine['torch_cpu_capability']}; flags: "
          + ", ".join(f"{f}={'yes' if on else 'no'}" for f, on in machine["cpu_flags"].items()), flush=True)

    c = mistral_t2l_config()
    torch.manual_seed(args.seed)
    net = build_hypernet(c)
    ckpt = Checkpoint.from_module(net)
    flops = {str(b): forward_flops(c, b) for b in batches}
    counted = counted_flops(net, torch.randn(1, c.task_emb_dim))
    del net
    gc.collect()
    f0, b0 = flops[str(batches[0])], batches[0]
    print(f"hypernetwork: {ckpt.n_params / 1e6:.1f} M parameters; forward {f0['total'] / b0 / 1e9:.3f} "
          f"GFLOP per adapter (heads {f0['heads'] / b0 / 1e9:.3f}); FlopCounterMode at B=1: "
          f"{counted / 1e9 if counted else float('nan'):.3f} GFLOP", flush=True)

    results: dict = {
        "benchmark": "bench_generate", "machine": machine, "config": c.to_dict(), "n_params": ckpt.n_params,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "flops_per_batch": flops, "flop_counter_b1": counted, "matmul": {},
    }
    args.wait = waiter
    if not args.skip_matmul:
        print("matmul at the head shapes:", flush=True)
        results["matmul"] = bench_matmul(c, batches, dtypes, args)
    results["peak_rss_mib_after_matmul"] = peak_rss_mib()
    print("generation:", flush=True)
    results["generation"] = bench_generation(ckpt, c, batches, dtypes, args)
    derive(results, c, batches, dtypes)
    results["peak_rss_mib"] = peak_rss_mib()
    results["idle_wait_s"] = round(waiter.waited, 1)
    results["wall_s"] = time.perf_counter() - t_start

    report(results, markdown(results, batches, dtypes), args.json, f"wall time {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
