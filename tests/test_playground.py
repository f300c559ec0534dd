"""The playground (docs/playground.md) on real `loragen serve` processes of the demo bundle, with a real Redis:
the page and its assets, adapter stats and novelty (r×r products) checked against the full ΔW matrices,
try-it checked against PEFT run here on the same base model, its bounds and rate limit, API keys, the
settings that place base models and suites or turn the page off, and a real headless Chromium driving the
page. The browser tests skip, saying why, only where no Chromium and chromedriver are installed (with CI
set they fail: .ci/run installs them)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load

from generator import DEMO_BUNDLE
from generator.adapter import read_safetensors_metadata
from generator.train.suite import Suite
from service.playground import inner_products, squared_norms
from tests.service_server import ServiceProcess

SUITE = Suite.load(DEMO_BUNDLE / "suite.json")
BRACKETS = "Put the word inside square brackets."
KEYS = ("playground-key-0123456789", "playground-key-9876543210")
PAGE_DEADLINE_S = 240  # what a page may take to show a result (the first novelty generates 2,048 adapters)
# the training descriptions novelty compares with: LORAGEN_PLAYGROUND_REFERENCES (default) of the seen tasks'
REFERENCES = min(2048, sum(len(SUITE.train_descriptions[t]) for t in SUITE.seen))
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight")


# ---------------------------------------------------------------------------------------------------------------
# servers


@pytest.fixture(scope="module")
def demo(redis_server, redis_prefix_module, tmp_path_factory):
    """The demo bundle (no --checkpoint), the cache in Redis, no try-it limit of its own."""
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module,
           "LORAGEN_TRY_RATE_LIMIT_PER_S": "0"}
    proc = ServiceProcess({}, tmp_path_factory.mktemp("playground-demo") / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def lone_ckpt(tmp_path_factory) -> Path:
    """The demo checkpoint copied out of its bundle: no base model or suite beside it."""
    return Path(shutil.copytree(DEMO_BUNDLE / "t2l-sft", tmp_path_factory.mktemp("lone") / "t2l-sft"))


@pytest.fixture(scope="module")
def lone(lone_ckpt, tmp_path_factory):
    proc = ServiceProcess({"lone": lone_ckpt}, tmp_path_factory.mktemp("playground-lone") / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed(lone_ckpt, redis_server, redis_prefix_module, tmp_path_factory):
    """The same checkpoint with its base and suite named by the settings, API keys, and a try-it limit of two
    requests, then one per 100 s, per key (in Redis)."""
    env = {"LORAGEN_API_KEYS": ",".join(KEYS), "LORAGEN_REDIS_URL": redis_server.url,
           "LORAGEN_CACHE_PREFIX": redis_prefix_module + "keyed:",
           "LORAGEN_PLAYGROUND_BASES": f"mine={DEMO_BUNDLE / 'base'}",
           "LORAGEN_PLAYGROUND_SUITES": json.dumps({"mine": str(DEMO_BUNDLE / "suite.json")}),
           "LORAGEN_TRY_RATE_LIMIT_PER_S": "0.01", "LORAGEN_TRY_RATE_LIMIT_BURST": "2",
           "LORAGEN_PLAYGROUND_REFERENCES": "400"}  # fewer training adapters to generate than by default
    proc = ServiceProcess({"mine": lone_ckpt}, tmp_path_factory.mktemp("playground-keyed") / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(demo):
    with httpx.Client(base_url=demo.url, timeout=300) as c:
        yield c


def assert_error(r: httpx.Response, status: int, type_: str, match: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["type"] == type_ and match in body["message"], body
    return body


def generate(c: httpx.Client, text: str, **fields) -> tuple[str, bytes]:
    r = c.post("/v1/adapters", json={"task": text, **fields})
    assert r.status_code == 200, r.text
    return r.headers["x-adapter-id"], r.content


# ---------------------------------------------------------------------------------------------------------------
# the full matrices, computed here to check the service's r×r arithmetic


def full_delta_ws(data: bytes) -> dict[tuple[str, int], torch.Tensor]:
    """(module, layer) → ΔW = scaling·B·A as a full float64 matrix."""
    config = json.loads(read_safetensors_metadata(data)["adapter_config"])
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    parts: dict = {}
    for key, t in load(data).items():
        layer, module, which = KEY.fullmatch(key).groups()
        parts[(module, int(layer), which)] = t.double()
    return {(m, i): scaling * parts[(m, i, "B")] @ parts[(m, i, "A")] for (m, i, w) in parts if w == "A"}


def full_distance(x: bytes, y: bytes) -> float:
    wx, wy = full_delta_ws(x), full_delta_ws(y)
    return float(sum(((wx[k] - wy[k]) ** 2).sum() for k in wx)) ** 0.5


def test_r_by_r_products_equal_the_full_matrices():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(3, 2, 4, 24, generator=g), torch.randn(3, 2, 20, 4, generator=g)  # X=3 adapters, N=2 layers
    ya, yb = torch.randn(5, 2, 4, 24, generator=g), torch.randn(5, 2, 20, 4, generator=g)
    wx = xb.double() @ xa.double()  # (3, 2, 20, 24)
    wy = yb.double() @ ya.double()
    torch.testing.assert_close(squared_norms(xa, xb), (wx ** 2).sum((-1, -2)), rtol=1e-5, atol=1e-6)
    want = torch.einsum("xnij,ynij->xy", wx, wy)
    torch.testing.assert_close(inner_products(xa, xb, ya, yb), want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the page


def test_the_page_and_its_assets_are_served_open_offline_and_locked_down(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/playground.js"' in page.text and 'id="generate"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere: works offline
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert client.head("/").status_code == 200
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    assert_error(client.get("/static/../settings.py"), 404, "not_found")
    assert_error(client.get("/static/nothing.js"), 404, "not_found")


def test_what_the_page_is_told_about_the_demo_bundle(client):
    info = client.get("/v1/playground").json()
    by_id = {c["id"]: c for c in info["checkpoints"]}
    assert set(by_id) == {"demo", "demo-recon"} and by_id["demo"]["default"]
    for c in by_id.values():
        assert c["try"]["available"] and c["try"]["reason"] is None
        assert c["try"]["examples"] and all(x.isalpha() for x in c["try"]["examples"])
        assert c["novelty"] == {"available": True, "reason": None, "descriptions": REFERENCES}
        assert c["suggestions"][0] == SUITE.eval_descriptions[SUITE.seen[0]][0]
        # evaluation phrasings of eight seen tasks spread over the suite, not eight of one family
        tasks = [next(t for t in SUITE.seen if SUITE.eval_descriptions[t][0] == d) for d in c["suggestions"]]
        assert len(set(tasks)) == 8 and len({t.split("_")[0] for t in tasks}) >= 4, tasks
    assert info["limits"] == {"max_inputs": 8, "max_input_chars": 64, "max_text_chars": 200_000}


# ---------------------------------------------------------------------------------------------------------------
# stats


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_are_the_norms_of_the_full_delta_w(client, dtype):
    adapter_id, data = generate(client, BRACKETS, dtype=dtype)
    r = client.get(f"/v1/adapters/{adapter_id}/stats")
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["id"] == adapter_id and stats["checkpoint"] == "demo" and stats["dtype"] == dtype
    assert stats["size"] == len(data) and stats["base_model"] == "loragen/demo-base"
    assert (stats["rank"], stats["lora_alpha"], stats["use_rslora"], stats["n_layers"]) == (8, 16.0, True, 4)
    assert stats["modules"] == ["q_proj", "v_proj"] and stats["scaling"] == pytest.approx(16 / 8 ** 0.5)
    full = full_delta_ws(data)
    for (module, layer), w in full.items():
        assert stats["norms"][module][layer] == pytest.approx(float(w.norm()), rel=1e-6)
    total = float(sum((w ** 2).sum() for w in full.values())) ** 0.5
    assert stats["total_norm"] == pytest.approx(total, rel=1e-6)
    assert client.get(f"/v1/adapters/{adapter_id}/stats").json() == stats  # the same answer again


def test_stats_and_novelty_of_unknown_or_malformed_ids_are_404(client):
    for what in ("stats", "novelty"):
        assert_error(client.get(f"/v1/adapters/{'0' * 64}/{what}"), 404, "not_found", "POST /v1/adapters")
        assert_error(client.get(f"/v1/adapters/{'A' * 64}/{what}"), 404, "not_found", "64 lowercase hex")
        assert_error(client.get(f"/v1/adapters/xyz/{what}"), 404, "not_found")


# ---------------------------------------------------------------------------------------------------------------
# novelty


def test_novelty_of_a_training_description_is_a_replica_of_its_adapter(client):
    task = "wrap_square"
    description = SUITE.train_descriptions[task][0]  # every seen task's first description is a reference
    adapter_id, data = generate(client, description)
    r = client.get(f"/v1/adapters/{adapter_id}/novelty")
    assert r.status_code == 200, r.text
    n = r.json()
    assert n["available"] and n["checkpoint"] == "demo"
    assert n["training_adapters"] == REFERENCES
    nearest = n["nearest"][0]
    assert (nearest["task"], nearest["description"]) == (task, description)
    assert nearest["distance"] < 1e-3 * n["norm"]  # its own adapter, up to the rounding of a batched forward
    assert n["verdict"] == "replica" and n["ratio"] < 0.05
    assert n["norm"] == pytest.approx(float(sum((w ** 2).sum() for w in full_delta_ws(data).values())) ** 0.5, rel=1e-6)
    assert [x["distance"] for x in n["nearest"]] == sorted(x["distance"] for x in n["nearest"]) and len(n["nearest"]) == 5


def test_novelty_distances_are_those_of_the_full_matrices(client):
    # a description no model trained on, for a seen task: nearest the training adapters of a task that does it
    # (wrap_square, or a composition ending in it), not a copy, and nearer than unrelated text
    adapter_id, data = generate(client, SUITE.eval_descriptions["wrap_square"][0])
    n = client.get(f"/v1/adapters/{adapter_id}/novelty").json()
    unrelated = client.get(f"/v1/adapters/{generate(client, SUITE.unrelated[0])[0]}/novelty").json()
    assert "wrap_square" in n["nearest"][0]["task"].split(".then."), (n, unrelated)
    assert 0.05 <= n["ratio"] < unrelated["ratio"], (n, unrelated)
    for neighbour in n["nearest"][:2]:  # each distance, against the full ΔW of that training description's adapter
        _, training = generate(client, neighbour["description"])
        assert neighbour["distance"] == pytest.approx(full_distance(data, training), rel=1e-4, abs=1e-4)
    assert 0 < n["typical_distance"] and n["ratio"] == pytest.approx(n["nearest"][0]["distance"] / n["typical_distance"])


def test_novelty_of_an_unrelated_text_is_new(client):
    adapter_id, _ = generate(client, SUITE.unrelated[0])
    n = client.get(f"/v1/adapters/{adapter_id}/novelty").json()
    assert n["verdict"] == "new" and n["ratio"] >= 0.5, n


# ---------------------------------------------------------------------------------------------------------------
# try


def peft_answers(data: bytes, inputs: list[str], tmp_path: Path) -> tuple[list[str], list[str]]:
    """The base model's answers and those with the adapter, computed here with PEFT."""
    from peft import PeftModel

    from generator.train.basemodel import load_base
    from generator.train.prompting import answers

    (tmp_path / "adapter_model.safetensors").write_bytes(data)
    (tmp_path / "adapter_config.json").write_text(read_safetensors_metadata(data)["adapter_config"])
    base, fmt = load_base(DEMO_BUNDLE / "base")
    with torch.no_grad():
        before = answers(base, fmt, inputs, max_new=32)
        model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
        after = answers(model, fmt, inputs, max_new=32)
    return before, after


