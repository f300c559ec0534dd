"""HTTP end to end on loopback: a real `loragen serve` process with a real Redis cache, real clients.

For each compute dtype, one server (`python -m service.cli serve`, the Mistral-7B T2L dims checkpoint from
assets.py, Redis cache, max_batch_size B, max_wait_ms 5) and, in this process, N concurrent clients
(httpx.AsyncClient, a closed loop: each sends a request, reads the whole body, sends the next):
  miss (embedding)   POST /v1/adapters {"embedding": [...]}, every input distinct: X-Cache: miss
  miss (curl)        the same, the N clients being one `curl --parallel` process (a load generator in C)
  miss (task text)   POST /v1/adapters {"task": "..."}, distinct texts: the encoder runs too
  in-process         the same embedding jobs through service.pool.WorkerPool in this process, same B and N,
                     no HTTP and no cache: HTTP miss throughput / this = the serving overhead
Then, once, cache hits: POST of inputs already cached (X-Cache: hit) at concurrency 1 and N, against
`redis-benchmark -t set,get -d SIZE` on the same Redis with the cache entry's size, at the same concurrencies.
Our own Redis is configured as docker-compose.yml configures the service's (maxmemory 2gb, allkeys-lru) and
is full when a miss run starts (Redis.fill): a cache's steady state. Latency is from sending the request to
having read the last byte of the body. CPU per request: CPU time the server process, Redis (when it is ours)
and the clients (this process; curl) used during a run, / requests: where the time goes, and a measure that
contention distorts much less than wall time. Throughput = requests / wall time of a run; each row is
`--http-runs` runs of fresh, distinct inputs (median [min–max]); latency percentiles pool the requests of all
runs. The clients share the machine's cores with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis as redis_sync
import torch

from benchmarks.assets import Assets, task_texts
from benchmarks.bench_pool import make_jobs, pool_run
from benchmarks.common import DTYPES, OtherLoad, percentile, stats
from benchmarks.generation import embeddings
from generator.pipeline import LoraGenerator, TaskInput
from service.cache import HEADER, PIECE_BYTES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """The Redis the service caches in: `url` if given, else our own redis-server on a free port, configured as
    docker-compose.yml configures the service's (`maxmemory`, `allkeys-lru`)."""

    def __init__(self, url: str | None, workdir: Path, maxmemory: str = "2gb"):
        self.proc: subprocess.Popen | None = None
        self.maxmemory = None
        if url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("no redis-server on PATH; install Redis or pass --redis-url")
            port = free_port()
            self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--maxmemory", maxmemory,
                                          "--maxmemory-policy", "allkeys-lru", "--dir", str(workdir)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            self.maxmemory = maxmemory
        self.url = url
        self.client = redis_sync.Redis.from_url(url, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis_sync.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis at {url} does not answer PING") from None
                time.sleep(0.05)
        info = self.client.info("server")
        self.version = info.get("redis_version")
        kw = self.client.connection_pool.connection_kwargs
        self.host, self.port = kw.get("host", "127.0.0.1"), kw.get("port", 6379)
        self.pids = [self.proc.pid] if self.proc else []
        self._fill = itertools.count()

    def fill(self) -> int:
        """Bring our own Redis to a cache's steady state: full, so that every store evicts older entries and
        reuses their memory, as in production after the first hours. Into an empty Redis every store takes
        fresh memory, faulted in page by page: on the benchmark VM that cost Redis 11-45 ms of CPU per 13.65 MB
        entry instead of about 3. Writes filler values of the cache's piece size (so what they free fits the
        pieces that replace them) until Redis evicts; returns the bytes written. A Redis given by URL is not
        ours to fill: 0."""
        if self.proc is None:
            return 0
        value = bytes(PIECE_BYTES)
        evicted0, written = self.client.info("stats")["evicted_keys"], 0
        while self.client.info("stats")["evicted_keys"] == evicted0:
            pipe = self.client.pipeline(transaction=False)
            for _ in range(16):
                pipe.set(f"bench-fill:{next(self._fill)}", value)
            pipe.execute()
            written += 16 * len(value)
        return written

    def delete_prefix(self, prefix: str) -> None:
        for batch in _chunks(self.client.scan_iter(match=prefix + "*", count=1000), 500):
            self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far, or None if it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), from Linux /proc; [] where it cannot be read."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir() for k in (t / "children").read_text().split()]
        except (OSError, ValueError):
            kids = []
        out += kids
        todo += kids
    return out


