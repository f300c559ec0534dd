"""One T2L SFT step of a demo bundle, by the number of length buckets: `python -m benchmarks.sft_step`.

Loads the bundle's base model, a fresh hypernetwork of its SFT architecture and the bundle's training
table (encoding it takes a minute on two cores), then times `--steps` SFT steps (hypernetwork forward, base
model forward in length buckets, backward, AdamW step) for each `--buckets` value, on the same batches
(`generator.train.sft.draw_batch` with the build's batch size and examples per sample). Prints the median
step with its IQR, the share of padded tokens in the passes, and each value's time over one padded pass's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_common_args, loadavg, machine_info, report, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sft_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("generator/demo"), help="a demo bundle (default generator/demo)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per buckets value, after 2 warm-up steps (default 25)")
    p.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 3, 4])
    add_common_args(p, "value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from generator.eval.quality import Bundle
    from generator.hypernet import build_hypernet
    from generator.train.basemodel import load_base
    from generator.train.conditioning import demo_hyper_config, training_table
    from generator.train.functional import FunctionalLora
    from generator.train.loop import step_rng
    from generator.train.prompting import length_buckets
    from generator.train.sft import batch_loss, draw_batch, zero_b_heads
    from generator.train.suite import Suite

    bundle = Bundle(args.bundle)
    build = json.loads((bundle.root / "build.json").read_text())["config"]
    suite = Suite.load(bundle.suite)
    config = demo_hyper_config(bundle.base, **build["hyper"])
    table = training_table(config, suite)
    model, fmt = load_base(bundle.base, "auto")
    lora = FunctionalLora(model, config.target_modules, config.scaling)
    batch = {"batch_size": build["sft_batch"]["batch_size"], "pack": build["sft_batch"]["pack"], "document_share": 0.3}
    load_before, rows = loadavg(), []
    for k in args.buckets:
        torch.manual_seed(args.seed)
        net = build_hypernet(config)
        zero_b_heads(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        times, padding = [], []
        for step in range(args.steps + 2):
            texts, seqs = draw_batch(suite, fmt, suite.seen, step_rng(args.seed, step), **batch)
            t0 = time.perf_counter()
            loss = batch_loss(net, table, lora, model, fmt, texts, seqs, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= 2:
                times.append(time.perf_counter() - t0)
                lengths = [len(ids) for ids, _ in seqs]
                padded = sum(len(g) * max(lengths[i] for i in g) for g in length_buckets(lengths, k))
                padding.append(1 - sum(lengths) / padded)
        rows.append({"buckets": k, "step_s": stats(times), "padding": statistics.median(padding)})
    one = next((r["step_s"]["median"] for r in rows if r["buckets"] == 1), None)
    lines = [f"SFT step of {args.bundle} ({batch['batch_size']} samples of {batch['pack']} example(s)), "
             f"median of {args.steps} steps", "",
             "| buckets | step, ms (IQR) | padded tokens | time / 1 bucket |", "| --- | --- | --- | --- |"]
    for r in rows:
        s = r["step_s"]
        ratio = f"{s['median'] / one:.2f}" if one else "-"
        lines.append(f"| {r['buckets']} | {s['median'] * 1e3:.0f} ({s['p25'] * 1e3:.0f}-{s['p75'] * 1e3:.0f}) | "
                     f"{r['padding']:.0%} | {ratio} |")
    machine = machine_info()
    results = {"bundle": str(args.bundle), "steps": args.steps, "batch": batch, "rows": rows, "machine": machine,
               "loadavg_before": load_before, "loadavg_after": loadavg()}
    best = min(rows, key=lambda r: r["step_s"]["median"])
    report(results, "\n".join(lines), args.json,
           f"fastest: {best['buckets']} bucket(s), {best['step_s']['median'] * 1e3:.0f} ms a step on {machine['cpu_model']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
