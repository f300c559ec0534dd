"""Doc-to-LoRA generation per document: `python -m benchmarks.d2l`.

For each base size and document length, the time from a document's token ids to its PEFT adapter (the base
model reading every chunk without its last layer, the Perceiver and heads, combining, export) and the peak
host memory that adds on top of the loaded models (Linux VmHWM, reset before each measured generation).
Then adapters per second for a batch of documents: float32 runs each document's chunks alone (its bytes do not
depend on its batch), bfloat16 compute runs the whole batch's chunks in one pass.

Sizes, all with random weights (speed does not depend on their values):
    fixture     the reference fixture's tiny Qwen3 (4 layers, hidden 64) and its D2L checkpoint
    qwen3-0.6b  a Qwen3-0.6B-shaped base (28 layers, hidden 1024, MLP 3072, 16 heads, 8 key/value heads of 128;
                vocabulary cut to the fixture tokenizer's 384, which only the embedding and LM head see) and a
                D2L hypernetwork of the released recipe's shape (down_proj, r 8, 8 latent queries, 9 encoder
                blocks, latent 512)
Document lengths count the chat-template tokens; tokenising is left out of the time (it is timed once apart).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import PeakMemory, add_common_args, loadavg, machine_info, report, stats

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "d2l-reference"
RUN = FIXTURE / "train_outputs" / "runs" / "fixture-run_00000000"
TINY_BASE = FIXTURE / "tiny-random" / "qwen3-d2l"


def qwen3_06b_like(out: Path, seed: int):
    """A random Qwen3-0.6B-shaped base saved with the fixture's tokenizer, and a released-recipe D2L checkpoint."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from generator.checkpoint import Checkpoint
    from generator.config import modules_for_base
    from generator.d2l.config import D2LConfig, PerceiverSpec
    from generator.d2l.hypernet import D2LHypernet

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=384, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1e6, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_BASE).save_pretrained(out)
    config = D2LConfig(base_model=str(out), n_layers=28, hidden=1024, modules=modules_for_base(cfg, ["down_proj"]),
                       r=8, latent=512, perceiver=PerceiverSpec(latent_queries=8, blocks=9))
    net = D2LHypernet(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return Checkpoint.from_state_dict(config, net.state_dict())


def document_ids(gen, n_tokens: int, seed: int) -> list[int]:
    """A document of exactly n_tokens chat-template tokens: the template around random ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    special = set(gen.base.tokenizer.all_special_ids)
    vocab = [i for i in range(len(gen.base.tokenizer)) if i not in special]
    body = n_tokens - len(gen.affixes.prefix) - len(gen.affixes.suffix)
    picks = torch.randint(len(vocab), (body,), generator=g).tolist()
    return [*gen.affixes.prefix, *(vocab[i] for i in picks), *gen.affixes.suffix]


def one_document(gen, ids: list[int]):
    from generator.d2l import context

    chunks = context.chunk(ids, gen.chunk_tokens, gen.affixes)
    return gen.to_adapter(gen.net.combine(gen.chunk_loras(chunks)), len(chunks))


def time_documents(gen, ids: list[int], repeats: int) -> tuple[dict, float | None]:
    one_document(gen, ids)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_document(gen, ids)
        times.append(time.perf_counter() - t0)
    with PeakMemory() as peak, torch.inference_mode():
        before = _rss_mib()
        one_document(gen, ids)
    return stats(times), (None if peak.rss_mib is None else peak.rss_mib - before)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.d2l", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["fixture", "qwen3-0.6b"], choices=["fixture", "qwen3-0.6b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="document lengths (tokens)")
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[0, 1024], help="0: one chunk (the default)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row after one warm-up (default 3)")
    p.add_argument("--batch", type=int, default=8, help="documents of the throughput rows (default 8)")
    p.add_argument("--batch-tokens", type=int, default=256, help="their length in tokens (default 256)")
    add_common_args(p, "row")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from generator.checkpoint import load_checkpoint
    from generator.d2l import context
    from generator.d2l.generator import DocLoraGenerator
    from generator.pipeline import TaskInput

    results = {"machine": machine_info(), "loadavg_before": loadavg(), "rows": [], "throughput": []}
    lines = ["| size | tokens | chunk tokens | chunks | rank | median s | p25-p75 s | peak extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    thr = ["| size | compute | documents | adapters/s |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            if size == "fixture":
                ckpt, base_dir = load_checkpoint(RUN), TINY_BASE
            else:
                base_dir = Path(tmp) / "qwen3-0.6b"
                ckpt = qwen3_06b_like(base_dir, args.seed)
            gen = DocLoraGenerator(ckpt, base_dir=base_dir)
            text = " ".join(["The quarterly report lists revenue, costs and the outlook for each region."] * 40)
            t0 = time.perf_counter()
            n_tok = len(context.tokenize(gen.base.tokenizer, text))
            results.setdefault("tokenise_s_per_1k_tokens", {})[size] = (time.perf_counter() - t0) / n_tok * 1000
            for n in args.tokens:
                ids = document_ids(gen, n, args.seed)
                for c in args.chunk_tokens:
                    gen.chunk_tokens = c
                    chunks = context.chunk(ids, c, gen.affixes)
                    s, peak = time_documents(gen, ids, args.repeats)
                    rank = gen.config.combined_rank(len(chunks))
                    results["rows"].append({"size": size, "tokens": n, "chunk_tokens": c, "chunks": len(chunks),
                                            "rank": rank, "seconds": s, "peak_extra_mib": peak})
                    lines.append(f"| {size} | {n} | {c or 'none'} | {len(chunks)} | {rank} | {s['median']:.3f} | "
                                 f"{s['p25']:.3f}-{s['p75']:.3f} | {'-' if peak is None else f'{peak:.0f}'} |")
                    print(lines[-1], flush=True)
            gen.chunk_tokens = 0
            texts = [gen.base.tokenizer.decode(document_ids(gen, args.batch_tokens, args.seed + i)[
                len(gen.affixes.prefix):-len(gen.affixes.suffix)]) for i in range(args.batch)]
            docs = [TaskInput.document(t) for t in texts]
            for dtype in ("float32", "bfloat16"):
                g = gen if dtype == "float32" else DocLoraGenerator(ckpt, base=None, base_dir=base_dir,
                                                                    compute_dtype=torch.bfloat16)
                g.generate(docs[:1])
                t0 = time.perf_counter()
                g.generate(docs)
                rate = len(docs) / (time.perf_counter() - t0)
                results["throughput"].append({"size": size, "compute": dtype, "documents": len(docs), "per_s": rate})
                thr.append(f"| {size} | {dtype} | {len(docs)} x {args.batch_tokens} tokens | {rate:.2f} |")
                print(thr[-1], flush=True)
            del gen
    results["loadavg_after"] = loadavg()
    m = results["machine"]
    md = (f"Machine: {m['cpu_model']}, {m['threads']} torch threads, flags "
          f"{', '.join(k for k, v in m['cpu_flags'].items() if v)}; torch {m['torch']}\n\n" + "\n".join(lines) +
          "\n\n" + "\n".join(thr))
    report(results, md, args.json, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
