"""Before/after of the cache-hit path, in one window: `python -m benchmarks.hit_path` from a checkout's root
measures that checkout's `loragen serve` (run as `python -m service.cli` from the current directory), so
the same command in an older checkout (with this file copied in) measures the older code.

One server (Mistral-7B T2L dims, bfloat16 compute, float32 output, its own Redis), four cached adapters;
then, one client at a time, `--n` requests of each kind: POST of a cached input and GET by id, by httpx
(reading the whole body) and by curl (curl's own time_total, connect to last byte); CPU per hit of the
server and of Redis; redis-benchmark GET of the same entry size. `--near-cache-bytes 0` turns the near cache
off (code that has one). Prints a table; numbers from separate invocations compare only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.assets import build
from benchmarks.generation import embeddings
from benchmarks.serving import Redis, Server, cpu_s, redis_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hit_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60, help="timed requests per kind (default 60)")
    p.add_argument("--near-cache-bytes", default=None, help="LORAGEN_MEMORY_CACHE_BYTES for the server")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loragen-hits-"))
    assets = build(work, seed=0, encoder_layers=1)  # only embeddings are sent: the encoder never runs
    redis = Redis(None, work)

    class ServerArgs:
        http_batch, device = 16, "cpu"

    env = {} if args.near_cache_bytes is None else {"LORAGEN_MEMORY_CACHE_BYTES": args.near_cache_bytes}
    try:
        server = Server(assets, redis, "bfloat16", ServerArgs, work / "serve.log", env)
    except TypeError:  # code from before Server took extra settings
        server = Server(assets, redis, "bfloat16", ServerArgs, work / "serve.log")
    try:
        rows = measure(server, redis, assets, work, args.n)
        entry = sum(redis.client.strlen(k) for k in redis.client.scan_iter(match=server.prefix + "adapter:*"))
        rb = redis_benchmark(redis, entry // 4, 1, args.n)
    finally:
        server.stop()
        redis.close()
    print("\n| kind | p50 ms | p95 ms | server CPU ms/hit | Redis CPU ms/hit |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50']:.1f} | {r['p95']:.1f} | {r['server']:.1f} | {r['redis']:.1f} |")
    if rb:
        print(f"| redis-benchmark GET {entry // 4:,} bytes | {rb['p50_ms']:.1f} | {rb['p95_ms']:.1f} | | |")
    return 0


def measure(server: Server, redis: Redis, assets, work: Path, n: int) -> dict:
    bodies = [json.dumps({"embedding": [round(float(v), 6) for v in e]}).encode()
              for e in embeddings(4, assets.mistral.config.task_emb_dim, 7)]
    client = httpx.Client(base_url=server.url, timeout=600)
    ids = []
    for i, body in enumerate(bodies):
        r = client.post("/v1/adapters", content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"generation failed: {r.status_code} {r.text[:300]}")
        ids.append(r.headers["x-adapter-id"])
        size = len(r.content)
        (work / f"body{i}.json").write_bytes(body)

    def httpx_post(i: int) -> float:
        t = time.perf_counter()
        r = client.post("/v1/adapters", content=bodies[i % 4], headers={"content-type": "application/json"})
        if r.headers.get("x-cache") != "hit" or len(r.content) != size:
            raise RuntimeError(f"not a whole hit: {r.status_code} {r.headers.get('x-cache')}")
        return time.perf_counter() - t

    def httpx_get(i: int) -> float:
        t = time.perf_counter()
        if len(client.get(f"/v1/adapters/{ids[i % 4]}").content) != size:
            raise RuntimeError("short body")
        return time.perf_counter() - t

    def curl(extra: list[str], url: str) -> float:
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                              *extra, url], capture_output=True, text=True, timeout=60).stdout.split()
        if out[:2] != ["200", str(size)]:
            raise RuntimeError(f"curl: {out}")
        return float(out[2])

    kinds = {
        "httpx POST cached input": httpx_post,
        "httpx GET by id": httpx_get,
        "curl POST cached input": lambda i: curl(["-H", "content-type: application/json", "--data-binary",
                                                  f"@{work}/body{i % 4}.json"], server.url + "/v1/adapters"),
        "curl GET by id": lambda i: curl([], f"{server.url}/v1/adapters/{ids[i % 4]}"),
    }
    rows = {}
    for name, one in kinds.items():
        for i in range(3):
            one(i)
        s0, r0 = cpu_s(server.proc.pid), cpu_s(redis.pids[0])
        lat = sorted(one(i) for i in range(n))
        s1, r1 = cpu_s(server.proc.pid), cpu_s(redis.pids[0])
        rows[name] = {"p50": 1e3 * statistics.median(lat), "p95": 1e3 * lat[int(0.95 * (n - 1))],
                      "server": 1e3 * (s1 - s0) / n, "redis": 1e3 * (r1 - r0) / n}
        print(f"  {name}: p50 {rows[name]['p50']:.1f} ms", flush=True)
    client.close()
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
