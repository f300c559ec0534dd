"""loragen.vllm_resolver against vLLM's real classes (LoRAResolverRegistry, LoRARequest, PEFTHelper, LoRAModel, its
plugin loader) and a real `loragen serve` (the demo checkpoint): registration, names, refusals, the cache.

vLLM's engine is not run (it needs a GPU); what it does with a resolved adapter is load the LoRARequest's
directory with PEFTHelper and LoRAModel.from_local_checkpoint, which these tests do."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("vllm.lora.resolver", reason="vLLM is not installed here: the resolver plugin is tested against "
                    "vLLM's own classes (docs/vllm.md says how to install them)")

import torch
import vllm.lora.lora_model
import vllm.plugins
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry

from generator import DEMO_CHECKPOINTS
from loragen import Client
from loragen.vllm_resolver import (
    RESOLVER_NAME,
    AdapterCache,
    LoragenResolver,
    ResolverSettings,
    _publish,
    lora_int_id,
    register,
    task_lora_name,
)
from tests.service_server import ServiceProcess, free_port

BASE = "loragen/demo-base"  # the demo checkpoint's base model: what vLLM would serve for its adapters
TARGETS = {"q_proj", "v_proj"}
LAYERS = {f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in TARGETS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServiceProcess({"demo": DEMO_CHECKPOINTS["demo"]}, tmp_path_factory.mktemp("vllm-resolver") / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ids(server) -> list[str]:
    """Three adapters the server has generated (and so holds, by id)."""
    with Client(server.url, timeout=60) as client:
        return [client.generate(f"Put the word inside square brackets, vLLM edition {i}.").id for i in range(3)]


@pytest.fixture
def resolver(server, tmp_path):
    def make(**overrides) -> LoragenResolver:
        options = {"url": server.url, "cache_dir": tmp_path / "cache", "timeout_s": 60.0, **overrides}
        return LoragenResolver(ResolverSettings(**options))

    return make


@pytest.fixture
def log_lines():
    """The resolver's log messages. Its logger is under vLLM's `vllm` logger, which does not propagate to the root
    (where caplog listens), so the handler goes on the logger itself."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, logger = Collect(logging.DEBUG), logging.getLogger("vllm.loragen")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def registry():
    """vLLM's registry without our resolver before and after the test."""
    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    yield LoRAResolverRegistry
    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)


@pytest.fixture
def vllm_plugins(monkeypatch, tmp_path):
    """vLLM's own plugin loader, ready to run again in this process, with no other resolver switched on."""
    for name in ("LORAGEN_URL", "LORAGEN_API_KEY", "LORAGEN_TIMEOUT_S", "VLLM_LORA_RESOLVER_CACHE_DIR",
                 "VLLM_LORA_RESOLVER_HF_REPO_LIST", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORAGEN_CACHE_DIR", str(tmp_path / "plugin-cache"))
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    return vllm.plugins.load_general_plugins


def resolve(resolver: LoragenResolver, name: str, base: str = BASE) -> LoRARequest | None:
    return asyncio.run(resolver.resolve_lora(base, name))


def api_requests(url: str) -> float:
    """How many adapter requests (generate, fetch by id) the server has answered: from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("loragen_requests_total{")
             and ('route="/v1/adapters' in line or 'route="/generate' in line)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def load_as_vllm_does(request: LoRARequest) -> LoRAModel:
    """What vLLM's worker does with a resolved LoRARequest (vllm/lora/worker_manager.py): read and check its PEFT
    config, then load its weights. With this CUDA wheel on a CPU machine, vllm.lora.lora_model.PIN_MEMORY must be
    patched off first."""
    helper = PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    return LoRAModel.from_local_checkpoint(request.lora_path, TARGETS, helper, lora_model_id=request.lora_int_id,
                                           device="cpu", dtype=torch.float32)


class EngineStandIn:
    """Stands in for vLLM's engine client (which needs a GPU) with what OpenAIServingModels reads of it; add_lora
    loads the adapter as vLLM's worker does, and records it."""

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(model=BASE, max_model_len=2048)  # .model: the name resolvers are given
        self.renderer = self.input_processor = None
        self.loaded: list[tuple[LoRARequest, LoRAModel]] = []

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        self.loaded.append((lora_request, load_as_vllm_does(lora_request)))
        return True


# ---- registration ------------------------------------------------------------------------------------------------


def test_the_entry_point_is_vllms_general_plugin():
    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "loragen"]
    assert ep.value == "loragen.vllm_resolver:register" and ep.load() is register


