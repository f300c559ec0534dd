"""Generation at the dims of the three released T2L checkpoints, against the machine's matmul rate.

For each checkpoint (random, seeded weights; task embeddings given, so no encoder runs), compute dtype and
batch size B:
  ideal     every Linear of the forward timed alone, `F.linear(x, W, b)` with the network's own W and b and
            a contiguous x of the rows it sees; summed over the forward's Linears: the time the forward
            would take at the machine's measured matmul rate (the rate = FLOPs / that time)
  forward   the hypernetwork alone, as `generate` runs it: `net(emb, exact=True)` in float32 (the exact
            batched forward: every input's bytes as if it ran alone), `net(emb)` in bfloat16
  generate  `LoraGenerator.generate(inputs, "float32")`: LoraAdapter objects, float32 output
  e2e       generate, then `safetensors_bytes()` of every adapter (what the service stores and sends)
adapters/s = B / median time; efficiency = ideal time / measured time (1.0 = running at the matmul rate).

Output dtype: at the Mistral dims, the same generate + serialise with float32 and with bfloat16 output.
"""

from __future__ import annotations

import gc
import time
from collections import Counter

import torch
import torch.nn.functional as F

from benchmarks.common import DTYPES, PeakMemory, guarded, stats, sync
from benchmarks.dims import adapter_bytes, describe, forward_flops, linear_shapes, t2l_config
from generator.checkpoint import Checkpoint
from generator.hypernet import build_hypernet
from generator.pipeline import LoraGenerator, TaskInput


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """T2L-style task embeddings: unit L2 norm times sqrt(E), so entries are of order one."""
    e = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return e / e.norm(dim=-1, keepdim=True) * dim**0.5


def _linears_by_shape(net, batch: int) -> dict[tuple[int, int, int], torch.nn.Linear]:
    """One of the network's own Linears for every (rows, in, out) its forward multiplies."""
    c = net.config
    rows = batch * len(c.modules) * c.n_layers
    mods = [(batch, net.task_encoder.mlp[0])]
    for block in (net.mixer, net.mlp1.mlp, net.mlp2.mlp, net.mlp3):
        mods += [(rows, block[1]), (rows, block[4])]
    mods += [(batch * c.n_layers, net.heads[m.name]) for m in c.modules]
    return {(r, lin.in_features, lin.out_features): lin for r, lin in mods}


def time_calls(fn, warmup: int, repeats: int, device) -> list[float]:
    out = []
    for i in range(warmup + repeats):
        gc.collect()
        sync(device)
        t0 = time.perf_counter()
        res = fn()
        sync(device)
        dt = time.perf_counter() - t0
        del res
        if i >= warmup:
            out.append(dt)
    return out


def ideal_time(gen: LoraGenerator, batch: int, args) -> dict:
    """Median time of every Linear of the forward alone, weighted by how often the forward runs it."""
    net, dev, dt = gen.net, gen.device, gen.compute_dtype
    shapes: Counter = linear_shapes(gen.config, batch)
    lins = _linears_by_shape(net, batch)
    g = torch.Generator().manual_seed(args.seed + batch)
    total, per = 0.0, {}
    for (rows, k, n), count in shapes.items():
        lin = lins[(rows, k, n)]
        x = torch.randn(rows, k, generator=g).to(dev, dt)
        with torch.inference_mode():
            ts = time_calls(lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias), args.warmup, args.reps(batch), dev)
        med = stats(ts)["median"]
        total += count * med
        per[f"({rows},{k})@({k},{n})"] = {"count": count, "median_s": med, "gflops": 2 * rows * k * n / med / 1e9}
        del x
    return {"ideal_s": total, "by_shape": per}


def measure(gen: LoraGenerator, emb: torch.Tensor, args) -> dict:
    b = emb.shape[0]
    dev = gen.device
    flops = forward_flops(gen.config, b)
    row: dict = {"batch": b, "flops": flops}

    ideal, load, attempts = guarded(args, lambda: ideal_time(gen, b, args))
    row["ideal"] = {**ideal, "other_load_cores": load, "attempts": attempts}
    row["matmul_gflops"] = flops / ideal["ideal_s"] / 1e9

    x = emb.to(dev, gen.compute_dtype)

    def forward():
        with torch.inference_mode():
            return time_calls(lambda: gen.net(x, exact=gen.batch_invariant), args.warmup, args.reps(b), dev)

    t_fwd, load, attempts = guarded(args, forward)
    row["forward"] = {**stats(t_fwd), "other_load_cores": load, "attempts": attempts}

    inputs = [TaskInput.from_embedding(e) for e in emb]  # built outside the timed region

    def e2e():
        t_gen, t_ser, nbytes = [], [], 0
        with PeakMemory(dev) as peak:
            for i in range(args.warmup + args.reps(b)):
                gc.collect()
                t0 = time.perf_counter()
                adapters = gen.generate(inputs, "float32")
                t1 = time.perf_counter()
                nbytes = sum(len(a.safetensors_bytes()) for a in adapters)  # dropped at once, as a stream would
                t2 = time.perf_counter()
                del adapters
                if i >= args.warmup:
                    t_gen.append(t1 - t0)
                    t_ser.append(t2 - t1)
        return t_gen, t_ser, nbytes, peak

    (t_gen, t_ser, nbytes, peak), load, attempts = guarded(args, e2e)
    t_tot = [a + s for a, s in zip(t_gen, t_ser, strict=True)]
    row["generate"] = stats(t_gen)
    row["serialise"] = stats(t_ser)
    row["e2e"] = {**stats(t_tot), "other_load_cores": load, "attempts": attempts}
    row["bytes_per_adapter"] = nbytes // b
    row["peak_rss_mib"] = peak.rss_mib
    row["peak_device_mib"] = peak.device_mib
    ideal_s = ideal["ideal_s"]
    for k in ("forward", "generate", "e2e"):
        med = row[k]["median"]
        row[k]["adapters_per_s"] = b / med
        row[k]["adapters_per_s_iqr"] = [b / row[k]["p75"], b / row[k]["p25"]]
        row[k]["gflops"] = flops / med / 1e9
        row[k]["efficiency"] = ideal_s / med
    return row


