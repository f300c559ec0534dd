"""Reliability figures of the service, from real processes on loopback: hostile inputs, a soak under load, and
faults injected under load. One command writes benchmarks/results/reliability.json and reliability.md:

    .venv/bin/python -m benchmarks.reliability                 # about 6 minutes on 2 cores
    .venv/bin/python -m benchmarks.reliability --quick         # a smoke run, about 2 minutes

Everything is a real part: `loragen serve` and `loragen worker` processes (uvicorn), a private redis-server
on a free port, httpx clients in this process. The service serves a small random checkpoint (2 layers,
q/v 32→32 and 32→16) whose encoder is the real MiniLM, so a miss runs the encoder and the hypernetwork and a
hit is a cache read; the slow-client fault uses a 4 MiB adapter instead, larger than socket buffers.

- hostile: every request of tests/hostile.py, as raw bytes; each must get its 4xx (the error envelope when
  the request reaches the app), and the service must stay healthy with its stored adapter intact.
- soak: `--clients` closed-loop clients (default 32) for `--soak-s` (default 60 s), 90% hits on a hot set and
  10% never-seen tasks; the in-process cache is bounded to 1 MiB so that it stays full (evicting) and the
  resident memory of the server measures the service, not a growing cache. Memory is sampled every second
  after a warm-up load; growth is the last sample minus the first.
- faults, each under load from `--fault-clients` clients (default 16): Redis SIGKILLed and restarted, Redis
  frozen (SIGSTOP: the port accepts and nothing answers), Redis refusing writes (maxmemory 1 byte,
  noeviction), cache entries corrupted continuously (flipped bytes, truncation, garbage, bad magic, wrong
  length, another adapter's entry under the id), a `loragen worker` SIGKILLed mid-load in the distributed
  mode (and a fresh one started), and slow clients (readers that stop reading a 4 MiB response, senders that
  announce a body and stall) beside normal ones.
- chaos (benchmarks/chaos.py): two API nodes and three workers on one Redis, `--clients` clients for
  `--chaos-s` (default 60 s), while workers and one API node are SIGKILLed and restarted at random and five
  poison entries are injected; every 200 must equal direct generation, nothing may stay pending, and the
  dead-letter stream must hold exactly the poison. `--only chaos` runs this part alone (chaos.json, chaos.md).

Every answer is checked (tests/load.py): ok (200, and the body is the recorded bytes of a hot task, or a whole
safetensors file for a new one), retryable (429/503 with Retry-After, 504), an error (anything else), or
corrupt (a 200 whose body fails its check). A fault is survived when there are no errors and nothing corrupt;
recovered when /ready says "ready" again and a hot task is served from the cache again, by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chaos import chaos  # noqa: E402
from benchmarks.chaos import markdown as chaos_markdown  # noqa: E402
from tests.hostile import hostile_cases, raw_request  # noqa: E402
from tests.load import LoadResult, Workload, at, hot_hit_again, rss_mib, until_ready  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.service_server import ServiceProcess  # noqa: E402

MAX_BODY = 2 * 1024 * 1024
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------ checkpoints

def small_checkpoint(out: Path) -> Path:
    import torch

    from tests.helpers import tiny_checkpoint

    torch.manual_seed(0)
    return tiny_checkpoint("M", seed=0, e=384).save(out / "small")


def wide_checkpoint(out: Path) -> Path:
    import torch

    from generator.checkpoint import Checkpoint
    from generator.config import EncoderSpec, HyperConfig, ModuleSpec
    from generator.hypernet import build_hypernet

    torch.manual_seed(0)
    config = HyperConfig(variant="M", task_emb_dim=384, latent=16, head_in=32, n_layers=16,
                         modules=(ModuleSpec("q_proj", 2048, 2048), ModuleSpec("v_proj", 2048, 2048)), r=8,
                         encoder=EncoderSpec(), base_model="tiny-random/wide")
    return Checkpoint.from_module(build_hypernet(config)).save(out / "wide")


# ------------------------------------------------------------------------------------------ scenarios

def hostile(ckpt: Path, tmp: Path) -> dict:
    proc = ServiceProcess({"tiny": ckpt}, tmp / "hostile.log", {"LORAGEN_MAX_BODY_BYTES": str(MAX_BODY)})
    try:
        first = httpx.post(proc.url + "/generate", json={"task": "kept safe"}, timeout=60)
        first.raise_for_status()
        cases = hostile_cases(max_body_bytes=MAX_BODY, emb_dim=384, known_id=first.headers["x-adapter-id"])
        failures, by_group, protocol = {}, {}, 0
        for case in cases:
            try:
                problems = case.check(raw_request(proc.port, case.request))
            except OSError as e:
                problems = [f"no answer: {type(e).__name__}: {e}"]
            if httpx.get(proc.url + "/health", timeout=10).status_code != 200:
                problems.append("service unhealthy afterwards")
            if problems:
                failures[case.name] = problems
            by_group[case.group] = by_group.get(case.group, 0) + 1
            protocol += case.protocol
        kept = httpx.get(f"{proc.url}/v1/adapters/{first.headers['x-adapter-id']}", timeout=30).content == first.content
        return {"tried": len(cases), "refused_as_required": len(cases) - len(failures), "failures": failures,
                "refused_by_http_parser": protocol, "by_group": by_group, "stored_adapter_intact": kept,
                "tracebacks_in_log": proc.log_path.read_text(errors="replace").count("Traceback")}
    finally:
        proc.stop()


def soak(ckpt: Path, tmp: Path, clients: int, duration_s: float, warmup_s: float) -> dict:
    env = {"LORAGEN_MEMORY_CACHE_BYTES": str(1 << 20)}
    proc = ServiceProcess({"tiny": ckpt}, tmp / "soak.log", env)
    samples: list[tuple[float, float]] = []
    try:
        w = Workload(proc.url, n_hot=16, miss_ratio=0.1, label="soak")

        async def run() -> tuple[LoadResult, LoadResult]:
            await w.warm()
            warm = await w.run(clients, warmup_s)  # allocator and caches settle: not part of the figures
            stop = asyncio.Event()

            async def sample():
                t0 = time.monotonic()
                while not stop.is_set():
                    samples.append((round(time.monotonic() - t0, 1), round(rss_mib(proc.proc.pid), 1)))
                    await asyncio.sleep(1.0)

            sampler = asyncio.create_task(sample())
            result = await w.run(clients, duration_s)
            stop.set()
            await sampler
            samples.append((round(result.duration_s, 1), round(rss_mib(proc.proc.pid), 1)))
            return warm, result

        load_before = os.getloadavg()
        warm, result = asyncio.run(run())
        rss = [m for _, m in samples]
        return {"clients": clients, "sending_s": duration_s, "warmup_s": warmup_s, "miss_ratio": 0.1,
                "warmup": warm.summary(), **result.summary(),
                "rss_mib": {"first": rss[0], "last": rss[-1], "max": max(rss), "growth": round(rss[-1] - rss[0], 1),
                            "growth_second_half": round(rss[-1] - rss[len(rss) // 2], 1), "samples": samples},
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        proc.stop()


def _fault_result(name: str, injected: str, result: LoadResult, ready_s: float | None, cached_again: bool | None,
                  **extra) -> dict:
    summary = result.summary()
    return {"fault": name, "injected": injected, **summary, "survived": summary["errors"] == 0 and result.corrupt == 0,
            "ready_again_after_s": None if ready_s is None else round(ready_s, 2), "cached_again": cached_again,
            "recovered": ready_s is not None and cached_again is not False, **extra}


def redis_faults(ckpt: Path, tmp: Path, redis: RedisServer, clients: int, duration_s: float) -> list[dict]:
    out = []
    third = duration_s / 3

    def service(name: str) -> ServiceProcess:
        prefix = f"rel:{name}:"
        # no near cache: every hit reads Redis, where the faults are injected
        return ServiceProcess({"tiny": ckpt}, tmp / f"{name}.log", {
            "LORAGEN_REDIS_URL": redis.url, "LORAGEN_CACHE_PREFIX": prefix, "LORAGEN_REDIS_TIMEOUT_S": "0.5",
            "LORAGEN_MEMORY_CACHE_BYTES": "0"})

    def scenario(name: str, injected: str, fault, heal) -> dict:
        proc = service(name)
        try:
            w = Workload(proc.url, n_hot=16, miss_ratio=0.1, label=name)

            async def run():
                await w.warm()
                load = asyncio.create_task(w.run(clients, duration_s))
                await at(third, fault)
                await at(third, heal)
                ready_s = await until_ready(proc.url)  # from the moment Redis is healthy again, under load
                result = await load
                return result, ready_s, await hot_hit_again(w)

            result, ready_s, cached = asyncio.run(run())
            return _fault_result(name, injected, result, ready_s, cached, ready_measured_from="the fault's end")
        finally:
            proc.stop()
            redis.reset()

    out.append(scenario("redis_killed", f"SIGKILL at {third:.0f} s, restarted (empty) at {2 * third:.0f} s",
                        redis.kill, redis.start))
    out.append(scenario("redis_frozen", f"SIGSTOP at {third:.0f} s, SIGCONT at {2 * third:.0f} s",
                        redis.pause, redis.resume))

    def refuse():
        redis.config_set("maxmemory-policy", "noeviction")
        redis.config_set("maxmemory", 1)

    out.append(scenario("redis_refusing_writes", f"maxmemory 1 byte + noeviction from {third:.0f} s to {2 * third:.0f} s",
                        refuse, redis.restore_config))

    # corrupt entries continuously, every way the tests know
    from tests.test_faults import _corruptions

    proc = service("corrupt_entries")
    try:
        w = Workload(proc.url, n_hot=16, miss_ratio=0.1, label="corrupt")
        kinds: list[str] = []
        stop = threading.Event()

        def corrupt():
            rng = random.Random(1)
            r = redis.client()
            keys = [f"rel:corrupt_entries:adapter:{w.ids[t]}" for t in w.hot]
            while not stop.is_set():
                a, b = rng.sample(keys, 2)
                kinds.append(_corruptions(r, a, b, rng))
                time.sleep(0.02)

        async def run():
            await w.warm()
            t = threading.Thread(target=corrupt)
            t.start()
            try:
                result = await w.run(clients, duration_s)
            finally:
                stop.set()
                t.join()
            return result, await until_ready(proc.url), await hot_hit_again(w)

        result, ready_s, cached = asyncio.run(run())
        done = [k for k in kinds if k != "absent"]
        out.append(_fault_result("corrupt_entries", f"{len(done)} entries damaged while read (6 kinds, every 20 ms)",
                                 result, ready_s, cached, corruptions={k: done.count(k) for k in sorted(set(done))}))
    finally:
        proc.stop()
    return out


def worker_killed(ckpt: Path, tmp: Path, redis: RedisServer, clients: int, duration_s: float) -> dict:
    """Distributed mode: an API node and two `loragen worker`s; one is SIGKILLed mid-load, a fresh one joins."""
    env = {"LORAGEN_REDIS_URL": redis.url, "LORAGEN_CACHE_PREFIX": "rel:workers:", "LORAGEN_CLAIM_IDLE_MS": "2000",
           "LORAGEN_REQUEST_TIMEOUT_S": "30"}
    workers = [ServiceProcess({"tiny": ckpt}, tmp / f"worker{i}.log", env, command="worker") for i in range(2)]
    api = ServiceProcess({"tiny": ckpt}, tmp / "api.log", env, "--queue", "redis")
    third = duration_s / 3
    try:
        w = Workload(api.url, n_hot=16, miss_ratio=0.3, label="workers")

        def kill():
            workers[0].proc.kill()
            workers[0].proc.wait()

        def replace():
            workers.append(ServiceProcess({"tiny": ckpt}, tmp / "worker2.log", env, command="worker"))

        async def run():
            await w.warm()
            load = asyncio.create_task(w.run(clients, duration_s))
            await asyncio.gather(at(third, kill), at(2 * third, replace))
            return await load, await until_ready(api.url), await hot_hit_again(w)

        result, ready_s, cached = asyncio.run(run())
        claimed = sum(_metric(p.url, "loragen_jobs_claimed_total") for p in workers[1:])
        return _fault_result("worker_killed", f"a loragen worker SIGKILLed at {third:.0f} s, a fresh one started at "
                             f"{2 * third:.0f} s", result, ready_s, cached, jobs_claimed_from_the_dead=claimed)
    finally:
        api.stop()
        for p in workers:
            p.stop()
        redis.reset()


def slow_clients(wide: Path, tmp: Path, clients: int, duration_s: float, n_slow: int) -> dict:
    proc = ServiceProcess({"wide": wide}, tmp / "slow.log")
    socks: list[socket.socket] = []
    try:
        first = httpx.post(proc.url + "/generate", json={"task": "a wide adapter"}, timeout=60)
        first.raise_for_status()
        adapter_id = first.headers["x-adapter-id"]
        for _ in range(n_slow):  # readers that stop reading a 4 MiB answer
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", proc.port))
            s.sendall(f"GET /v1/adapters/{adapter_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            socks.append(s)
        for _ in range(n_slow):  # senders that announce a body and stall
            s = socket.create_connection(("127.0.0.1", proc.port))
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{")
            socks.append(s)
        w = Workload(proc.url, n_hot=16, miss_ratio=0.1, label="slow")

        async def run():
            await w.warm()
            return await w.run(clients, duration_s), await until_ready(proc.url), await hot_hit_again(w)

        result, ready_s, cached = asyncio.run(run())
        intact = 0
        for s in socks[:n_slow]:  # the slow readers finally read: every byte, intact
            s.settimeout(60)
            buf = b""
            while len(buf.partition(b"\r\n\r\n")[2]) < len(first.content) and (chunk := s.recv(1 << 20)):
                buf += chunk
            intact += buf.partition(b"\r\n\r\n")[2][: len(first.content)] == first.content
        return _fault_result("slow_clients", f"{n_slow} readers stalled on a {len(first.content) / 2**20:.1f} MiB answer "
                             f"+ {n_slow} senders stalled mid-body, beside {clients} normal clients",
                             result, ready_s, cached, slow_readers_intact=f"{intact}/{n_slow}")
    finally:
        for s in socks:
            s.close()
        proc.stop()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------ report

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    redis_version = "Redis " + redis_version.removeprefix("v=")
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "redis": redis_version,
            "git_commit": commit, "worktree_dirty": dirty,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(r: dict) -> str:
    s, h, m = r["soak"], r["hostile"], r["machine"]
    faults = r["faults"]
    lines = [
        "# Reliability figures",
        "",
        f"`{r['command']}` on {m['cores']} cores ({m['cpu']}), {m['redis']}, commit {m['git_commit']}"
        f"{' (uncommitted changes present)' if m['worktree_dirty'] else ''}, {m['date']}; loopback only, the "
        "machine shared with other work (load average before/after the soak: "
        f"{s['loadavg_before'][0]} / {s['loadavg_after'][0]}).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent (soak + faults) | {r['totals']['requests']} |",
        f"| errors (non-retryable answers, transport errors) | {r['totals']['errors']} |",
        f"| corrupt bodies served | {r['totals']['corrupt_served']} |",
        f"| soak: {s['clients']} clients sending for {s['sending_s']:g} s (last answer at {s['duration_s']:g} s) | "
        f"{s['requests']} requests, {s['hits']} hits / "
        f"{s['misses']} misses, {s['errors']} errors, {s['requests_per_s']} req/s |",
        f"| soak latency p50 / p99, all answers | {s['p50_ms']} ms / {s['p99_ms']} ms |",
        f"| soak latency p50 / p99, cache hits | {s['hit_p50_ms']} ms / {s['hit_p99_ms']} ms |",
        f"| soak resident memory (first → last sample, max) | {s['rss_mib']['first']} → {s['rss_mib']['last']} MiB "
        f"(growth {s['rss_mib']['growth']:+} MiB, {s['rss_mib']['growth_second_half']:+} MiB in the second half; max "
        f"{s['rss_mib']['max']}) |",
        f"| faults injected / survived / recovered by themselves | {len(faults)} / "
        f"{sum(f['survived'] for f in faults)} / {sum(f['recovered'] for f in faults)} |",
        f"| hostile inputs tried / refused as required | {h['tried']} / {h['refused_as_required']} "
        f"({h['refused_by_http_parser']} of them refused by uvicorn's HTTP parser with a plain 400) |",
        f"| after the hostile inputs: stored adapter intact, tracebacks in the server log | "
        f"{'yes' if h['stored_adapter_intact'] else 'NO'}, {h['tracebacks_in_log']} |",
        "",
        "| fault (under load) | injected | requests | ok | retryable | errors | corrupt | p99 ms | survived | "
        "ready again after the fault ends | recovered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for f in faults:
        retry = ", ".join(f"{k}: {v}" for k, v in f["retryable"].items()) or "0"
        ready = "—" if f["ready_again_after_s"] is None else f"{f['ready_again_after_s']} s"
        ready += "" if f.get("ready_measured_from") else " (at the load's end)"
        lines.append(f"| {f['fault']} | {f['injected']} | {f['requests']} | {f['ok']} | {retry} | {f['errors']} | "
                     f"{f['corrupt_served']} | {f['p99_ms']} | {'yes' if f['survived'] else 'NO'} | {ready} | "
                     f"{'yes' if f['recovered'] else 'NO'} |")
    if h["failures"]:
        lines += ["", "Hostile inputs not refused as required:", ""]
        lines += [f"- {name}: {'; '.join(p)}" for name, p in h["failures"].items()]
    lines += ["", "Hostile inputs by group: " + ", ".join(f"{g} {n}" for g, n in h["by_group"].items()) + "."]
    if "chaos" in r:
        lines += chaos_markdown(r["chaos"])
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="soak clients (default 32)")
    p.add_argument("--soak-s", type=float, default=60.0, help="soak duration (default 60 s)")
    p.add_argument("--warmup-s", type=float, default=10.0, help="load before the soak's figures start (default 10 s)")
    p.add_argument("--fault-clients", type=int, default=16, help="clients during each fault (default 16)")
    p.add_argument("--fault-s", type=float, default=21.0, help="load per fault; the fault sits in its middle third")
    p.add_argument("--chaos-s", type=float, default=60.0, help="load during the chaos run (default 60 s)")
    p.add_argument("--only", choices=["chaos"], help="run one part alone: chaos (writes chaos.json and chaos.md)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 clients, 10 s soak, 9 s faults, 15 s chaos")
    p.add_argument("--out", type=Path, default=RESULTS, help="where reliability.json and reliability.md go")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.soak_s, args.warmup_s, args.fault_clients, args.fault_s = 8, 10.0, 3.0, 8, 9.0
        args.chaos_s = 15.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python -m benchmarks.reliability" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    binary = shutil.which("redis-server")
    if binary is None:
        print("reliability: redis-server is not on PATH", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="loragen-reliability-"))
    redis = RedisServer.launch(binary)
    started = time.monotonic()
    if args.only == "chaos":
        try:
            result = {"command": command, "machine": machine(),
                      **chaos(small_checkpoint(tmp), tmp, redis, clients=args.clients, duration_s=args.chaos_s)}
        finally:
            redis.close()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
        m = result["machine"]
        text = "\n".join([f"# Chaos under load\n\n`{command}` on {m['cores']} cores ({m['cpu']}), {m['redis']}, "
                          f"commit {m['git_commit']}, {m['date']}.", *chaos_markdown(result), ""])
        (args.out / "chaos.md").write_text(text)
        print(text)
        shutil.rmtree(tmp, ignore_errors=True)
        return 0 if result["passed"] else 1
    try:
        ckpt, wide = small_checkpoint(tmp), wide_checkpoint(tmp)
        step = lambda name: print(f"[{time.monotonic() - started:6.1f} s] {name}", flush=True)  # noqa: E731
        step("hostile inputs")
        hostile_r = hostile(ckpt, tmp)
        step(f"soak: {args.clients} clients, {args.soak_s:g} s (after {args.warmup_s:g} s of warm-up)")
        soak_r = soak(ckpt, tmp, args.clients, args.soak_s, args.warmup_s)
        step("faults on Redis")
        faults = redis_faults(ckpt, tmp, redis, args.fault_clients, args.fault_s)
        step("a worker killed (distributed mode)")
        faults.append(worker_killed(ckpt, tmp, redis, args.fault_clients, args.fault_s))
        step("slow clients")
        faults.append(slow_clients(wide, tmp, args.fault_clients, args.fault_s, n_slow=16))
        step(f"chaos: 2 API nodes, 3 workers, {args.clients} clients, {args.chaos_s:g} s")
        chaos_r = chaos(ckpt, tmp, redis, clients=args.clients, duration_s=args.chaos_s)
    finally:
        redis.close()
    runs = [soak_r, *faults]
    results = {
        "command": command, "machine": machine(), "elapsed_s": round(time.monotonic() - started, 1),
        "totals": {"requests": sum(x["requests"] for x in runs), "errors": sum(x["errors"] for x in runs),
                   "corrupt_served": sum(x["corrupt_served"] for x in runs)},
        "hostile": hostile_r, "soak": soak_r, "faults": faults, "chaos": chaos_r,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "reliability.md").write_text(markdown(results))
    print(markdown(results))
    shutil.rmtree(tmp, ignore_errors=True)
    ok = (results["totals"]["errors"] == 0 and results["totals"]["corrupt_served"] == 0
          and hostile_r["refused_as_required"] == hostile_r["tried"] and hostile_r["stored_adapter_intact"]
          and not hostile_r["tracebacks_in_log"] and all(f["survived"] and f["recovered"] for f in faults)
          and chaos_r["passed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