def test_vllms_plugin_loader_registers_it_when_loragen_url_is_set(server, vllm_plugins, registry, monkeypatch,
                                                                   log_lines, tmp_path):
    monkeypatch.setenv("LORAGEN_URL", server.url)
    monkeypatch.setenv("LORAGEN_CACHE_MAX_BYTES", "1000000")
    vllm_plugins()
    resolver = registry.get_resolver(RESOLVER_NAME)
    assert isinstance(resolver, LoragenResolver) and resolver.settings.url == server.url
    assert resolver.settings.cache_dir == tmp_path / "plugin-cache" and resolver.settings.cache_max_bytes == 1000000
    assert any("registered" in line and server.url in line for line in log_lines), log_lines


def test_it_is_inert_without_loragen_url(vllm_plugins, registry, log_lines):
    vllm_plugins()
    assert RESOLVER_NAME not in registry.get_supported_resolvers()
    assert log_lines == ["loragen resolver: not registered, LORAGEN_URL is not set"]


@pytest.mark.parametrize(("name", "value", "message"), [
    ("LORAGEN_URL", "ftp://example.org", "LORAGEN_URL must be the loragen server's http(s) URL"),
    ("LORAGEN_TIMEOUT_S", "0", "LORAGEN_TIMEOUT_S must be seconds in (0, 600]"),
    ("LORAGEN_TIMEOUT_S", "3600", "LORAGEN_TIMEOUT_S must be seconds in (0, 600]"),
    ("LORAGEN_TIMEOUT_S", "soon", "LORAGEN_TIMEOUT_S must be a number"),
    ("LORAGEN_CACHE_MAX_BYTES", "10G", "LORAGEN_CACHE_MAX_BYTES must be a whole number"),
    ("LORAGEN_MAX_LORA_RANK", "12", "LORAGEN_MAX_LORA_RANK must be vLLM's --max-lora-rank"),
])
def test_a_setting_that_cannot_be_right_stops_vllm_at_start(server, registry, monkeypatch, name, value, message):
    monkeypatch.setenv("LORAGEN_URL", server.url)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        register()
    assert RESOLVER_NAME not in registry.get_supported_resolvers()


def test_settings_defaults():
    settings = ResolverSettings.from_env({"LORAGEN_URL": "http://loragen:8000"})
    assert settings.cache_dir == Path.home() / ".cache" / "loragen" / "vllm"
    assert settings.timeout_s == 120 and settings.cache_max_bytes == 10 * 2**30 and settings.api_key is None
    assert ResolverSettings.from_env({"LORAGEN_URL": "  "}) is None


