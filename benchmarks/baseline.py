"""The per-request baseline: what a user of the reference scripts does for every adapter.

One fresh process per adapter, `loragen generate --checkpoint DIR --task TEXT --out DIR --device DEV`
(float32, like the reference scripts; on the suite's device, a GPU when there is one): start Python and
import torch, load the checkpoint (Mistral-7B T2L dims) and its encoder (the gte-large-sized one), embed the
text, generate, write a PEFT directory. Timed from the process's start to its exit, each run with a different
task and output directory. The service's steady-state throughput to compare it with is measured in the HTTP
section (cache misses from task texts, same checkpoint and encoder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.assets import Assets, task_texts
from benchmarks.common import OtherLoad, stats


def run(assets: Assets, args) -> dict:
    texts = task_texts(args.baseline_runs + 1, args.seed + 7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    env["HF_HUB_OFFLINE"] = "1"
    times, loads = [], []
    for i in range(args.baseline_runs):
        out = assets.workdir / f"baseline-{i}"
        cmd = [sys.executable, "-m", "service.cli", "generate", "--checkpoint", str(assets.mistral_dir),
               "--task", texts[i], "--out", str(out), "--device", args.device]
        if args.wait is not None:
            args.wait()
        with OtherLoad(children=True) as load:  # the `loragen generate` process is the measurement itself
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"loragen generate failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        if not (Path(out) / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"loragen generate wrote no adapter in {out}")
        times.append(dt)
        loads.append(load.cores)
        print(f"  per-request baseline run {i + 1}: {dt:.2f} s (other procs' cores {load.cores})", flush=True)
    s = stats(times)
    return {"command": "python -m service.cli generate --checkpoint DIR --task TEXT --out DIR --device "
                       f"{args.device}", **s,
            "adapters_per_s": 1 / s["median"], "other_load_cores": loads,
            "adapter_bytes": (assets.workdir / "baseline-0" / "adapter_model.safetensors").stat().st_size}
