"""The demo bundle committed in the repository: complete, small, reproducible from its seed, served by
`loragen serve` with no arguments, and its adapters do their tasks when PEFT loads them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from generator import DEMO_BUNDLE, DEMO_CHECKPOINTS
from generator.train.suite import build_suite
from tests.service_server import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def test_bundle_is_complete_small_and_its_suite_rebuilds_from_the_seed(tmp_path):
    for part in ("suite.json", "build.json", "base/config.json", "base/model.safetensors", "base/tokenizer.json",
                 "library/_multitask/adapter_config.json", "t2l-sft/config.json", "t2l-sft/model.safetensors",
                 "t2l-recon/model.safetensors", "eval/quality.md", "eval/quality.json", "eval/adapters.png",
                 "t2l-sft/loss.png", "t2l-sft/train_log.json", "base/loss.png"):
        assert (DEMO_BUNDLE / part).is_file(), part
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.rglob("*") if p.is_file())
    assert size < 16 * 2**20, f"the bundle is {size / 2**20:.1f} MiB"
    build = json.loads((DEMO_BUNDLE / "build.json").read_text())
    cfg = build["config"]
    assert build["command"].startswith("loragen train demo")
    rebuilt = build_suite(cfg["seed"], cfg["n_train_examples"], cfg["n_eval_examples"])
    rebuilt.save(tmp_path / "suite.json")
    assert (DEMO_BUNDLE / "suite.json").read_bytes() == (tmp_path / "suite.json").read_bytes()


def test_readme_shows_the_committed_quality_table():
    table = [line for line in (DEMO_BUNDLE / "eval" / "quality.md").read_text().splitlines() if line.startswith("| ")]
    readme = (ROOT / "docs" / "training-and-quality.md").read_text()
    assert len(table) >= 11
    assert all(line in readme for line in table), "docs/training-and-quality.md's quality table differs from eval/quality.md"
    assert "generator/demo/eval/adapters.png" in readme


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    server = ServiceProcess({}, tmp_path_factory.mktemp("demo") / "serve.log")  # no --checkpoint: the default
    yield server
    server.stop()


def test_serve_with_no_arguments_serves_the_trained_demo(demo_server):
    listed = httpx.get(f"{demo_server.url}/v1/checkpoints", timeout=30).json()
    text = json.dumps(listed)
    assert "demo" in text and "loragen/demo-base" in text
    assert set(DEMO_CHECKPOINTS) <= set(re.findall(r'"(demo[\w-]*)"', text))


def test_served_adapter_does_a_seen_task_described_in_new_words(demo_server, tmp_path):
    """The README walk-through on a seen task with an evaluation paraphrase: PEFT loads the adapter the
    service returns and the demo base model, with no instruction, gets the answers right."""
    from peft import PeftModel
    from safetensors import safe_open

    from generator.train.basemodel import canonical, greedy, load_base, prompt
    from generator.train.suite import Suite

    suite = Suite.load(DEMO_BUNDLE / "suite.json")
    task = "last_three"
    assert task in suite.seen
    r = httpx.post(f"{demo_server.url}/generate", json={"task": suite.eval_descriptions[task][0]}, timeout=120)
    assert r.status_code == 200, r.text
    (tmp_path / "adapter_model.safetensors").write_bytes(r.content)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        (tmp_path / "adapter_config.json").write_text(f.metadata()["adapter_config"])
    base, codec = load_base(DEMO_BUNDLE / "base")
    examples = suite.eval_examples[task][:24]
    prompts = [prompt(x) for x, _ in examples]
    plain = greedy(base, codec, prompts)
    adapted = greedy(PeftModel.from_pretrained(base, str(tmp_path)).eval(), codec, prompts)
    right = sum(canonical(a) == canonical(y) for a, (_, y) in zip(adapted, examples, strict=True))
    base_right = sum(canonical(p) == canonical(y) for p, (_, y) in zip(plain, examples, strict=True))
    assert right >= 0.5 * len(examples) and right > base_right


def test_quickstart_walkthrough(demo_server):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--url", demo_server.url],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cache miss" in out.stdout and "PEFT loaded" in out.stdout
    base, adapted = map(int, re.search(r"base model (\d+)/\d+, with adapter (\d+)/", out.stdout).groups())
    assert adapted >= 5 and adapted > base  # capitalize, described in new words: 42/50 in the full evaluation
