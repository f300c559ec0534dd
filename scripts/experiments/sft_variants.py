"""T2L SFT variants on a universe bundle, trained as `loragen train demo` trains its own (same seed, steps,
learning rate and warm-up) and scored on the bundle's evaluation (its T2L SFT rows only):

    python scripts/experiments/sft_variants.py generator/demo --out DIR [--batch-size 96 --pack 1]
        [--whiten 0.1] [--compositions 4000]

--whiten EPS      train on whitened task embeddings (zero mean, unit variance along every principal direction of
                  the training table, EPS × the mean eigenvalue added to each), then fold the transform into the
                  hypernetwork's first Linear: the checkpoint reads plain embeddings, as any other
--compositions N  train on a larger universe: the suite's own tasks plus the seen compositions that N draws
                  (instead of the build's 460) add; the held-out splits and their evaluation are unchanged

Writes DIR/ (the checkpoint) and DIR/variant.json (the options, training seconds, and per-split exact match).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from generator.checkpoint import Checkpoint, load_checkpoint
from generator.eval.quality import Bundle, Evaluator
from generator.train.conditioning import demo_hyper_config, training_table
from generator.train.demo import DemoConfig
from generator.train.sft import train_sft
from generator.train.suite import Suite
from generator.train.universe import build_universe_suite

ROWS = ("T2L SFT", "T2L SFT from documents", "T2L SFT, unrelated description (control)")


def larger_suite(suite: Suite, n_compositions: int) -> Suite:
    """`suite` plus the seen tasks of the same universe drawn with more compositions. The draws that fix the
    held-out splits come first, so they are the suite's own; every added task is a seen composition."""
    build = DemoConfig.universe_build(suite.seed)
    big = build_universe_suite(replace(build.universe, n_compositions=n_compositions,
                                       n_train_examples=build.n_train_examples, n_eval_examples=build.n_eval_examples))
    if big.tasks[: len(suite.tasks)] != suite.tasks or any(not set(suite.splits[s]) <= set(big.splits[s]) for s in suite.splits):
        raise SystemExit("this suite is not the universe build's: its tasks are not a prefix of the larger universe")
    extra = [t for t in big.seen if t not in set(suite.tasks)]
    if set(extra) & set(suite.held_out):
        raise SystemExit("a held-out task would be trained on")
    per_task = ("train_descriptions", "eval_descriptions", "train_documents", "eval_documents", "train_examples",
                "eval_examples", "meta", "instructions")
    return replace(suite, tasks=suite.tasks + extra,
                   **{k: {**getattr(suite, k), **{t: getattr(big, k)[t] for t in extra}} for k in per_task})


def whiten(matrix: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (E,), Z (E, E)) with (x - mean) @ Z of unit variance along each principal direction of `matrix`."""
    x = matrix.double()
    mean = x.mean(0)
    lam, vecs = torch.linalg.eigh(torch.cov((x - mean).T))
    return mean, (vecs * (lam.clamp(min=0) + eps * lam.mean()).rsqrt()) @ vecs.T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pack", type=int, default=2)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--whiten", type=float, default=0.0)
    p.add_argument("--compositions", type=int, default=0)
    p.add_argument("--examples", type=int, default=50, help="evaluation examples per task")
    a = p.parse_args()
    bundle = Bundle(Path(a.bundle))
    suite = Suite.load(bundle.suite)
    if a.compositions:
        suite = larger_suite(suite, a.compositions)
    config = demo_hyper_config(bundle.base)
    table = training_table(config, suite)
    if a.whiten:
        mean, z = whiten(table.matrix, a.whiten)
        table.matrix = ((table.matrix.double() - mean) @ z).float()
    build = DemoConfig.universe_build(suite.seed)
    t0 = time.perf_counter()
    train_sft(config, suite, bundle.base, a.out, replace(build.sft, steps=a.steps, ckpt_every=0, progress=False), table=table,
              batch_size=a.batch_size, pack=a.pack)
    seconds = time.perf_counter() - t0
    if a.whiten:  # W((x - mean) Z) + b = (W Z) x + (b - W Z mean): the same function of the plain embedding
        net = load_checkpoint(a.out).build()
        first = net.task_encoder.mlp[0]
        with torch.no_grad():
            wz = first.weight.double() @ z
            first.bias.copy_((first.bias.double() - wz @ mean).float())
            first.weight.copy_(wz.float())
        Checkpoint.from_module(net, source=a.out).save(a.out)
    ev = Evaluator(bundle, a.examples, sft=a.out)
    rows = ev.evaluate(ROWS)
    result = {"options": vars(a), "training_tasks": len(suite.seen), "train_seconds": round(seconds),
              **{row: {s: round(100 * rows[row][s]["accuracy"], 1) for s in ev.splits} for row in ROWS}}
    Path(a.out, "variant.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