class Server:
    """`loragen serve` in its own process, ready when /ready says so. `argv`: more flags (--api-processes N);
    `python`: what runs instead of `-m service.cli` (a `-c` program that changes a default, then calls main)."""

    def __init__(self, assets: Assets, redis: Redis, compute_dtype: str, args, log: Path,
                 extra_env: dict[str, str] | None = None, prefix: str | None = None, cpus: set[int] | None = None,
                 argv: list[str] | None = None, python: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = prefix or f"bench:{uuid.uuid4().hex[:12]}:"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
        env.update({"HF_HUB_OFFLINE": "1", "LORAGEN_LOG_LEVEL": "warning", "LORAGEN_REDIS_URL": redis.url,
                    "LORAGEN_CACHE_PREFIX": self.prefix, "LORAGEN_COMPUTE_DTYPE": compute_dtype,
                    "LORAGEN_MAX_BATCH_SIZE": str(args.http_batch), "LORAGEN_MAX_WAIT_MS": "5",
                    "LORAGEN_MAX_PENDING": "4096", "LORAGEN_REQUEST_TIMEOUT_S": "600", "LORAGEN_DEVICE": args.device,
                    **(extra_env or {})})
        cmd = [sys.executable, *(python or ["-m", "service.cli"]), "serve", "--port", str(self.port),
               "--checkpoint", f"bench={assets.mistral_dir}", *(argv or [])]
        self._log = open(log, "wb")
        self.log_path = log
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))  # before any thread starts
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=pin)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loragen serve exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"loragen serve not ready after 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """The server's processes: its own and, with --api-processes, those it started."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# ------------------------------------------------------------------------------------------- clients

READ_BYTES = 1 << 20

