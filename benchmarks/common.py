"""What every benchmark here shares: timing, statistics, contention and memory probes, the machine, reports.

Timing is wall clock (`time.perf_counter`), with a device synchronisation around every timed call on a GPU.
Statistics are the median with the IQR (p25–p75) or the range over repeated runs, all taken in one run of
the suite. Contention: the machine may be shared, so every measurement records how many cores other
processes kept busy meanwhile (`OtherLoad`), and the suite records the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "sha_ni")
ROOT = Path(__file__).resolve().parent.parent


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for queued device work (a no-op on the CPU), so wall time covers the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def stats(xs: list[float]) -> dict:
    """median, p25, p75, min, max and n of `xs` (p25 = p75 = the value for a single sample)."""
    s = sorted(xs)
    p25, _, p75 = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else (s[0], s[0], s[0])
    return {"median": statistics.median(s), "p25": p25, "p75": p75, "min": s[0], "max": s[-1], "n": len(s)}


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `xs`, linearly interpolated."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


class PeakMemory:
    """Peak memory while a block runs: host resident set (Linux VmHWM, reset at entry through
    /proc/self/clear_refs) and, on a GPU, torch's peak allocated bytes. Fields are None where unavailable."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.rss_mib: float | None = None
        self.device_mib: float | None = None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm_ok = True
        except OSError:
            self._hwm_ok = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self._hwm_ok:
            self.rss_mib = _vm_hwm_mib()
        if self.device.type == "cuda":
            self.device_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        return False


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    """Versions of what the numbers depend on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "fastapi", "starlette", "uvicorn", "httpx", "redis", "safetensors", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out


def git_state() -> dict:
    """The commit measured and whether the library's tracked files differed from it (best effort)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "generator", "service"],
                               cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": head.stdout.strip(), "library_modified": bool(dirty.stdout.strip())}


def time_it(fn: Callable[[], object], warmup: int, repeats: int,
            cleanup: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of `fn()` per repeat, after `warmup` untimed calls. The result of each call is dropped
    (and `cleanup` run) outside the timed region, so large outputs do not pile up."""
    out = []
    for i in range(warmup + repeats):
        gc.collect()
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        del res
        if cleanup is not None:
            cleanup()
        if i >= warmup:
            out.append(dt)
    return out


def summarise(times: list[float], batch: int) -> dict:
    s = sorted(times)
    if len(s) >= 2:
        p25, _, p75 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        p25 = p75 = s[0]
    med = statistics.median(s)
    return {
        "repeats": len(s),
        "times_s": [round(t, 6) for t in times],
        "median_s": med, "p25_s": p25, "p75_s": p75, "min_s": s[0], "max_s": s[-1],
        "adapters_per_s": batch / med,
        "adapters_per_s_iqr": [batch / p75, batch / p25],
        "adapters_per_s_best": batch / s[0],
        "ms_per_adapter": 1e3 * med / batch,
    }


class OtherLoad:
    """CPU cores busy with other processes while a block runs: (busy jiffies of the whole machine from
    /proc/stat minus those of this process and of `pids`, the processes the benchmark itself started) /
    elapsed jiffies per CPU. The machine may be shared; a value well above 0 means the timings of that block
    were taken under contention. None off Linux."""

    def __init__(self, pids: list[int] | tuple[int, ...] = (), children: bool = False):
        self.pids = ["self", *map(str, pids)]
        self.children = children  # also exclude the CPU of child processes waited for meanwhile
        self.cores: float | None = None

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        self.cores = None
        if self.start and end:
            d_busy, d_total, d_self = (e - s for e, s in zip(end, self.start, strict=True))
            ncpu = os.cpu_count() or 1
            self.cores = round(max(0.0, (d_busy - d_self) / d_total * ncpu), 3) if d_total > 0 else None
        return False

    def _read(self):
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        own = 0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                own += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
            except (OSError, ValueError, IndexError):
                pass  # a process that has exited: its time no longer shows in either reading's total
        if self.children:  # in clock ticks, like /proc
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            own += round((ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK"))
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        total = sum(cpu[:8])  # user..steal; guest time is already counted in user
        return total - idle, total, own


class IdleWaiter:
    """Before a measurement, wait (1 s probes) until other processes use under `threshold` cores, spending
    at most `budget_s` seconds over the whole run; 0 disables waiting. Timings still record OtherLoad."""

    def __init__(self, budget_s: float, threshold: float):
        self.left, self.threshold, self.waited = budget_s, threshold, 0.0

    def __call__(self) -> None:
        while self.left > 0:
            t0 = time.perf_counter()
            with OtherLoad() as probe:
                time.sleep(1.0)
            spent = time.perf_counter() - t0
            self.left -= spent
            if probe.cores is None or probe.cores < self.threshold:
                return
            self.waited += spent


def guarded(args, block: Callable[[], object]) -> tuple[object, float | None, int]:
    """Run a measurement block under OtherLoad, after waiting for an idle machine (--wait-idle). Where the
    block was contended (other processes over --idle-threshold cores) and idle-wait budget is left, run it
    again, up to --retries times. Returns (block's result, other processes' cores, attempts)."""
    attempts = 0
    while True:
        attempts += 1
        args.wait()
        with OtherLoad() as load:
            out = block()
        quiet = load.cores is None or load.cores < args.idle_threshold
        if quiet or attempts > args.retries or args.wait.left <= 0:
            return out, load.cores, attempts


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def machine_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "torch_cpu_capability": capability,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def add_common_args(p: argparse.ArgumentParser, unit: str) -> None:
    """Flags every benchmark here takes: threads, seed, contention handling, JSON output."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help=f"on a shared machine: before each {unit} wait until other processes use under "
                        "--idle-threshold cores, spending at most SECONDS in all (default 0: never wait)")
    p.add_argument("--idle-threshold", type=float, default=0.25, metavar="CORES",
                   help="other processes' CPU use counted as contention (default 0.25 cores)")
    p.add_argument("--retries", type=int, default=1,
                   help=f"with --wait-idle: re-run a contended {unit} up to this many times (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every number to this JSON file")


def report(results: dict, md: str, json_path, summary: str) -> None:
    """Print the markdown and a one-line summary; write every number to `json_path` when given."""
    results["markdown"] = md
    print()
    print(md)
    print(f"\n{summary}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
