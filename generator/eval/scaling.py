"""The scaling study: held-out accuracy of T2L SFT against the number of tasks it was trained on.

For each size n (e.g. 32, 128, 512 and all seen tasks) a hypernetwork is trained by SFT on a seeded subset
of n seen tasks, with the same base model, architecture, steps and batch size (so the same number of
training samples, spread over fewer or more tasks). Subsets are nested: the 32 tasks are among the 128,
which are among the 512. Each checkpoint is evaluated like the bundle's own T2L SFT row, on every split of
the bundle's suite, with the bundle's evaluation descriptions. Output:

    OUT/sft-<n>/            the checkpoint trained on n tasks (resumable; a finished size is skipped)
    OUT/scaling.json        per size and split: the pooled score with its 95% interval
    OUT/scaling.md          the table, and the command that made it
    OUT/scaling.png         accuracy per split against the number of training tasks, with intervals
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

from generator.errors import InputError

log = logging.getLogger(__name__)
ROW = "T2L SFT"


def subsets(seen: list[str], sizes: list[int], seed: int) -> dict[int, list[str]]:
    """size → its tasks: prefixes of one seeded order of the seen tasks, so smaller subsets nest in larger."""
    order = sorted(seen)
    random.Random(seed).shuffle(order)
    return {n: sorted(order[:n]) for n in sizes}


def parse_sizes(text: str, n_seen: int) -> list[int]:
    """'32,128,512,all' → sorted distinct sizes, each at most the number of seen tasks."""
    sizes = set()
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            sizes.add(n_seen)
            continue
        if not part.isdigit() or int(part) < 1:
            raise InputError(f"--sizes takes positive task counts or 'all', comma separated; got {part!r}")
        if int(part) > n_seen:
            raise InputError(f"--sizes: {part} tasks asked for, but the suite has {n_seen} seen tasks")
        sizes.add(int(part))
    return sorted(sizes)


def run_scaling(bundle_dir: str | Path, out_dir: str | Path, sizes: list[int], sft_cfg, *, seed: int = 0,
                n_examples: int | None = None, command: str = "", reader=None, batch_size: int = 32,
                pack: int = 2) -> dict:
    """Train and evaluate one T2L SFT per size (`batch_size` samples of `pack` examples per step); write
    scaling.json, .md and .png into out_dir. `reader` (a ReaderSpec): train token-reader hypernetworks instead
    of the bundle's own conditioning."""
    from generator.checkpoint import load_checkpoint
    from generator.eval.quality import Bundle, Evaluator
    from generator.train.conditioning import training_table
    from generator.train.sft import train_sft
    from generator.train.suite import Suite

    bundle = Bundle(Path(bundle_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite.load(bundle.suite)
    config = load_checkpoint(bundle.sft).config  # the bundle's own architecture, encoder and base model
    if reader is not None:
        config = replace(config, reader=reader)
    result: dict = {"bundle": str(bundle.root), "seed": seed, "steps": sft_cfg.steps, "batch_size": batch_size, "pack": pack,
                    "conditioning": "token reader" if config.reader else "pooled embedding", "sizes": {}}
    for n, tasks in subsets(suite.seen, sizes, seed).items():
        ckpt = out / f"sft-{n}"
        if not (ckpt / "model.safetensors").exists():
            log.info("scaling: T2L SFT on %d tasks", n)
            part = suite.with_seen(tasks)
            train_sft(config, part, bundle.base, ckpt, replace(sft_cfg, seed=seed), table=training_table(config, part),
                      batch_size=batch_size, pack=pack)
        ev = Evaluator(bundle, n_examples, sft=ckpt)
        row = ev.evaluate([ROW])[ROW]
        result["sizes"][n] = {split: score for split, score in row.items() if split != "per_task"}
    result["command"] = command
    (out / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scaling.md").write_text(markdown(result))
    plot(result, out / "scaling.png")
    return result


def markdown(result: dict) -> str:
    from generator.eval.quality import SPLIT_HEADERS

    sizes = sorted(result["sizes"], key=int)
    splits = list(result["sizes"][sizes[0]])
    lines = ["| training tasks | " + " | ".join(SPLIT_HEADERS.get(s, s) for s in splits) + " |",
             "| --- |" + " --- |" * len(splits)]
    for n in sizes:
        cells = []
        for s in splits:
            r = result["sizes"][n][s]
            lo, hi = r["ci95"]
            cells.append(f"{r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] (n={r['total']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if result.get("command"):
        text += (f"\nMade by `{result['command']}` ({result['steps']} SFT steps of {result.get('batch_size', 32)} samples "
                 f"for every size; conditioning: {result['conditioning']}).\n")
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from generator.eval.quality import SPLIT_HEADERS

    sizes = sorted(result["sizes"], key=int)
    splits = list(result["sizes"][sizes[0]])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for s in splits:
        acc = [result["sizes"][n][s]["accuracy"] for n in sizes]
        lo = [a - result["sizes"][n][s]["ci95"][0] for a, n in zip(acc, sizes, strict=True)]
        hi = [result["sizes"][n][s]["ci95"][1] - a for a, n in zip(acc, sizes, strict=True)]
        ax.errorbar([int(n) for n in sizes], acc, yerr=[lo, hi], marker="o", capsize=3, label=SPLIT_HEADERS.get(s, s))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tasks the hypernetwork was trained on")
    ax.set_ylabel("exact match (T2L SFT, unseen descriptions)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Zero-shot accuracy against the number of training tasks (95% intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
