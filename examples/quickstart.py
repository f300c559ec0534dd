"""Quick start, offline: describe a task in words, get an adapter from loragen, load it with PEFT onto the
demo base model, and watch it do the task with no instruction in the prompt.

    loragen serve                                                     # in one terminal: serves the demo bundle
    python examples/quickstart.py                                     # in another
    python examples/quickstart.py --suite-task take_last_3 --task "Cut the word down to its last three letters."

Inputs are the demo bundle's evaluation examples of the task named by --suite-task. The default task,
replacing t with m, is one the hypernetwork never trained on (other replacements, with t and with m, it
did), described in words no training step used. take_last_3 is held out the same way, and there the demo's
adapters fail: docs/training-and-quality.md has the quality table for every split.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx
import torch
from peft import PeftModel
from safetensors import safe_open

from generator import DEMO_BUNDLE
from generator.train.basemodel import canonical, greedy, load_base, prompt
from generator.train.suite import Suite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    p.add_argument("--suite-task", default="replace_t_m", help="which task's examples to run")
    p.add_argument("--task", default="Please replace every t with m.",
                   help="the description sent to loragen")
    p.add_argument("-n", type=int, default=8, help="examples to show")
    args = p.parse_args()

    r = httpx.post(f"{args.url}/generate", json={"task": args.task}, timeout=120)
    r.raise_for_status()
    print(f"adapter {r.headers['x-adapter-id'][:16]}…: {len(r.content)} bytes, cache {r.headers['x-cache']}")

    out = Path(tempfile.mkdtemp(prefix="loragen-quickstart-"))
    (out / "adapter_model.safetensors").write_bytes(r.content)
    with safe_open(out / "adapter_model.safetensors", "pt") as f:  # the file carries its own PEFT config
        (out / "adapter_config.json").write_text(f.metadata()["adapter_config"])

    base, codec = load_base(args.bundle / "base")
    examples = Suite.load(args.bundle / "suite.json").eval_examples[args.suite_task][: args.n]
    prompts = [prompt(x) for x, _ in examples]  # no instruction: only the adapter says what to do
    before = greedy(base, codec, prompts)
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, str(out)).eval()
    after = greedy(model, codec, prompts)
    print(f"PEFT loaded {out}: {args.task!r}")
    print(f"{'input':>10}  {'expected':>10}  {'base model':>12}  {'with adapter':>12}")
    for (x, y), b, a in zip(examples, before, after, strict=True):
        print(f"{x:>10}  {y:>10}  {b:>12}  {a:>12}  {'✓' if canonical(a) == canonical(y) else '✗'}")
    hits = [sum(canonical(o) == canonical(y) for o, (_, y) in zip(outs, examples, strict=True)) for outs in (before, after)]
    print(f"exact match: base model {hits[0]}/{len(examples)}, with adapter {hits[1]}/{len(examples)}")


if __name__ == "__main__":
    main()