def output_dtypes(gen: LoraGenerator, emb: torch.Tensor, args) -> dict:
    """float32 vs bfloat16 output: file bytes per adapter and ms per adapter to generate and serialise."""
    inputs = [TaskInput.from_embedding(e) for e in emb]
    b = len(inputs)
    out = {}
    for odt in ("float32", "bfloat16"):
        def block(odt=odt):
            t_gen, t_ser, size = [], [], 0
            for i in range(args.warmup + args.reps(b)):
                gc.collect()
                t0 = time.perf_counter()
                adapters = gen.generate(inputs, odt)
                t1 = time.perf_counter()
                size = [len(a.safetensors_bytes()) for a in adapters][0]
                t2 = time.perf_counter()
                del adapters
                if i >= args.warmup:
                    t_gen.append(t1 - t0)
                    t_ser.append(t2 - t1)
            return t_gen, t_ser, size

        (t_gen, t_ser, size), load, _ = guarded(args, block)
        g, s = stats(t_gen), stats(t_ser)
        out[odt] = {"batch": b, "bytes_per_adapter": size, "generate_ms_per_adapter": 1e3 * g["median"] / b,
                    "serialise_ms_per_adapter": 1e3 * s["median"] / b,
                    "total_ms_per_adapter": 1e3 * (g["median"] + s["median"]) / b,
                    "generate": g, "serialise": s, "other_load_cores": load}
    return out


def run(args, device: str, checkpoints: list[str] | None = None) -> dict:
    res: dict = {"device": device, "checkpoints": {}}
    for name in checkpoints or args.checkpoints:
        c = t2l_config(name, n_layers=args.layers)
        torch.manual_seed(args.seed)
        ckpt = Checkpoint.from_module(build_hypernet(c))
        gc.collect()
        entry = {"dims": describe(c), "params": ckpt.n_params, "gflop_per_adapter": forward_flops(c, 1) / 1e9,
                 "adapter_mb_float32": adapter_bytes(c) / 1e6, "rows": {}}
        emb_all = embeddings(max(args.batches), c.task_emb_dim, args.seed + 2)
        for dn in args.dtypes:
            gen = LoraGenerator(ckpt, device=device, compute_dtype=DTYPES[dn])
            entry["rows"][dn] = {}
            for b in args.batches:
                row = measure(gen, emb_all[:b], args)
                entry["rows"][dn][str(b)] = row
                print(f"  {name:7s} {dn:8s} B={b:<3d} matmul {row['matmul_gflops']:6.0f} GFLOP/s | forward "
                      f"{row['forward']['adapters_per_s']:7.2f}/s ({100 * row['forward']['efficiency']:3.0f}%) | generate "
                      f"{row['generate']['adapters_per_s']:7.2f}/s ({100 * row['generate']['efficiency']:3.0f}%) | e2e "
                      f"{row['e2e']['adapters_per_s']:7.2f}/s ({100 * row['e2e']['efficiency']:3.0f}%) | peak RSS "
                      f"{row['peak_rss_mib'] or 0:.0f} MiB | other procs' cores {row['forward']['other_load_cores']}",
                      flush=True)
            if name == args.checkpoints[0]:
                b = max(x for x in args.batches if x <= 16)
                entry.setdefault("output_dtype", {})[dn] = output_dtypes(gen, emb_all[:b], args)
                o = entry["output_dtype"][dn]
                print(f"  {name:7s} {dn:8s} output dtype at B={b}: " + "; ".join(
                    f"{k} {v['bytes_per_adapter'] / 1e6:.2f} MB {v['total_ms_per_adapter']:.1f} ms/adapter"
                    for k, v in o.items()), flush=True)
            del gen
            gc.collect()
        res["checkpoints"][name] = entry
        del ckpt
        gc.collect()
    return res