async def closed_loop(url: str, requests: list[tuple[str, str, bytes | None]], concurrency: int,
                      expect_cache: str) -> dict:
    """`concurrency` clients share `requests` (method, path, JSON body); each reads the whole response body."""
    lat = [0.0] * len(requests)
    ids: list[str | None] = [None] * len(requests)
    unexpected = [0]
    sizes: set[int] = set()
    it = iter(enumerate(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def one() -> None:
            for i, (method, path, body) in it:
                t0 = time.perf_counter()
                async with client.stream(method, path, content=body, headers=headers if body else None) as r:
                    # every byte is read, none kept: the load generator shares the cores with the server, and
                    # joining ~14 MB bodies (what .content does) took it ~30% longer
                    size, first = 0, b""
                    async for piece in r.aiter_raw(READ_BYTES):
                        size += len(piece)
                        first = first or piece[:300]
                lat[i] = time.perf_counter() - t0
                ids[i] = r.headers.get("x-adapter-id")
                if r.status_code != 200 or (r.headers.get("x-cache") != expect_cache and expect_cache == "miss"):
                    raise RuntimeError(f"{method} {path}: {r.status_code} X-Cache {r.headers.get('x-cache')} "
                                       f"(expected 200 {expect_cache}): {first!r}")
                if size != int(r.headers["content-length"]):
                    raise RuntimeError(f"{method} {path}: {size} bytes read of {r.headers['content-length']}")
                # a cached input answered as a miss: the cache read failed (e.g. timed out) and it was regenerated
                unexpected[0] += r.headers.get("x-cache") != expect_cache
                sizes.add(size)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies_s": lat, "sizes": sorted(sizes), "ids": ids, "answered_as_miss": unexpected[0]}


# per transfer: its index in the config, status, X-Cache, X-Adapter-Id, bytes read, Content-Length, seconds
_CURL_OUT = ("%{urlnum}|%{http_code}|%header{x-cache}|%header{x-adapter-id}|%{size_download}|%header{content-length}"
             "|%{time_total}\\n")


def curl_loop(url: str, requests: list[tuple[str, str, bytes | None]], concurrency: int, expect_cache: str,
              workdir: Path) -> dict:
    """closed_loop's work with a load generator in C: one `curl --parallel` process keeps `concurrency`
    transfers going (a new one starts as one ends) over `requests`, reading every body into /dev/null. The
    httpx clients spend 30-35 ms of CPU reading a 13.65 MB body, about what the server spends generating it in
    bfloat16; on a 2-core machine that CPU comes out of the server's. Latency: curl's time_total, from the
    transfer's start to its last byte. Same result as closed_loop."""
    binary = shutil.which("curl")
    if binary is None:
        raise RuntimeError("no curl on PATH")
    entries = []
    for j, (method, path, body) in enumerate(requests):
        entry = [f'url = "{url}{path}"', f"request = {method}", 'output = "/dev/null"', f'write-out = "{_CURL_OUT}"']
        if body is not None:
            f = workdir / f"curl-loop-{j}.json"
            f.write_bytes(body)
            entry += ['header = "content-type: application/json"', f'data-binary = "@{f}"']
        entries.append("\n".join(entry) + "\n")
    config = workdir / "curl-loop.cfg"
    config.write_text("next\n".join(entries))
    t0 = time.perf_counter()
    proc = subprocess.run([binary, "--silent", "--show-error", "--parallel", "--parallel-immediate", "--parallel-max",
                           str(concurrency), "--config", str(config)], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(requests):
        raise RuntimeError(f"curl exited {proc.returncode} with {len(lines)} of {len(requests)} results: "
                           f"{proc.stderr.strip()[-1000:]}")
    lat, ids, sizes, unexpected = [0.0] * len(requests), [None] * len(requests), set(), 0
    for line in lines:  # in the order transfers ended; urlnum is the request's index
        i, status, cache, adapter_id, size, length, seconds = line.split("|")
        i = int(i)
        if status != "200" or (cache != expect_cache and expect_cache == "miss"):
            raise RuntimeError(f"curl: {status} X-Cache {cache!r} (expected 200 {expect_cache})")
        if size != length:
            raise RuntimeError(f"curl: {size} bytes read of {length}")
        unexpected += cache != expect_cache
        lat[i], ids[i] = float(seconds), adapter_id
        sizes.add(int(size))
    return {"wall_s": wall, "latencies_s": lat, "sizes": sorted(sizes), "ids": ids, "answered_as_miss": unexpected}


def summarise_runs(runs: list[dict], n: int) -> dict:
    rates = [n / r["wall_s"] for r in runs]
    lat = [t for r in runs for t in r["latencies_s"]]
    return {"n": n, "runs": len(runs), "per_s": stats(rates)["median"], "per_s_range": [min(rates), max(rates)],
            "per_s_runs": rates, "p50_ms": 1e3 * percentile(lat, 50), "p95_ms": 1e3 * percentile(lat, 95),
            "p99_ms": 1e3 * percentile(lat, 99), "mean_ms": 1e3 * sum(lat) / len(lat),
            "bytes": runs[0].get("sizes"),
            "other_load_cores": [r.get("other_load_cores") for r in runs]}


def _body(args, **inp) -> bytes:
    """A POST /v1/adapters body: the input and the output dtype, always named (the API's default follows the
    compute dtype, and the in-process rows use --output-dtype)."""
    return json.dumps({**inp, "dtype": args.output_dtype}).encode()


def _embedding_body(e: torch.Tensor, args) -> bytes:
    return _body(args, embedding=[round(float(v), 6) for v in e])


def embedding_misses(emb_source, args):
    """(requests of a run, warm-up requests of a run): POSTs of fresh, distinct embeddings, as http_phase takes."""
    def requests(n: int):
        return lambda i: [("POST", "/v1/adapters", _embedding_body(e, args)) for e in emb_source(n)]

    return requests(args.http_n), requests(min(args.http_concurrency, 16))


# ------------------------------------------------------------------------------------------- phases

def in_process(assets: Assets, dn: str, args, emb_source) -> dict:
    """The pool without HTTP or cache: same generator, max_batch_size and concurrency as the server."""
    gen = LoraGenerator(assets.mistral, device=args.device, compute_dtype=DTYPES[dn])
    runs = []
    for i in range(args.http_runs):
        warm = [TaskInput.from_embedding(e) for e in emb_source(min(args.http_concurrency, 16))]
        items = [TaskInput.from_embedding(e) for e in emb_source(args.http_n)]
        wj, jj = (make_jobs(x, gen, dn, tag, args.output_dtype) for x, tag in ((warm, f"w{i}"), (items, f"r{i}")))
        if args.wait is not None:
            args.wait()
        with OtherLoad() as load:
            out = asyncio.run(pool_run(gen, wj, jj, max_batch_size=args.http_batch, max_wait_ms=5.0,
                                       concurrency=args.http_concurrency))
        out["cpu_ms_per_request"] = {"server": 1e3 * out["cpu_s"] / args.http_n}  # the timed jobs' (not the warm-up's)
        out["other_load_cores"] = load.cores
        runs.append(out)
    del gen
    row = summarise_runs(runs, args.http_n)
    row["cpu_ms_per_request"] = {"server": stats([r["cpu_ms_per_request"]["server"] for r in runs])["median"]}
    return row


@contextlib.contextmanager
def pinned(cpus: set[int], *, torch_threads: int | None = None, pids: tuple[int, ...] = ()):
    """Run every thread of this process (those running now: Linux sets affinity per thread, and a thread
    inherits its creator's), the threads it starts from now on, and `pids`, on `cpus` only."""
    threads = torch.get_num_threads()
    own = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            own[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    others = {pid: os.sched_getaffinity(pid) for pid in pids}
    for pid in pids:
        os.sched_setaffinity(pid, cpus)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        yield
    finally:
        for tid, mask in [*own.items(), *others.items()]:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        torch.set_num_threads(threads)


def split_phase(assets: Assets, redis: Redis, dn: str, args, emb_source) -> dict | None:
    """The serving overhead without the load generator in the way: the in-process pool on one core (one torch
    thread) against `loragen serve` on that same core, its clients (this process) and Redis on the others.
    On a shared 2-core machine the 32 clients and Redis otherwise take their CPU from the generator."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or not redis.pids:  # needs a core to spare, and our own Redis to move
        return None
    core, rest = {cores[0]}, set(cores[1:])
    with pinned(core, torch_threads=1):
        inp = in_process(assets, dn, args, emb_source)
    print(f"  in-process pool {dn:8s} on 1 core: {inp['per_s']:.2f}/s", flush=True)
    server = Server(assets, redis, dn, args, assets.workdir / f"serve-{dn}-1core.log",
                    {"OMP_NUM_THREADS": "1"}, cpus=core)
    try:
        with pinned(rest, pids=tuple(redis.pids)):
            make, warm = embedding_misses(emb_source, args)
            miss = http_phase(server, redis, f"{dn} miss, server on 1 core", make, args.http_n,
                              args.http_concurrency, "miss", args, warm)
            curl = None if shutil.which("curl") is None else http_phase(
                server, redis, f"{dn} miss (curl), server on 1 core", make, args.http_n, args.http_concurrency,
                "miss", args, warm, client="curl")
    finally:
        server.stop()
        redis.delete_prefix(server.prefix)
    return {"server_cpus": sorted(core), "client_and_redis_cpus": sorted(rest), "in_process": inp,
            "miss_embedding": miss, "miss_over_in_process": miss["per_s"] / inp["per_s"],
            "miss_embedding_curl": curl, "miss_curl_over_in_process": curl and curl["per_s"] / inp["per_s"]}


def http_phase(server: Server, redis: Redis, label: str, make_requests, n: int, concurrency: int,
               expect: str, args, warm_requests=None, stored: list | None = None, client: str = "httpx") -> dict:
    """`--http-runs` runs of `make_requests(i)` by `client` (httpx: closed_loop; curl: curl_loop); for misses,
    our own Redis is filled first (Redis.fill), and the requests whose adapters were then found in the cache
    are appended to `stored`."""
    stored = [] if stored is None else stored
    if client == "httpx":
        def drive(reqs):
            return asyncio.run(closed_loop(server.url, reqs, concurrency, expect))

        def client_cpu():
            return time.process_time()
    else:
        def drive(reqs):
            return curl_loop(server.url, reqs, concurrency, expect, server.log_path.parent)

        def client_cpu():  # curl's, once it has exited and been waited for
            t = os.times()
            return t.children_user + t.children_system
    runs = []
    for i in range(args.http_runs):
        if expect == "miss":
            redis.fill()
        if warm_requests is not None:
            drive(warm_requests(i))
        reqs = make_requests(i)
        if args.wait is not None:
            args.wait()
        pids = server.pids()  # with --api-processes: the supervisor, the API processes and the model worker
        cpu0 = {"server": _sum_cpu(pids), "redis": cpu_s(redis.pids[0]) if redis.pids else None,
                "client": client_cpu()}
        with OtherLoad([*pids, *redis.pids], children=client == "curl") as load:
            out = drive(reqs)
        cpu1 = {"server": _sum_cpu(pids), "redis": cpu_s(redis.pids[0]) if redis.pids else None,
                "client": client_cpu()}
        out["cpu_ms_per_request"] = {k: None if cpu0[k] is None or cpu1[k] is None else 1e3 * (cpu1[k] - cpu0[k]) / n
                                     for k in cpu0}
        out["other_load_cores"] = load.cores
        if expect == "miss":  # a generated adapter whose cache write failed (e.g. a Redis timeout) is not stored
            out["not_cached"] = sum(not redis.client.exists(f"{server.prefix}adapter:{x}") for x in out["ids"])
            stored.extend(req for req, x in zip(reqs, out["ids"], strict=True)
                          if redis.client.exists(f"{server.prefix}adapter:{x}"))
        del out["ids"]
        runs.append(out)
    row = summarise_runs(runs, n)
    row["client"] = client
    if expect == "miss":
        row["not_cached"] = [r["not_cached"] for r in runs]
    else:
        row["answered_as_miss"] = [r["answered_as_miss"] for r in runs]
    row["cpu_ms_per_request"] = {k: stats([r["cpu_ms_per_request"][k] for r in runs])["median"]
                                 if runs[0]["cpu_ms_per_request"][k] is not None else None
                                 for k in runs[0]["cpu_ms_per_request"]}
    print(f"  http {label:34s} {row['per_s']:8.2f}/s [{row['per_s_range'][0]:.2f}–{row['per_s_range'][1]:.2f}] "
          f"p50 {row['p50_ms']:7.1f} p95 {row['p95_ms']:7.1f} p99 {row['p99_ms']:7.1f} ms | CPU ms/request "
          + " / ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_request"].items() if v is not None)
          + f" | other procs' cores {row['other_load_cores']}", flush=True)
    return row


def _sum_cpu(pids: list[int]) -> float | None:
    times = [cpu_s(p) for p in pids]
    return None if any(t is None for t in times) else sum(times)


def redis_benchmark(redis: Redis, size: int, concurrency: int, n: int) -> dict | None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    cmd = [binary, "-h", str(redis.host), "-p", str(redis.port), "-t", "set,get", "-d", str(size),
           "-n", str(n), "-c", str(concurrency), "--csv"]
    with OtherLoad(redis.pids) as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {proc.stderr.strip()[-1000:]}")
    rows = {r["test"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    get = rows["GET"]
    redis.client.delete("key:__rand_int__")  # the key redis-benchmark's SET and GET use
    out = {"rps": float(get["rps"]), "p50_ms": float(get["p50_latency_ms"]), "p95_ms": float(get["p95_latency_ms"]),
           "p99_ms": float(get["p99_latency_ms"]), "avg_ms": float(get["avg_latency_ms"]), "n": n,
           "concurrency": concurrency, "value_bytes": size, "other_load_cores": load.cores,
           "command": " ".join(cmd[1:])}
    print(f"  redis-benchmark GET {size / 1e6:.2f} MB c={concurrency}: {out['rps']:.1f}/s p50 {out['p50_ms']:.2f} ms "
          f"p99 {out['p99_ms']:.2f} ms", flush=True)
    return out


def curl_hits(url: str, requests: list[tuple[str, str, bytes | None]], n: int, workdir: Path) -> dict | None:
    """One client in C: `n` sequential `curl` requests (cycling over `requests`), latency as curl's own
    time_total (connect to last byte; the process start is not in it). Against redis-benchmark, also in C, this
    compares the servers rather than the clients' languages."""
    binary = shutil.which("curl")
    if binary is None:
        return None
    files = []
    for j, (_, _, body) in enumerate(requests):
        files.append(workdir / f"curl-body-{j}.json")
        files[-1].write_bytes(body or b"")
    lat = []
    for i in range(n + 3):  # 3 untimed
        method, path, _ = requests[i % len(requests)]
        cmd = [binary, "-s", "-o", "/dev/null", "-X", method, "-w", "%{http_code} %header{x-cache} %{time_total}",
               url + path]
        if method == "POST":
            cmd[1:1] = ["-H", "content-type: application/json", "--data-binary", f"@{files[i % len(requests)]}"]
        status, cache, seconds = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()
        if status != "200" or cache != "hit":
            raise RuntimeError(f"curl {method} {path}: {status} X-Cache {cache} (expected 200 hit)")
        if i >= 3:
            lat.append(float(seconds))
    return {"n": n, "p50_ms": 1e3 * percentile(lat, 50), "p95_ms": 1e3 * percentile(lat, 95),
            "p99_ms": 1e3 * percentile(lat, 99)}


def _raw_http_server(port: int, size: int) -> None:
    """The least an HTTP server can do: answer every request with `size` bytes from memory, one write."""
    body = os.urandom(size)
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-cache: hit\r\n\r\n" % size

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head)
                writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        async with await asyncio.start_server(handle, "127.0.0.1", port) as srv:
            await srv.serve_forever()

    asyncio.run(serve())


def client_floor(size: int, n: int, workdir: Path) -> dict:
    """What the clients alone cost: httpx (this suite's closed loop, one client) and curl against a bare
    asyncio server in its own process that answers every GET with `size` bytes."""
    import multiprocessing

    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=_raw_http_server, args=(port, size), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare HTTP server did not start") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        reqs = [("GET", "/", None)] * n
        asyncio.run(closed_loop(url, reqs[:5], 1, "hit"))
        out = closed_loop_summary(asyncio.run(closed_loop(url, reqs, 1, "hit")))
        return {"bytes": size, "httpx": out, "curl": curl_hits(url, [("GET", "/", None)], n, workdir)}
    finally:
        proc.terminate()
        proc.join(timeout=10)


def closed_loop_summary(out: dict) -> dict:
    lat = out["latencies_s"]
    return {"n": len(lat), "p50_ms": 1e3 * percentile(lat, 50), "p95_ms": 1e3 * percentile(lat, 95),
            "p99_ms": 1e3 * percentile(lat, 99)}


def run(assets: Assets, args) -> dict:
    res: dict = {"batch_size": args.http_batch, "concurrency": args.http_concurrency, "n": args.http_n,
                 "runs": args.http_runs, "output_dtype": args.output_dtype, "dtypes": {}}
    redis = Redis(args.redis_url, assets.workdir, args.redis_maxmemory)
    res["redis_version"] = redis.version
    res["redis_url"] = "own redis-server" if args.redis_url is None else "given"
    res["redis_maxmemory"] = redis.maxmemory
    counter = iter(range(10**9))
    g_seed = args.seed + 1000

    def emb_source(n: int) -> torch.Tensor:  # fresh, distinct embeddings on every call
        return embeddings(n, assets.mistral.config.task_emb_dim, g_seed + next(counter))

    text_counter = iter(range(10**9))

    def texts(n: int) -> list[str]:
        k = next(text_counter)
        return [f"{t} (request {k}-{j})" for j, t in enumerate(task_texts(n, args.seed + 2000 + k))]

    try:
        server = None
        for dn in args.dtypes:
            row: dict = {}
            row["in_process"] = inp = in_process(assets, dn, args, emb_source)
            print(f"  in-process pool {dn:8s} B={args.http_batch} c={args.http_concurrency}: {inp['per_s']:.2f}/s "
                  f"[{inp['per_s_range'][0]:.2f}–{inp['per_s_range'][1]:.2f}] p50 {inp['p50_ms']:.1f} ms", flush=True)
            server = Server(assets, redis, dn, args, assets.workdir / f"serve-{dn}.log")
            try:
                stored: list = []
                make_emb, warm = embedding_misses(emb_source, args)
                row["miss_embedding"] = http_phase(server, redis, f"{dn} miss (embedding) c={args.http_concurrency}",
                                                   make_emb, args.http_n, args.http_concurrency, "miss", args, warm, stored)
                row["miss_over_in_process"] = row["miss_embedding"]["per_s"] / inp["per_s"]
                if shutil.which("curl"):
                    row["miss_embedding_curl"] = curl = http_phase(
                        server, redis, f"{dn} miss (embedding, curl) c={args.http_concurrency}", make_emb, args.http_n,
                        args.http_concurrency, "miss", args, warm, client="curl")
                    row["miss_curl_over_in_process"] = curl["per_s"] / inp["per_s"]
                mk_text = lambda i: [("POST", "/v1/adapters", _body(args, task=t))  # noqa: E731
                                     for t in texts(args.http_text_n)]
                warm_text = lambda i: [("POST", "/v1/adapters", _body(args, task=t))  # noqa: E731
                                       for t in texts(min(args.http_concurrency, 16))]
                row["miss_text"] = http_phase(server, redis, f"{dn} miss (task text) c={args.http_concurrency}",
                                              mk_text, args.http_text_n, args.http_concurrency, "miss", args,
                                              warm_text)
                if dn == args.dtypes[-1]:  # hits do not depend on the compute dtype: measured once
                    res.update(hit_phases(assets, redis, server, stored, dn, args))
            finally:
                server.stop()
                redis.delete_prefix(server.prefix)
            row["split"] = split_phase(assets, redis, dn, args, emb_source)
            res["dtypes"][dn] = row
        res["redis_evicted_keys"] = redis.client.info("stats")["evicted_keys"]
    finally:
        redis.close()
    return res


def hit_phases(assets: Assets, redis: Redis, server: Server, stored: list, dn: str, args) -> dict:
    """Cache hits of a hot set of adapters, from the server with its default near cache (process memory) and
    from a second one on the same entries with none (every hit read from Redis and checked); by httpx clients
    and by curl; redis-benchmark GET of the same size; the clients' own floor."""
    if not stored:
        raise RuntimeError("no generated adapter was stored in the cache: see the server log")
    hot = stored[-args.hot_set :]  # the latest: a full Redis (allkeys-lru) has evicted the first ones
    out: dict = {"hot_set": len(hot)}
    redis_only = Server(assets, redis, dn, args, assets.workdir / f"serve-{dn}-redis-only.log",
                        {"LORAGEN_MEMORY_CACHE_BYTES": "0"}, prefix=server.prefix)
    try:
        for key, srv, label in (("hits", server, "near cache"), ("hits_redis", redis_only, "from Redis")):
            # one untimed pass: into the near cache, and back into Redis if it evicted one since (a miss)
            asyncio.run(closed_loop(srv.url, hot, 1, "hit"))
            srv_hits = {}
            for c in sorted({1, args.http_concurrency}):
                srv_hits[str(c)] = http_phase(srv, redis, f"hit ({label}) c={c}",
                                              lambda i: [hot[j % len(hot)] for j in range(args.hit_n)],
                                              args.hit_n, c, "hit", args)
            out[key] = srv_hits
            if args.wait is not None:
                args.wait()
            out.setdefault("hit_curl", {})[key] = curl = curl_hits(srv.url, hot, args.hit_n, assets.workdir)
            if curl:
                print(f"  curl hit ({label}) c=1: p50 {curl['p50_ms']:.1f} ms p99 {curl['p99_ms']:.1f} ms", flush=True)
    finally:
        redis_only.stop()
    size = int(http_entry_bytes(redis, server.prefix))
    out["entry_bytes"] = size
    out["redis_benchmark"] = {str(c): redis_benchmark(redis, size, c, args.hit_n)
                              for c in sorted({1, args.http_concurrency})}
    out["client_floor"] = floor = client_floor(int(out["hits"]["1"]["bytes"][0]), args.hit_n, assets.workdir)
    print(f"  client floor (bare server, {floor['bytes'] / 1e6:.2f} MB): httpx p50 {floor['httpx']['p50_ms']:.1f} ms, "
          f"curl p50 {floor['curl']['p50_ms'] if floor['curl'] else float('nan'):.1f} ms", flush=True)
    return out


def http_entry_bytes(redis: Redis, prefix: str) -> int:
    """The bytes Redis holds for one whole cached adapter, header included, from an entry's header (its pieces
    may have been evicted since: allkeys-lru)."""
    head = next(k for k in redis.client.scan_iter(match=prefix + "adapter:*") if k.count(b":") == prefix.count(":") + 1)
    return HEADER.size + HEADER.unpack(redis.client.getrange(head, 0, HEADER.size - 1))[2]