def test_importing_the_plugin_adds_nothing_heavy_to_what_vllm_imports():
    """vLLM's resolver module imports torch itself; loragen's plugin must add no torch, model or service code."""
    code = ("import sys, vllm.lora.resolver, vllm.lora.request; before = set(sys.modules); "
            "import loragen.vllm_resolver; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "heavy = new & {'torch', 'transformers', 'peft', 'generator', 'service'}; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- resolving ---------------------------------------------------------------------------------------------------


def test_an_id_resolves_to_a_peft_directory_vllm_loads(server, ids, resolver, monkeypatch, tmp_path):
    request = resolve(resolver(), f"loragen:{ids[0]}")
    assert isinstance(request, LoRARequest)
    assert request.lora_name == f"loragen:{ids[0]}" and request.lora_int_id == lora_int_id(ids[0]) > 0
    path = Path(request.lora_path)
    assert path == tmp_path / "cache" / ids[0]
    with Client(server.url) as client:
        assert (path / "adapter_model.safetensors").read_bytes() == client.get(ids[0]).weights

    monkeypatch.setattr(vllm.lora.lora_model, "PIN_MEMORY", False)  # this CUDA wheel on a CPU machine
    model = load_as_vllm_does(request)
    assert set(model.loras) == LAYERS and model.rank == 8
    q0 = model.loras["model.layers.0.self_attn.q_proj"]
    hidden = json.loads((DEMO_CHECKPOINTS["demo"].parent / "base" / "config.json").read_text())["hidden_size"]
    assert q0.lora_a.shape == (8, hidden) and q0.lora_b.shape == (hidden, 8)
    assert q0.scaling == pytest.approx(16 / math.sqrt(8))  # rsLoRA, as PEFT applies it


def test_a_task_name_generates_an_adapter(server, resolver, log_lines):
    task = "Write the word backwards, resolved by vLLM."
    name = task_lora_name(task)
    assert name == "loragen:task:Write%20the%20word%20backwards%2C%20resolved%20by%20vLLM."
    request = resolve(resolver(), name)
    assert isinstance(request, LoRARequest) and request.lora_name == name
    with Client(server.url) as client:
        again = client.generate(task)
    assert again.cache == "hit" and Path(request.lora_path).name == again.id  # the resolver had it generated
    assert request.lora_int_id == lora_int_id(again.id)


@pytest.mark.parametrize(("name", "why"), [
    ("loragen:task:Write the word backwards", "use 'loragen:task:Write%20the%20word%20backwards'"),
    ("loragen:task:", "the description is empty"),
    ("loragen:task:%20%20", "the description is empty"),
    ("loragen:task:" + "a" * 1001, "more than 1000"),
    ("loragen:task:%FF", "not UTF-8"),
    ("loragen:task:a%0Ab", "control characters"),
    ("loragen:ABC", "not loragen:<id> (64 lowercase hex characters)"),
    ("loragen:" + "A" * 64, "not loragen:<id>"),
])
def test_a_malformed_loragen_name_is_refused_with_a_reason(server, resolver, log_lines, name, why):
    before = api_requests(server.url)
    assert resolve(resolver(), name) is None
    assert len(log_lines) == 1 and why in log_lines[0], log_lines
    assert api_requests(server.url) == before  # refused before asking the server


def test_a_name_that_is_not_ours_is_left_to_other_resolvers(server, resolver, log_lines):
    before = api_requests(server.url)
    assert resolve(resolver(), "my-org/my-adapter") is None
    assert log_lines == [] and api_requests(server.url) == before


def test_an_unknown_id_is_refused(resolver, log_lines):
    assert resolve(resolver(), "loragen:" + "0" * 64) is None
    assert len(log_lines) == 1 and "has no adapter 0000" in log_lines[0], log_lines


def test_an_adapter_for_another_base_model_is_refused(ids, resolver, log_lines):
    assert resolve(resolver(), f"loragen:{ids[0]}", base="mistralai/Mistral-7B-Instruct-v0.2") is None
    assert len(log_lines) == 1, log_lines
    assert "is for base model 'loragen/demo-base', vLLM serves 'mistralai/Mistral-7B-Instruct-v0.2'" in log_lines[0]
    assert resolve(resolver(), f"loragen:{ids[0]}", base="LoRAgen/Demo-Base/") is not None  # hub ids ignore case


def test_loragen_base_model_names_a_model_vllm_serves_from_a_local_path(ids, resolver, log_lines):
    assert resolve(resolver(), f"loragen:{ids[0]}", base="/models/demo-base") is None
    assert "set LORAGEN_BASE_MODEL" in log_lines[-1]
    assert resolve(resolver(base_model=BASE), f"loragen:{ids[0]}", base="/models/demo-base") is not None


def test_an_adapter_that_fails_the_check_is_refused(ids, resolver, log_lines):
    assert resolve(resolver(max_lora_rank=1), f"loragen:{ids[0]}") is None
    assert len(log_lines) == 1 and "not fit for vLLM: r 8 is above --max-lora-rank 1" in log_lines[0], log_lines


def test_a_loragen_4xx_is_refused(resolver, log_lines):
    assert resolve(resolver(checkpoint="no-such-checkpoint"), task_lora_name("Reverse the word.")) is None
    assert len(log_lines) == 1 and "refused" in log_lines[0] and "invalid_input" in log_lines[0], log_lines


def test_loragen_down_is_refused_not_raised(resolver, log_lines):
    nowhere = resolver(url=f"http://127.0.0.1:{free_port()}", timeout_s=5.0)
    assert resolve(nowhere, "loragen:" + "1" * 64) is None
    assert resolve(nowhere, task_lora_name("Reverse the word.")) is None
    assert len(log_lines) == 2 and all("is unreachable or gave no answer" in line for line in log_lines), log_lines


def test_a_cache_it_cannot_write_is_refused_not_raised(ids, resolver, log_lines, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert resolve(resolver(cache_dir=blocked), f"loragen:{ids[0]}") is None
    assert len(log_lines) == 1 and "cannot write" in log_lines[0], log_lines


# ---- vLLM's serving layer -----------------------------------------------------------------------------------------


@pytest.fixture
def serving_models(server, monkeypatch, tmp_path):
    """vLLM's own OpenAIServingModels (what its API server asks to resolve a request's model name) over a stand-in
    engine, with loragen's resolver registered by register() from LORAGEN_URL, and no other resolver: vLLM's
    registry is put back as it was after the test."""
    serving = pytest.importorskip("vllm.entrypoints.openai.models.serving", exc_type=ImportError,
                                  reason="vLLM's OpenAI serving layer does not import here")
    from vllm.entrypoints.openai.models.protocol import BaseModelPath

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    for name in ("LORAGEN_API_KEY", "LORAGEN_CACHE_MAX_BYTES", "LORAGEN_TIMEOUT_S", "LORAGEN_BASE_MODEL",
                 "LORAGEN_CHECKPOINT", "LORAGEN_MAX_LORA_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORAGEN_URL", server.url)
    monkeypatch.setenv("LORAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm.lora.lora_model, "PIN_MEMORY", False)  # this CUDA wheel on a CPU machine
    register()
    engine = EngineStandIn()
    return serving.OpenAIServingModels(engine, [BaseModelPath(name=BASE, model_path=BASE)]), engine


def test_vllms_server_resolves_a_task_name_and_loads_it(server, serving_models, tmp_path):
    models, engine = serving_models
    task = "Wrap the word in asterisks, resolved by vLLM's server."
    name = task_lora_name(task)

    async def twice():
        return await models.resolve_lora(name), await models.resolve_lora(name)

    first, second = asyncio.run(twice())
    assert isinstance(first, LoRARequest), first  # not vLLM's ErrorResponse
    assert first.lora_name == name and Path(first.lora_path).parent == tmp_path / "cache"
    with Client(server.url) as client:
        assert Path(first.lora_path).name == client.generate(task).id  # the adapter loragen generated for the task
    assert len(engine.loaded) == 1 and engine.loaded[0][0] is first
    model = engine.loaded[0][1]
    assert set(model.loras) == LAYERS and model.rank == 8 and model.id == first.lora_int_id
    assert models.lora_requests == {name: first}
    assert second is first and len(engine.loaded) == 1  # vLLM's own cache: no second resolve, no second load


def test_vllms_server_answers_404_for_an_id_loragen_does_not_have(serving_models, log_lines):
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    models, engine = serving_models
    log_lines.clear()  # register()'s line, where that fixture ran first
    name = "loragen:" + "0" * 64
    answer = asyncio.run(models.resolve_lora(name))
    assert isinstance(answer, ErrorResponse), answer
    assert answer.error.code == 404 and answer.error.type == "NotFoundError" and name in answer.error.message
    assert len(log_lines) == 1 and "has no adapter 0000" in log_lines[0], log_lines  # loragen's resolver said no
    assert engine.loaded == [] and models.lora_requests == {}


# ---- the cache ---------------------------------------------------------------------------------------------------


def test_a_second_resolve_reuses_the_directory_without_a_request(server, ids, resolver):
    first = resolve(resolver(), f"loragen:{ids[1]}")
    before = api_requests(server.url)
    second = resolve(resolver(), f"loragen:{ids[1]}")  # a new resolver, as after a vLLM restart: the disk cache
    assert second is not None and second.lora_path == first.lora_path
    assert api_requests(server.url) == before


def test_resolves_that_race_end_with_one_directory(ids, resolver, tmp_path):
    one = resolver()

    async def race():
        return await asyncio.gather(*(one.resolve_lora(BASE, f"loragen:{ids[2]}") for _ in range(4)))

    requests = asyncio.run(race())
    assert all(r is not None for r in requests) and len({r.lora_path for r in requests}) == 1
    assert entries(tmp_path / "cache") == [ids[2]]  # no temporary directory left behind
    assert entries(Path(requests[0].lora_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_threads_that_store_one_adapter_at_once_share_one_entry(server, ids, tmp_path):
    """As two vLLM API processes sharing LORAGEN_CACHE_DIR would: every writer finishes its own temporary
    directory, one rename wins, the others keep the winner's entry."""
    with Client(server.url) as client:
        adapter = client.get(ids[2])
    cache, start = AdapterCache(tmp_path / "shared", 10**9), threading.Barrier(8)

    def store(_):
        start.wait()
        return cache.store(adapter)

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(store, range(8)))
    assert paths == {tmp_path / "shared" / ids[2]} and entries(tmp_path / "shared") == [ids[2]]
    assert (tmp_path / "shared" / ids[2] / "adapter_model.safetensors").read_bytes() == adapter.weights


def test_a_writer_that_loses_the_race_keeps_the_winners_entry(server, ids, tmp_path):
    with Client(server.url) as client:
        adapter = client.get(ids[2])
    winner = AdapterCache(tmp_path / "c", 10**9).store(adapter)
    loser = adapter.save_pretrained(tmp_path / "c" / ".tmp-loser")
    _publish(loser, winner)  # the rename fails (the entry exists): no error, the entry stays whole
    assert entries(winner) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(OSError):
        _publish(tmp_path / "c" / ".tmp-gone", tmp_path / "c" / "elsewhere")  # any other failure is one


def test_least_recently_used_adapters_are_evicted_past_the_bound(ids, resolver, tmp_path, log_lines):
    cache = tmp_path / "cache"
    probe = resolve(resolver(), f"loragen:{ids[0]}")
    entry = sum(f.stat().st_size for f in Path(probe.lora_path).iterdir())  # one adapter's directory, in bytes
    small = resolver(cache_max_bytes=int(entry * 2.5))  # room for two
    a, b, c = (f"loragen:{i}" for i in ids)
    assert resolve(small, b) is not None and entries(cache) == sorted(ids[:2])
    assert resolve(small, a) is not None  # a hit: a is now the most recently used
    assert resolve(small, c) is not None
    assert entries(cache) == sorted([ids[0], ids[2]])  # b went: least recently used, though not the first written
    assert any("evicted 1 adapter(s)" in line for line in log_lines), log_lines
    tiny = resolver(cache_max_bytes=1)  # smaller than any adapter: keeps only the one just resolved
    assert resolve(tiny, b) is not None and entries(cache) == [ids[1]]


# ---- a Doc-to-LoRA adapter -----------------------------------------------------------------------------------------


def test_a_doc_to_lora_adapter_resolves_and_vllm_scales_it_as_d2l_does(tmp_path, monkeypatch):
    """A document's adapter from a Doc-to-LoRA checkpoint (the reference fixture's): `loragen:<id>` resolves to a
    directory vLLM's classes load at --max-lora-rank 32, with the padded rank and vLLM's scaling equal to D2L's
    lora_alpha applied as is."""
    from tests.test_d2l_reference import BASE as D2L_BASE
    from tests.test_d2l_reference import RUN, text

    env = {"LORAGEN_BASE_DIRS": f"d2l={D2L_BASE}", "LORAGEN_CHUNK_TOKENS": "96"}
    proc = ServiceProcess({"d2l": RUN}, tmp_path / "serve.log", env)
    try:
        with Client(proc.url, timeout=60) as client:
            adapter_id = client.generate(document=text("doc2_nonascii")).id  # 2 chunks: rank 24, padded to 32
        resolver = LoragenResolver(ResolverSettings(url=proc.url, cache_dir=tmp_path / "cache", timeout_s=60.0,
                                                    max_lora_rank=32))
        request = asyncio.run(resolver.resolve_lora("tiny-random/qwen3-d2l", f"loragen:{adapter_id}"))
    finally:
        proc.stop()
    assert isinstance(request, LoRARequest)
    monkeypatch.setattr(vllm.lora.lora_model, "PIN_MEMORY", False)  # this CUDA wheel on a CPU machine
    helper = PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=32))
    model = LoRAModel.from_local_checkpoint(request.lora_path, {"down_proj"}, helper, lora_model_id=request.lora_int_id,
                                            device="cpu", dtype=torch.float32)
    assert set(model.loras) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)} and model.rank == 32
    assert model.loras["model.layers.0.mlp.down_proj"].scaling == pytest.approx(2 * 8**1.5)
