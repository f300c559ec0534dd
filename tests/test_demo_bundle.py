"""The demo bundle committed in the repository: complete, small, built by the build `loragen train demo` runs
and reproducible from its seed, served by `loragen serve` with no arguments, and its adapters do their tasks
when PEFT loads them: a seen task described in new words, and a task the hypernetwork never trained on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from functools import cache
from pathlib import Path

import httpx
import pytest

from generator import DEMO_BUNDLE, DEMO_CHECKPOINTS
from generator.train.demo import DemoConfig
from tests.service_server import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
# the README walk-through's tasks and descriptions (evaluation phrasings)
SEEN_TASK = ("capitalize", "Start the word with a capital letter.")
NEVER_TRAINED_TASK = ("replace_t_m", "Please replace every t with m.")


def test_bundle_is_complete_small_and_its_suite_rebuilds_from_the_seed(tmp_path):
    for part in ("suite.json", "build.json", "base/config.json", "base/model.safetensors", "base/tokenizer.json",
                 "library/_multitask/adapter_config.json", "t2l-sft/config.json", "t2l-sft/model.safetensors",
                 "t2l-recon/model.safetensors", "eval/quality.md", "eval/quality.json", "eval/adapters.png",
                 "t2l-sft/loss.png", "t2l-sft/train_log.json", "base/loss.png"):
        assert (DEMO_BUNDLE / part).is_file(), part
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.rglob("*") if p.is_file())
    assert size < 32 * 2**20, f"the bundle is {size / 2**20:.1f} MiB"
    build = json.loads((DEMO_BUNDLE / "build.json").read_text())
    assert build["command"] == "loragen train demo --out generator/demo --seed 0"
    # built with exactly the configuration `loragen train demo` uses today (the task universe)
    cfg = DemoConfig.universe_build(build["config"]["seed"])
    assert build["config"] == json.loads(json.dumps(asdict(cfg)))
    cfg.build_suite().save(tmp_path / "suite.json")
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


@cache
def _suite():
    """The committed suite (8 MB of JSON), read once for the tests that need it."""
    from generator.train.suite import Suite

    return Suite.load(DEMO_BUNDLE / "suite.json")


def _served_accuracy(url: str, description: str, task: str, tmp_path: Path) -> tuple[int, int, int]:
    """(right with the adapter, right without it, examples): PEFT loads the adapter the service returns for
    `description` onto the demo base model, which reads no instruction, on the task's evaluation examples."""
    from peft import PeftModel
    from safetensors import safe_open

    from generator.train.basemodel import canonical, greedy, load_base, prompt
    suite = _suite()
    r = httpx.post(f"{url}/generate", json={"task": description}, timeout=120)
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
    return right, base_right, len(examples)


def _evaluation_words(task: str, description: str) -> str:
    """`description`, checked to be an evaluation phrasing of `task` that no training description contains."""
    suite = _suite()
    assert description.rstrip(".") in [d.rstrip(".") for d in suite.eval_descriptions[task]]
    words = description.rstrip(".").lower()
    assert all(words not in d.lower() for ds in suite.train_descriptions.values() for d in ds)
    return description


def test_served_adapter_does_a_seen_task_described_in_new_words(demo_server, tmp_path):
    """The README walk-through's first step: a seen task in an evaluation phrasing."""
    task, description = SEEN_TASK
    assert task in _suite().seen
    right, base_right, n = _served_accuracy(demo_server.url, _evaluation_words(task, description), task, tmp_path)
    assert right >= 0.5 * n and right > base_right


def test_served_adapter_does_a_task_the_hypernetwork_never_trained_on(demo_server, tmp_path):
    """Zero-shot: a task of the new-parameter-values split, which no hypernetwork training step saw, described
    in evaluation words, gets an adapter that does it."""
    task, description = NEVER_TRAINED_TASK
    suite = _suite()
    assert task in suite.held_out_splits["new_values"] and task not in suite.seen
    right, base_right, n = _served_accuracy(demo_server.url, _evaluation_words(task, description), task, tmp_path)
    assert right >= 0.5 * n and right > base_right


def test_quickstart_walkthrough(demo_server):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--url", demo_server.url],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"\d+ bytes, cache (miss|hit)\n", out.stdout) and "PEFT loaded" in out.stdout
    base, adapted = map(int, re.search(r"base model (\d+)/\d+, with adapter (\d+)/", out.stdout).groups())
    # replace_t_m, a task the hypernetwork never trained on, in evaluation words: 44/50 with `loragen try -n 50`
    assert adapted >= 5 and adapted > base
