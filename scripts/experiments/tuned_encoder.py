# SPDX-License-Identifier: Apache-2.0
"""Experiment: T2L SFT with the task encoder fine-tuned jointly (a LoRA on MiniLM's attention and dense
layers, trained with the hypernetwork through the frozen base model), evaluated on every split of a bundle.

    python scripts/experiments/tuned_encoder.py BUNDLE --out DIR [--pooling mean] [--steps 2400] [--rank 16]

With --rank 0 the encoder stays frozen: plain SFT with the chosen pooling, for comparison.

It trains as `loragen train sft` does (batches of 32 samples, 2 examples each, 30% conditioned on a
document, the bundle's seen tasks' training texts only), except that every step runs the encoder with its
LoRA on the batch's texts instead of looking their embeddings up. It writes DIR/result.json: exact match per
split for evaluation descriptions and documents, over the bundle's evaluated tasks. An experiment, not a
native-checkpoint option: its result (no gain on held-out tasks) is in docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from generator.config import EncoderSpec
    from generator.encoder import TaskEncoder
    from generator.eval.quality import Bundle, Evaluator, _pool
    from generator.hypernet import build_hypernet
    from generator.train.basemodel import load_base, prompt
    from generator.train.conditioning import demo_hyper_config
    from generator.train.functional import FunctionalLora
    from generator.train.loop import LoopConfig, train_loop
    from generator.train.prompting import completion_loss
    from generator.train.sft import zero_b_heads
    from generator.train.suite import Suite

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pooling", choices=["cls", "mean"], default="mean")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--rank", type=int, default=16, help="rank of the encoder's LoRA; 0: the encoder stays frozen")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=50, help="evaluation examples per task")
    args = p.parse_args()

    suite = Suite.load(args.bundle / "suite.json")
    spec = EncoderSpec(pooling=args.pooling)
    config = demo_hyper_config(args.bundle / "base", encoder=spec)
    enc = TaskEncoder.load(spec)
    if args.rank:
        enc.model = get_peft_model(enc.model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                         target_modules=["query", "key", "value", "dense"]))

    def embed(texts: list[str]) -> torch.Tensor:  # differentiable: the encoder's LoRA trains through it
        texts = enc.preprocess(texts)
        ids = [enc._prefix + t[: enc._chunk_len] + enc._suffix
               for t in enc.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        batch = enc.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        h = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if args.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
        return enc.normalize(pooled)

    model, fmt = load_base(args.bundle / "base")
    torch.manual_seed(0)
    net = build_hypernet(config)
    zero_b_heads(net)
    lora = FunctionalLora(model, config.target_modules, config.scaling)

    def loss_at(step, rng):
        texts, seqs = [], []
        for _ in range(32):
            t = rng.choice(suite.seen)
            docs = suite.train_documents.get(t)
            texts.append(rng.choice(docs if rng.random() < 0.3 and docs else suite.train_descriptions[t]))
            seqs.append(fmt.sequence([rng.choice(suite.train_examples[t]) for _ in range(2)]))
        with lora.use(net(embed(texts))):
            return completion_loss(model, *fmt.batch(seqs))

    start = time.perf_counter()
    cfg = LoopConfig(steps=args.steps, lr=args.lr, warmup=50, ckpt_every=0, log_every=25)
    log = train_loop(nn.ModuleDict({"net": net, "encoder": enc.model}), loss_at, cfg, args.out, name="T2L SFT, tuned encoder")
    lora.remove()
    ev = Evaluator(Bundle(args.bundle), args.examples)
    result = {"pooling": args.pooling, "rank": args.rank, "steps": args.steps,
              "train_s": round(time.perf_counter() - start), "final_loss": log["loss"][-1]}
    for row, texts_of in (("descriptions", suite.eval_descriptions), ("documents", suite.eval_documents)):
        def fn(task, ex, texts_of=texts_of):
            pool = texts_of[task]
            return [prompt(x) for x, _ in ex], net(embed([pool[i % len(pool)] for i in range(len(ex))]))

        with torch.no_grad():
            per_task = {t: ev.score(fn, t)[0] for t in ev.evaluated_tasks}
        result[row] = {split: round(100 * _pool(per_task[t] for t in tasks).accuracy, 1)
                       for split, tasks in ev.splits.items()}
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
