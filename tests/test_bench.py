"""The benchmark suite's smoke run: every section on tiny sizes, real parts (a `loragen serve` process, its own
redis-server, a `loragen generate` process), and a report of the expected shape with sane numbers. It checks
the machinery, not the machine: the numbers of a --quick run mean nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                                reason="the HTTP section needs redis-server and redis-benchmark on PATH")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and x == x and x != float("inf")


def test_quick_suite_writes_a_complete_report(tmp_path):
    from benchmarks.suite import main

    # the HTTP section with bfloat16 output (bfloat16 compute's default; float32 output is the same path); the
    # batching and processes sections have a test of their own below
    assert main(["--quick", "--dtypes", "bfloat16", "--output-dtype", "bfloat16", "--out", str(tmp_path),
                 "--sections", "generation", "encoder", "baseline", "http"]) == 0
    r = json.loads((tmp_path / "bench-quick-cpu.json").read_text())
    md = (tmp_path / "bench-quick-cpu.md").read_text()
    assert r["quick"] is True and r["device"] == "cpu" and r["machine"]["cpu_model"] and r["versions"]["torch"]
    assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3

    gen = r["generation"]["checkpoints"]["mistral"]
    for b, row in gen["rows"]["bfloat16"].items():
        assert int(b) in (1, 2)
        assert all(_positive(row[k]["adapters_per_s"]) and _positive(row[k]["efficiency"])
                   for k in ("forward", "generate", "e2e"))
        assert _positive(row["matmul_gflops"]) and _positive(row["peak_rss_mib"])
        assert row["bytes_per_adapter"] > gen["adapter_mb_float32"] * 1e6  # the tensors plus the file's header
    od = gen["output_dtype"]["bfloat16"]
    assert od["bfloat16"]["bytes_per_adapter"] < od["float32"]["bytes_per_adapter"]

    enc = r["encoder"]
    for name in ("all-MiniLM-L6-v2", "gte-large-size (random)"):
        assert all(_positive(x["texts_per_s"]) for x in enc[name]["rows"].values())
    assert all(_positive(x["share"]) for x in enc["share_of_e2e"]["bfloat16"].values())

    assert _positive(r["baseline"]["median"]) and r["baseline"]["adapter_bytes"] > 0

    http = r["http"]
    row = http["dtypes"]["bfloat16"]
    for k in ("in_process", "miss_embedding", "miss_text"):
        assert _positive(row[k]["per_s"]) and row[k]["p50_ms"] <= row[k]["p95_ms"] <= row[k]["p99_ms"]
    assert _positive(row["miss_over_in_process"])
    assert http["redis_maxmemory"] == "32mb" and http["redis_evicted_keys"] > 0  # filled before every miss run
    if shutil.which("curl"):  # the miss rows with a load generator in C
        curl = row["miss_embedding_curl"]
        assert curl["client"] == "curl" and row["miss_embedding"]["client"] == "httpx"
        assert _positive(curl["per_s"]) and curl["p50_ms"] <= curl["p95_ms"] <= curl["p99_ms"]
        assert len(curl["not_cached"]) == 1 and _positive(row["miss_curl_over_in_process"])
        cpu = curl["cpu_ms_per_request"]  # clock ticks: a few tiny requests may cost Redis and curl none
        assert _positive(cpu["server"]) and cpu["redis"] >= 0 and cpu["client"] >= 0
    if len(os.sched_getaffinity(0)) > 1:  # the split rows need a core for the server and one for the rest
        assert _positive(row["split"]["miss_over_in_process"]) and row["split"]["server_cpus"] == [min(os.sched_getaffinity(0))]
        if shutil.which("curl"):
            assert _positive(row["split"]["miss_curl_over_in_process"])
    assert set(http["hits"]) == set(http["hits_redis"]) == set(http["redis_benchmark"]) == {"1", "2"}
    assert all(_positive(x["p50_ms"]) for x in [*http["hits"].values(), *http["hits_redis"].values()])
    floor = http["client_floor"]
    assert floor["bytes"] == http["hits"]["1"]["bytes"][0] and _positive(floor["httpx"]["p50_ms"])
    assert set(http["hit_curl"]) == {"hits", "hits_redis"}
    if shutil.which("curl"):  # the C-client rows need curl on PATH
        assert all(_positive(x["p50_ms"]) for x in [*http["hit_curl"].values(), floor["curl"]])
    assert all(_positive(x["rps"]) and _positive(x["p50_ms"]) for x in http["redis_benchmark"].values())
    assert http["redis_benchmark"]["1"]["value_bytes"] == http["entry_bytes"]
    assert http["output_dtype"] == "bfloat16" and http["entry_bytes"] < 0.6 * gen["adapter_mb_float32"] * 1e6
    assert "; bfloat16 output; " in md
    miss_targets = [t["target"] for t in r["targets"] if t["target"].startswith("HTTP")]
    assert miss_targets and all("; bfloat16 output)" in t for t in miss_targets)  # bfloat16 compute's default

    assert {t["target"].split(" ")[0] for t in r["targets"]} >= {"batched", "HTTP", "cache-hit"}
    assert all(isinstance(t["met"], bool) for t in r["targets"])
    for heading in ("**Generation**", "**Encoder**", "**Per-request baseline**", "**HTTP on loopback**"):
        assert heading in md


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("redis-benchmark") is None,
                    reason="needs curl and redis-benchmark")
def test_hit_path_measures_every_kind_of_hit(capsys):
    """The before/after script of the hit path runs whole: every kind of hit, CPU per hit, redis-benchmark."""
    from benchmarks.hit_path import main as hit_path

    assert hit_path(["--n", "2"]) == 0
    table = capsys.readouterr().out.split("| kind |", 1)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:] if line.startswith("|")]
    assert [r[0].strip() for r in rows[:4]] == ["httpx POST cached input", "httpx GET by id",
                                                "curl POST cached input", "curl GET by id"]
    assert all(float(r[1]) > 0 and float(r[3]) >= 0 for r in rows[:4])
    assert rows[4][0].strip().startswith("redis-benchmark GET") and float(rows[4][1]) > 0


def test_quick_batching_and_processes_sections(tmp_path):
    """float32 exact batching against one input at a time (in process and over HTTP, bfloat16 compute beside them)
    and `loragen serve --api-processes N`: real servers, their own redis-server, real clients."""
    from benchmarks.suite import main

    assert main(["--quick", "--sections", "batching", "processes", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench-quick-cpu.json").read_text())
    md = (tmp_path / "bench-quick-cpu.md").read_text()
    ip = r["batching"]["in_process"]
    assert set(ip) == {"1", "2"}
    for row in ip.values():
        assert _positive(row["matmul_gflops"]) and _positive(row["e2e_speedup"])
        assert all(_positive(row[k]["adapters_per_s"]) and _positive(row[k]["efficiency"])
                   for k in ("forward_exact", "forward_one_at_a_time", "e2e_exact", "e2e_one_at_a_time"))
    http = r["batching"]["http"]
    assert set(http["rows"]) == {"1", "2"} and http["client"] in ("curl", "httpx")
    for row in http["rows"].values():
        for k in ("exact", "one_at_a_time"):
            assert _positive(row[k]["per_s"]) and row[k]["p50_ms"] <= row[k]["p99_ms"]
            assert row[k]["bytes"] == http["rows"]["1"]["exact"]["bytes"]  # float32 adapters, one size
    bf = http["bfloat16"]
    assert _positive(bf["per_s"]) and bf["bytes"][0] < 0.6 * http["rows"]["1"]["exact"]["bytes"][0]  # bfloat16 output
    rows = r["processes"]["dtypes"]["float32"]["rows"]
    assert set(rows) == {"1", "2"} and rows["1"]["processes"] == 1 and rows["2"]["processes"] == 4
    assert all(_positive(x["per_s"]) and _positive(x["cpu_ms_per_request"]["server"]) for x in rows.values())
    verdicts = {t["target"].split(" ")[0]: t["met"] for t in r["targets"]}
    assert {"float32,", "float32", "bfloat16", "on"} <= set(verdicts)
    assert verdicts["on"] is None and "not measured: no GPU here" in md  # the GPU target, on a machine without one
    assert all(isinstance(t["met"], bool) for t in r["targets"] if not t["target"].startswith("on a GPU"))
    for heading in ("**float32 batching**", "**API processes**"):
        assert heading in md