def test_try_answers_are_those_of_peft_on_the_base_model(client, tmp_path):
    adapter_id, data = generate(client, BRACKETS)
    inputs = client.get("/v1/playground").json()["checkpoints"][0]["try"]["examples"] + ["3 1 2"]
    r = client.post("/v1/try", json={"id": adapter_id, "inputs": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["checkpoint"], body["base_model"]) == (adapter_id, "demo", "loragen/demo-base")
    before, after = peft_answers(data, inputs, tmp_path)
    assert [row["input"] for row in body["rows"]] == inputs
    assert [row["base"] for row in body["rows"]] == before
    assert [row["adapted"] for row in body["rows"]] == after
    assert after != before and f"[{inputs[0]}]" in after  # the adapter changes what the base model does
    # another adapter on the same base (the PeftModel holds several), then the first again
    other_id, other = generate(client, "Convert the word to uppercase")
    r2 = client.post("/v1/try", json={"id": other_id, "inputs": inputs[:2]})
    assert [row["adapted"] for row in r2.json()["rows"]] == peft_answers(other, inputs[:2], tmp_path)[1]
    assert client.post("/v1/try", json={"id": adapter_id, "inputs": inputs}).json() == body


@pytest.mark.parametrize("body,status,type_,match", [
    ({"inputs": ["abc"] * 9}, 422, "invalid_input", "9 inputs; the limit is 8"),
    ({"inputs": ["a" * 65]}, 422, "invalid_input", "65 characters; the limit is 64"),
    ({"inputs": ["  "]}, 422, "invalid_input", "inputs.0 is empty"),
    ({"inputs": ["ab", "ab\ncd"]}, 422, "invalid_input", "inputs.1"),
    ({"inputs": ["naïve"]}, 422, "invalid_input", "no token for 'ï'"),
    ({"inputs": ["a\x00b"]}, 422, "invalid_input", "control character"),
    ({"inputs": []}, 422, "invalid_input", "inputs"),
    ({"inputs": "abc"}, 422, "invalid_input", "inputs"),
    ({"inputs": [3]}, 422, "invalid_input", "inputs.0"),
    ({}, 422, "invalid_input", "inputs"),
    ({"inputs": ["abc"], "extra": 1}, 422, "invalid_input", "extra"),
    ({"inputs": ["abc"], "id": "A" * 64}, 422, "invalid_input", "id"),
    ({"inputs": ["abc"], "id": "0" * 64}, 404, "not_found", "POST /v1/adapters"),
])
def test_try_refuses_what_it_cannot_run(client, body, status, type_, match):
    adapter_id, _ = generate(client, BRACKETS)
    assert_error(client.post("/v1/try", json={"id": adapter_id, **body}), status, type_, match)


def test_try_refuses_bodies_that_are_not_json(client):
    assert_error(client.post("/v1/try", content=b"{", headers={"content-type": "application/json"}), 422, "invalid_input")
    assert_error(client.post("/v1/try", content=b"id=1", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")


# ---------------------------------------------------------------------------------------------------------------
# without a base model or suite; with them named by settings; API keys; the rate limit; the page turned off


def test_a_checkpoint_without_a_base_model_still_generates_and_says_why_it_cannot_try(lone):
    c = httpx.Client(base_url=lone.url, timeout=300)
    (info,) = c.get("/v1/playground").json()["checkpoints"]
    assert info["id"] == "lone" and not info["try"]["available"] and "LORAGEN_PLAYGROUND_BASES" in info["try"]["reason"]
    assert not info["novelty"]["available"] and "no training descriptions" in info["novelty"]["reason"]
    assert info["try"]["examples"] == [] and info["suggestions"] == []
    adapter_id, data = generate(c, BRACKETS)
    assert c.get(f"/v1/adapters/{adapter_id}/stats").json()["checkpoint"] == "lone"
    n = c.get(f"/v1/adapters/{adapter_id}/novelty").json()
    assert not n["available"] and "no training descriptions" in n["reason"] and n["checkpoint"] == "lone"
    assert_error(c.post("/v1/try", json={"id": adapter_id, "inputs": ["jcdg"]}), 422, "invalid_input",
                 "cannot be tried here")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_guard_everything_but_the_page_and_try_has_its_own_limit(keyed):
    c = httpx.Client(base_url=keyed.url, timeout=300)
    for path in ("/", "/static/playground.js", "/static/playground.css"):  # the page asks for the key itself
        assert c.get(path).status_code == 200, path
    for method, path in (("GET", "/v1/playground"), ("POST", "/v1/try"), ("GET", f"/v1/adapters/{'0' * 64}/stats"),
                         ("GET", f"/v1/adapters/{'0' * 64}/novelty")):
        assert_error(c.request(method, path), 401, "unauthorized")
    (info,) = c.get("/v1/playground", headers=_auth(KEYS[0])).json()["checkpoints"]
    assert info["id"] == "mine" and info["try"]["available"] and info["novelty"]["available"]  # from the settings
    adapter_id, _ = generate(httpx.Client(base_url=keyed.url, timeout=300, headers=_auth(KEYS[0])), BRACKETS)
    body = {"id": adapter_id, "inputs": ["jcdg"]}
    # the first try loads the base model while the first novelty loads an encoder: one model load at a time
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        tried = pool.submit(c.post, "/v1/try", json=body, headers=_auth(KEYS[0]))
        compared = pool.submit(c.get, f"/v1/adapters/{adapter_id}/novelty", headers=_auth(KEYS[0]))
        for r in (tried.result(), compared.result()):
            assert r.status_code == 200, r.text
    assert tried.result().json()["rows"][0]["adapted"] == "[jcdg]" and compared.result().json()["checkpoint"] == "mine"
    assert compared.result().json()["training_adapters"] == 400  # LORAGEN_PLAYGROUND_REFERENCES
    r = c.post("/v1/try", json=body, headers=_auth(KEYS[0]))
    assert r.status_code == 200 and r.json()["rows"][0]["adapted"] == "[jcdg]", r.text
    r = c.post("/v1/try", json=body, headers=_auth(KEYS[0]))
    assert_error(r, 429, "rate_limited", "try-it is limited")
    assert 1 <= int(r.headers["retry-after"]) <= 100
    assert c.post("/v1/try", json=body, headers=_auth(KEYS[1])).status_code == 200  # another key, its own bucket
    assert c.get("/v1/playground", headers=_auth(KEYS[0])).status_code == 200  # the limit is try-it's alone


def test_the_setting_turns_the_page_and_try_off(lone_ckpt, tmp_path):
    proc = ServiceProcess({"lone": lone_ckpt}, tmp_path / "serve.log", {"LORAGEN_PLAYGROUND": "false"})
    try:
        c = httpx.Client(base_url=proc.url, timeout=300)
        for method, path in (("GET", "/"), ("GET", "/static/playground.js"), ("GET", "/v1/playground"),
                             ("POST", "/v1/try")):
            assert_error(c.request(method, path, json={}), 404, "not_found")
        adapter_id, _ = generate(c, BRACKETS)
        assert c.get(f"/v1/adapters/{adapter_id}/stats").status_code == 200  # the API stays
        assert "/v1/try" not in c.get("/openapi.json").json()["paths"]
    finally:
        proc.stop()


def test_novelty_compares_with_at_most_the_configured_references_every_seen_task_first(lone_ckpt):
    from generator.checkpoint import load_checkpoint
    from service.playground import find_target
    from service.settings import Settings

    n = len(SUITE.seen) + 6
    settings = Settings(checkpoints={"lone": str(lone_ckpt)}, playground_references=n,
                        playground_suites={"lone": str(DEMO_BUNDLE / "suite.json")})
    target = find_target("lone", str(lone_ckpt), load_checkpoint(lone_ckpt), settings)
    assert len(target.descriptions) == n < sum(len(SUITE.train_descriptions[t]) for t in SUITE.seen)
    first = target.descriptions[:len(SUITE.seen)]
    assert first == [(t, SUITE.train_descriptions[t][0]) for t in SUITE.seen]
    assert target.descriptions[len(SUITE.seen):] == [(t, SUITE.train_descriptions[t][1]) for t in SUITE.seen[:6]]


def test_a_base_model_that_does_not_fit_the_checkpoint_is_not_used(lone_ckpt, tmp_path):
    from transformers import LlamaConfig

    from generator.checkpoint import load_checkpoint
    from service.playground import find_target
    from service.settings import Settings

    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path / "small")  # a config.json of another shape
    settings = Settings(checkpoints={"lone": str(lone_ckpt)}, playground_bases={"lone": str(tmp_path / "small")},
                        playground_suites={"lone": str(DEMO_BUNDLE / "suite.json")})
    target = find_target("lone", str(lone_ckpt), load_checkpoint(lone_ckpt), settings)
    assert target.base is None and "has 2 layers" in target.base_reason and "for 4 layers" in target.base_reason
    assert target.suite == DEMO_BUNDLE / "suite.json" and len(target.descriptions) == REFERENCES
    fits = find_target("lone", str(lone_ckpt), load_checkpoint(lone_ckpt), Settings(
        checkpoints={"lone": str(lone_ckpt)}, playground_bases={"lone": str(DEMO_BUNDLE / "base")}))
    assert fits.base == DEMO_BUNDLE / "base" and fits.base_reason is None and "a" in fits.alphabet
    assert fits.suite is None and "no training descriptions" in fits.suite_reason


@pytest.mark.parametrize("env,match", [
    ({"LORAGEN_PLAYGROUND_BASES": f"nope={DEMO_BUNDLE / 'base'}"}, "names checkpoints that are not served: nope"),
    ({"LORAGEN_PLAYGROUND_BASES": "demo=/nonexistent"}, "not a model directory"),
    ({"LORAGEN_PLAYGROUND_SUITES": "demo=/nonexistent.json"}, "no file /nonexistent.json"),
    ({"LORAGEN_PLAYGROUND_SUITES": "demo"}, "id=path pairs"),
    ({"LORAGEN_TRY_MAX_INPUTS": "0"}, "try_max_inputs"),
])
def test_bad_playground_settings_stop_serve_with_one_line(env, match):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")} | env
    out = subprocess.run([str(Path(sys.executable).with_name("loragen")), "serve", "--port", "0"], env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and match in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


# ---------------------------------------------------------------------------------------------------------------
# a real browser


def _browser_or_skip():
    why = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        why = "selenium is not installed (it is in the test extras: pip install -e '.[test]')"
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if why is None and (binary is None or driver is None):
        why = "no Chromium and chromedriver here: apt-get install chromium chromium-driver (.ci/run does)"
    if why is not None:
        print(f"browser tests skipped: {why}")
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1400",
                "--lang=en-US"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    yield driver
    driver.quit()


def _wait(driver, predicate):
    """Poll the page until `predicate` holds; past the deadline, fail saying what the page shows."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # an element the page replaced between finding and reading it: the page is changing, poll again
        return WebDriverWait(driver, PAGE_DEADLINE_S, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(predicate)
    except TimeoutException:
        shown = {i: _by_id(driver, i).text for i in ("error", "status", "adapter-id", "chart-caption", "novelty-summary",
                                                      "try-unavailable", "try-status", "try-error")}
        pytest.fail(f"the page did not get there within {PAGE_DEADLINE_S} s; it shows {shown}", pytrace=False)


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _describe_and_generate(driver, url: str, text: str, key: str | None = None) -> str:
    driver.get(url)
    if key is not None:
        _wait(driver, lambda d: _by_id(d, "error").is_displayed())  # the server needs a key: the page says so
        assert "API key" in _by_id(driver, "error").text
        _by_id(driver, "api-key").send_keys(key + "\t")  # the change event loads the checkpoints with the key
    _wait(driver, lambda d: _all(d, "#checkpoint option"))
    box = _by_id(driver, "text")
    box.clear()
    box.send_keys(text)
    _by_id(driver, "generate").click()
    return _wait(driver, lambda d: re.fullmatch(r"[0-9a-f]{64}", _by_id(d, "adapter-id").text) and _by_id(d, "adapter-id").text)


def test_in_a_browser_describe_generate_see_the_chart_novelty_and_try_it(browser, demo, client, tmp_path):
    adapter_id = _describe_and_generate(browser, demo.url + "/", BRACKETS)
    assert adapter_id == generate(client, BRACKETS)[0]  # the id the API gives for the same request
    assert _by_id(browser, "adapter-cache").text in ("hit", "miss") and _by_id(browser, "adapter-time").text.endswith("ms")
    curl = _by_id(browser, "curl").text
    assert curl.startswith(f"curl -fsS {demo.url}/v1/adapters") and BRACKETS in curl and "Authorization" not in curl
    stats = client.get(f"/v1/adapters/{adapter_id}/stats").json()
    bars = _wait(browser, lambda d: _all(d, "#chart rect.bar"))
    assert len(bars) == stats["n_layers"] * len(stats["modules"])
    assert {(b.get_attribute("data-module"), int(b.get_attribute("data-layer"))) for b in bars} == {
        (m, i) for m in stats["modules"] for i in range(stats["n_layers"])}
    # the tallest bar is the largest norm
    tallest = max(bars, key=lambda b: float(b.get_attribute("height")))
    largest = max(((m, i) for m in stats["modules"] for i in range(stats["n_layers"])), key=lambda k: stats["norms"][k[0]][k[1]])
    assert (tallest.get_attribute("data-module"), int(tallest.get_attribute("data-layer"))) == largest
    # try-it, on the prefilled example inputs: the rows the API gives
    cells = _wait(browser, lambda d: _all(d, "#try-table td.adapted"))
    inputs = [td.text for td in _all(browser, "#try-table td.input")]
    assert inputs == [x for x in _by_id(browser, "try-inputs").get_attribute("value").split("\n") if x]
    rows = client.post("/v1/try", json={"id": adapter_id, "inputs": inputs}).json()["rows"]
    assert [c.text for c in cells] == [r["adapted"] for r in rows]
    assert [td.text for td in _all(browser, "#try-table td.base")] == [r["base"] for r in rows]
    assert f"[{inputs[0]}]" in [c.text for c in cells]
    # novelty: the nearest training descriptions
    _wait(browser, lambda d: _by_id(d, "novelty-table").is_displayed())
    novelty = client.get(f"/v1/adapters/{adapter_id}/novelty").json()
    first_row = _all(browser, "#novelty-table tbody tr")[0].text
    assert novelty["nearest"][0]["description"] in first_row and "wrap_square" in first_row
    assert _by_id(browser, "novelty-summary").get_attribute("data-verdict") == novelty["verdict"]
    _screenshot(browser, tmp_path / "playground.png")
    # the user's own inputs
    box = _by_id(browser, "try-inputs")
    box.clear()
    box.send_keys("cloud\nmaple")
    _by_id(browser, "try").click()
    _wait(browser, lambda d: [td.text for td in _all(d, "#try-table td.input")] == ["cloud", "maple"])
    mine = client.post("/v1/try", json={"id": adapter_id, "inputs": ["cloud", "maple"]}).json()["rows"]
    assert [td.text for td in _all(browser, "#try-table td.adapted")] == [r["adapted"] for r in mine]


def _screenshot(driver, path: Path) -> None:
    """The whole page as a PNG (Chromium's own full-page capture); LORAGEN_PLAYGROUND_SCREENSHOT=PATH copies it
    there too: that is how docs/playground.png is made."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LORAGEN_PLAYGROUND_SCREENSHOT"):
        shutil.copyfile(path, os.environ["LORAGEN_PLAYGROUND_SCREENSHOT"])


def test_in_a_browser_without_a_base_model_the_page_says_so_and_still_generates(browser, lone):
    adapter_id = _describe_and_generate(browser, lone.url + "/", BRACKETS)
    message = _wait(browser, lambda d: _by_id(d, "try-unavailable").is_displayed() and _by_id(d, "try-unavailable").text)
    assert "not available for this checkpoint" in message and "LORAGEN_PLAYGROUND_BASES" in message
    assert not _by_id(browser, "try-form").is_displayed()
    assert _by_id(browser, "download-safetensors").is_displayed() and _by_id(browser, "download-tar").is_displayed()
    assert _wait(browser, lambda d: _all(d, "#chart rect.bar"))
    assert "Nothing to compare with" in _wait(browser, lambda d: "compar" in _by_id(d, "novelty-summary").text
                                              and _by_id(d, "novelty-summary").text)
    assert len(adapter_id) == 64


def test_in_a_browser_the_page_asks_for_the_key_and_sends_it(browser, keyed):
    _describe_and_generate(browser, keyed.url + "/", "Write each character two times", key=KEYS[1])
    assert _wait(browser, lambda d: _all(d, "#chart rect.bar"))
    assert 'Authorization: Bearer $LORAGEN_API_KEY' in _by_id(browser, "curl").text  # never the key itself
    assert KEYS[1] not in browser.page_source
