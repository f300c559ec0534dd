"""On a GPU: a batch's trip to host memory, adapter by adapter against laid out at once; device-to-host rates.

    python -m benchmarks.gpu_layout [--out DIR]     # needs CUDA; writes DIR/gpu-layout.json when given

At the Mistral dims in bfloat16 compute, B = 16 and 64, float32 output, per adapter (median of 7 after 2
warm-ups, synchronised): `LoraAdapter.from_generated` for each row of the batch plus `all_finite` on the host
(how generation left the GPU before `batch_from_generated`), against `LoraAdapter.batch_from_generated` (the
batch laid out on the device, finiteness summed there, one copy per adapter). Then the device-to-host rate
for one float32 adapter's 16.8 MB into a fresh pageable tensor and into a pinned one. This process does not
apply service/malloc.py, so fresh host buffers are faulted in as they would be without it.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.dims import t2l_config
from benchmarks.generation import embeddings
from generator.adapter import LoraAdapter
from generator.checkpoint import Checkpoint
from generator.hypernet import build_hypernet

DEV = "cuda:0"


def timeit(fn, reps: int = 7, warm: int = 2) -> float:
    ts = []
    for i in range(warm + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if i >= warm:
            ts.append(time.perf_counter() - t0)
        del out
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_layout", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    res: dict = {}
    c = t2l_config("mistral")
    torch.manual_seed(0)
    net = Checkpoint.from_module(build_hypernet(c)).build(torch.device(DEV), torch.bfloat16)
    for b in (16, 64):
        x = embeddings(b, c.task_emb_dim, 1).to(DEV, torch.bfloat16)
        with torch.inference_mode():
            ab = net(x)
            provs = [{}] * b

            def by_adapter(ab=ab, provs=provs, b=b):  # timed within this iteration
                ads = [LoraAdapter.from_generated(c, {m: (a[i], bb[i]) for m, (a, bb) in ab.items()}, "float32",
                                                  provs[i]) for i in range(b)]
                return [a.all_finite() for a in ads]

            def at_once(ab=ab, provs=provs):
                return LoraAdapter.batch_from_generated(c, ab, "float32", provs)

            fwd = timeit(lambda x=x: net(x))
            t_old, t_new = timeit(by_adapter), timeit(at_once)
        res[f"B={b}"] = {"forward_ms": 1e3 * fwd, "old_ms_per_adapter": 1e3 * t_old / b,
                         "new_ms_per_adapter": 1e3 * t_new / b}
        print(f"B={b}: forward {1e3 * fwd:.2f} ms; off the GPU per adapter: per-adapter fill {1e3 * t_old / b:.2f} "
              f"ms, batch layout {1e3 * t_new / b:.2f} ms", flush=True)
    n = 16_777_216 // 4  # a float32 Mistral adapter, ~16.8 MB
    src = torch.randn(n, device=DEV)
    pin = torch.empty(n, pin_memory=True)
    t_page = timeit(lambda: src.to("cpu", copy=True))
    t_pin = timeit(lambda: pin.copy_(src))
    res["d2h_GBps"] = {"pageable_new_buffer": 4 * n / t_page / 1e9, "pinned": 4 * n / t_pin / 1e9}
    print("D2H 16.8 MB: pageable into a new buffer {:.1f} GB/s, pinned {:.1f} GB/s".format(*res["d2h_GBps"].values()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-layout.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
