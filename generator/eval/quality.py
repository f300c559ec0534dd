"""Quality of generated adapters on a bundle's suite: exact-match accuracy with 95% intervals, adapter
geometry in delta-W space, and a map of the adapters.

Every row is evaluated on each split of the suite (`Suite.evaluated()`): seen tasks, described in words
never used in training, and each held-out split (tasks never shown to the hypernetwork: the basic suite's
one, or the universe's new values, new compositions and new families), with no instruction in the prompt
unless the row says so.
Adapters are applied with `FunctionalLora` (what PEFT computes, checked in the tests); example i of a task
is conditioned on that task's i-th evaluation description (or document), round robin.

Delta-W geometry never builds a d_out×d_in matrix: for adapters k and l, per layer and module,
    <ΔW_k, ΔW_l>_F = s² · Σ_{r,s} (B_kᵀ B_l)_{rs} (A_k A_lᵀ)_{rs}
(r×r products), which gives every pairwise distance and, centred, the Gram matrix whose top eigenvectors
are the PCA of the adapters' delta-W fingerprints.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.checkpoint import load_checkpoint
from generator.train.basemodel import canonical, greedy, load_base, prompt
from generator.train.conditioning import EmbeddingTable, table_for
from generator.train.functional import AB, FunctionalLora, read_peft
from generator.train.lora import MULTITASK
from generator.train.suite import Suite

Z95 = 1.959964
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def interval(self) -> tuple[float, float]:
        """Wilson score interval, 95%."""
        n, p = self.total, self.accuracy
        if not n:
            return (float("nan"), float("nan"))
        denom = 1 + Z95 ** 2 / n
        centre = (p + Z95 ** 2 / (2 * n)) / denom
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
        return (max(0.0, centre - half), min(1.0, centre + half))

    def as_dict(self) -> dict:
        lo, hi = self.interval()
        return {"correct": self.correct, "total": self.total, "accuracy": self.accuracy, "ci95": [lo, hi]}


# A row maps (task, its eval examples) to (prompts, adapters or None): the adapter of example i is row i.
RowFn = Callable[[str, list[tuple[str, str]]], tuple[list[str], AB | None]]


@dataclass
class Bundle:
    """Paths of a built demo bundle (see generator/train/demo.py)."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def suite(self) -> Path:
        return self.root / "suite.json"

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def sft(self) -> Path:
        return self.root / "t2l-sft"

    @property
    def recon(self) -> Path:
        return self.root / "t2l-recon"


class Evaluator:
    def __init__(self, bundle: Bundle, n_examples: int | None = None, sft: str | Path | None = None):
        """`sft`: evaluate this T2L SFT checkpoint instead of the bundle's own (the scaling study's)."""
        self.bundle = bundle
        self.suite = Suite.load(bundle.suite)
        self.model, self.codec = load_base(bundle.base)
        self.sft = load_checkpoint(sft or bundle.sft)
        self.recon = load_checkpoint(bundle.recon) if (bundle.recon / "config.json").exists() else None
        c = self.sft.config
        self.modules, self.n_layers = c.target_modules, c.n_layers
        self.lora = FunctionalLora(self.model, self.modules, c.scaling)
        self.n_examples = n_examples
        self.splits = self.suite.evaluated()
        self.evaluated_tasks = list(dict.fromkeys(t for ts in self.splits.values() for t in ts))
        # seen tasks that have an oracle in the library: what "nearest training adapter" and geometry compare to
        self.library_seen = [t for t in self.suite.seen if (bundle.library / t / "adapter_config.json").exists()]
        s = self.suite  # the texts evaluation conditions on or compares with, and nothing more (a universe has 30k)
        texts = [*(d for t in self.evaluated_tasks for d in (*s.eval_descriptions[t], *s.eval_documents[t])),
                 *(d for t in self.library_seen for d in s.train_descriptions[t]), *s.unrelated]
        self.table = EmbeddingTable(c.encoder, texts)  # pooled: what nearest_seen_task compares
        # what each checkpoint is conditioned through: token states for one with a token reader (encoded once
        # per reader spec), else self.table
        token_tables = {(ck.config.encoder, ck.config.reader): table_for(ck.config, texts) for ck in (self.sft, self.recon)
                        if ck is not None and ck.config.reader is not None}
        self._tables = {id(ck): self.table if ck.config.reader is None else token_tables[(ck.config.encoder, ck.config.reader)]
                        for ck in (self.sft, self.recon) if ck is not None}
        longest = max(len(canonical(y)) for t in self.evaluated_tasks for _, y in self.suite.eval_examples[t])
        self.max_new = longest + 2  # one token per data character, then the newline
        self._library: dict[str, AB] = {}
        self._train_index: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._outputs: dict[tuple[str, str], list[str]] = {}  # (row, task) → answers, from evaluate()
        self._nets = {id(ck): ck.build() for ck in (self.sft, self.recon) if ck is not None}

    # --- adapters -------------------------------------------------------------------------------------
    def library(self, name: str) -> AB:
        if name not in self._library:
            self._library[name] = read_peft(self.bundle.library / name, self.modules, self.n_layers)
        return self._library[name]

    @torch.no_grad()
    def generate(self, checkpoint, texts: list[str]) -> AB:
        return self._tables[id(checkpoint)].adapters(self._nets[id(checkpoint)], texts)

    def nearest_seen_task(self, texts: list[str]) -> list[str]:
        """For each text, the seen task with a library adapter whose training description embeds closest (cosine)."""
        if self._train_index is None:  # built once: every row and every task asks
            names, descs = zip(*[(t, d) for t in self.library_seen for d in self.suite.train_descriptions[t]], strict=True)
            self._train_index = (names, torch.nn.functional.normalize(self.table(list(descs)), dim=-1))
        names, train = self._train_index
        query = torch.nn.functional.normalize(self.table(texts), dim=-1)
        return [names[i] for i in (query @ train.T).argmax(-1).tolist()]

    # --- rows -----------------------------------------------------------------------------------------
    def rows(self) -> dict[str, RowFn]:
        s = self.suite

        def cycle(pool: Sequence[str], n: int) -> list[str]:
            return [pool[i % len(pool)] for i in range(n)]

        def per_example(ab: AB, n: int) -> AB:
            return {m: (a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])) for m, (a, b) in ab.items()}

        def t2l(checkpoint, pool_of: Callable[[str], Sequence[str]]) -> RowFn:
            return lambda task, ex: ([prompt(x) for x, _ in ex], self.generate(checkpoint, cycle(pool_of(task), len(ex))))

        rows: dict[str, RowFn] = {
            "base model, no instruction": lambda task, ex: ([prompt(x) for x, _ in ex], None),
            **self.instruction_rows(cycle),
            "multi-task LoRA": lambda task, ex: ([prompt(x) for x, _ in ex], per_example(self.library(MULTITASK), len(ex))),
            "oracle LoRA (per task)": lambda task, ex: ([prompt(x) for x, _ in ex], per_example(self.library(task), len(ex))),
        }
        if self.recon is not None:
            rows["T2L reconstruction"] = t2l(self.recon, lambda task: s.eval_descriptions[task])
        rows["T2L SFT"] = t2l(self.sft, lambda task: s.eval_descriptions[task])
        rows["T2L SFT from documents"] = t2l(self.sft, lambda task: s.eval_documents[task])
        rows["T2L SFT, unrelated description (control)"] = t2l(self.sft, lambda task: s.unrelated)

        def nearest(task, ex):
            picks = self.nearest_seen_task(cycle(s.eval_descriptions[task], len(ex)))
            ads = [self.library(p) for p in picks]
            return [prompt(x) for x, _ in ex], {m: (torch.cat([a[m][0] for a in ads]), torch.cat([a[m][1] for a in ads]))
                                                 for m in self.modules}

        rows["nearest training adapter (by description)"] = nearest
        return rows

    def instruction_rows(self, cycle) -> dict[str, RowFn]:
        """The base model told the task in its prompt: the ceiling adapters are measured against. A suite
        whose base reads task programs (`Suite.instructions`) has one such row; otherwise the base read the
        training descriptions, and a row with evaluation descriptions shows how far its reading carries."""
        s = self.suite

        def told(texts_of: Callable[[str], Sequence[str]]) -> RowFn:
            return lambda task, ex: ([prompt(x, d) for (x, _), d in zip(ex, cycle(texts_of(task), len(ex)), strict=True)],
                                     None)

        if s.instructions:
            return {"base model, task program in prompt": told(s.base_instructions)}
        return {"base model, instruction in prompt": told(lambda task: s.eval_descriptions[task]),
                "base model, instruction in prompt (training descriptions)": told(lambda task: s.train_descriptions[task])}

    def score(self, fn: RowFn, task: str) -> tuple[Score, list[str]]:
        ex = self.suite.eval_examples[task][: self.n_examples]
        prompts, ab = fn(task, ex)
        if ab is None:
            outs = greedy(self.model, self.codec, prompts, max_new=self.max_new)
        else:
            with self.lora.use(ab):
                outs = greedy(self.model, self.codec, prompts, max_new=self.max_new)
        return Score(sum(canonical(o) == canonical(y) for o, (_, y) in zip(outs, ex, strict=True)), len(ex)), outs

    def evaluate(self, rows: Sequence[str] | None = None) -> dict:
        """row → {split: pooled score, ..., "per_task": accuracy of every evaluated task}."""
        table = {}
        fns = self.rows()
        for name in rows or fns:
            per_task = {}
            for t in self.evaluated_tasks:
                per_task[t], self._outputs[(name, t)] = self.score(fns[name], t)
            pooled = {split: _pool(per_task[t] for t in tasks) for split, tasks in self.splits.items()}
            table[name] = {**{split: sc.as_dict() for split, sc in pooled.items()},
                           "per_task": {t: sc.accuracy for t, sc in per_task.items()}}
            log.info("%-45s %s", name, "  ".join(f"{split} {100 * sc.accuracy:5.1f}%" for split, sc in pooled.items()))
        return table

    def imitation(self) -> dict | None:
        """On held-out tasks, how often the T2L SFT adapter does instead the seen task whose training
        description is nearest to the one it was given (its output equals that task's answer). None for a
        suite whose tasks are known by their examples only (a user's collection)."""
        per_task, hits, total = {}, 0, 0
        held = [t for split, tasks in self.splits.items() if split != "seen" for t in tasks]
        fns = {}
        for task in {*held, *self.library_seen}:
            fns[task] = task_function(task)
            if fns[task] is None:
                return None
        for task in held:
            ex = self.suite.eval_examples[task][: self.n_examples]
            descs = [self.suite.eval_descriptions[task][i % len(self.suite.eval_descriptions[task])] for i in range(len(ex))]
            nearest = self.nearest_seen_task(descs)
            outs = self._outputs.get(("T2L SFT", task)) or self.score(self.rows()["T2L SFT"], task)[1]
            same = [(y := _answer(fns[n], x)) is not None and canonical(o) == canonical(y)
                    for o, n, (x, _) in zip(outs, nearest, ex, strict=True)]
            top = max(set(nearest), key=nearest.count)
            per_task[task] = {"most_often_nearest": top, "does_nearest_task": sum(same) / len(same)}
            hits, total = hits + sum(same), total + len(same)
        return {"does_nearest_seen_task": hits / total if total else float("nan"), "per_task": per_task}

    # --- geometry -------------------------------------------------------------------------------------
    def geometry(self) -> dict:
        """Distances in delta-W space: every T2L SFT adapter (one per eval description) to its nearest
        training adapter (the seen tasks' oracles), against the training adapters' own distances."""
        s = self.suite
        seen = self.library_seen
        train = [self.library(t) for t in seen]
        gen_tasks = [t for t in self.evaluated_tasks for _ in s.eval_descriptions[t]]
        gen_texts = [d for t in self.evaluated_tasks for d in s.eval_descriptions[t]]
        gen = self.generate(self.sft, gen_texts)
        everything = _cat([*train, gen])
        gram = delta_w_gram(everything, self.sft.config.scaling)
        dist = distances(gram)
        k = len(train)
        tt = dist[:k, :k] + torch.diag(torch.full((k,), float("inf")))
        nn_train = tt.min(dim=1).values  # each training adapter to its nearest other one
        pairs = dist[:k, :k][torch.triu(torch.ones(k, k, dtype=torch.bool), 1)]
        to_train = dist[k:, :k]
        nearest_d, nearest_i = to_train.min(dim=1)
        out = {"training_adapters": k, "generated_adapters": len(gen_tasks),
               "train_pairwise": _summary(pairs), "train_nearest_neighbour": _summary(nn_train)}
        for split, names in self.splits.items():
            idx = [i for i, t in enumerate(gen_tasks) if t in set(names)]
            if not idx:
                continue
            out[f"generated_{split}_to_nearest_train"] = _summary(nearest_d[idx])
            if split == "seen":
                own = [seen[nearest_i[i]] == gen_tasks[i] for i in idx]
                out["generated_seen_nearest_is_own_oracle"] = sum(own) / len(own)
        out["generated"] = [  # every generated adapter: its task, description, nearest training adapter
            {"task": t, "description": d, "nearest_training_adapter": seen[i], "distance": round(dd, 5)}
            for t, d, i, dd in zip(gen_tasks, gen_texts, nearest_i.tolist(), nearest_d.tolist(), strict=True)]
        self._map = (gram, [*seen, *gen_tasks], k)
        return out

    def plot(self, path: str | Path) -> None:
        """PCA (of the delta-W Gram matrix) of the training adapters and the generated ones, by task."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not hasattr(self, "_map"):
            self.geometry()
        gram, tasks, k = self._map
        norm = gram.diag().clamp_min(1e-30).sqrt()
        xy = gram_pca(gram / norm[:, None] / norm[None, :], 2)  # directions only: oracles are much smaller
        s = self.suite
        held = set(s.held_out)
        names = list(dict.fromkeys([*self.library_seen, *self.evaluated_tasks]))
        colours = {t: plt.get_cmap("tab20" if i < 20 else "tab20b")(i % 20) for i, t in enumerate(names)}
        fig, ax = plt.subplots(figsize=(8, 6.2), dpi=110)
        for i, t in enumerate(tasks):
            if i < k:
                ax.scatter(*xy[i], s=90, marker="o", color=colours[t], edgecolors="black", linewidths=0.8, zorder=3)
            else:
                ax.scatter(*xy[i], s=22, marker="^" if t in held else ".", color=colours[t], alpha=0.8, zorder=2)
        for t in self.evaluated_tasks:  # label each task once, at the mean of its generated adapters
            mine = [xy[i] for i in range(k, len(tasks)) if tasks[i] == t]
            if not mine:
                continue
            ax.annotate(t + (" (held out)" if t in held else ""), torch.stack(mine).mean(0).tolist(), fontsize=6.5,
                        fontweight="bold" if t in held else "normal", alpha=0.9)
        ax.set_title("Adapters by task: PCA of unit-norm delta-W (Gram via r×r products)\n"
                     "● oracle LoRA (training)   · T2L SFT from unseen descriptions   ▲ held-out task", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.25)
        fig.tight_layout()
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)


def _pool(scores) -> Score:
    scores = list(scores)
    return Score(sum(s.correct for s in scores), sum(s.total for s in scores))


def _cat(adapters: Sequence[AB]) -> AB:
    return {m: (torch.cat([a[m][0] for a in adapters]), torch.cat([a[m][1] for a in adapters])) for m in adapters[0]}


def _summary(x: torch.Tensor) -> dict:
    x = x.double()
    return {"median": x.median().item(), "min": x.min().item(), "max": x.max().item(), "n": x.numel()}


def delta_w_gram(ab: AB, scaling: float) -> torch.Tensor:
    """(K, K) Frobenius inner products of the adapters' delta-W = scaling·B·A, summed over layers and
    modules, through r×r products only: never a d_out×d_in matrix."""
    k = next(iter(ab.values()))[0].shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64)
    for a, b in ab.values():  # a (K, N, r, d_in), b (K, N, d_out, r)
        a, b = a.double(), b.double()
        for n in range(a.shape[1]):
            ga = torch.einsum("kri,lsi->klrs", a[:, n], a[:, n])  # A_k A_lᵀ
            gb = torch.einsum("kor,los->klrs", b[:, n], b[:, n])  # B_kᵀ B_l
            gram += (ga * gb).sum(dim=(-1, -2))
    return gram * scaling ** 2


def distances(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise Frobenius distances from a Gram matrix."""
    d = gram.diag()
    return (d[:, None] + d[None, :] - 2 * gram).clamp_min(0).sqrt()


def gram_pca(gram: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Coordinates on the top principal components, from the Gram matrix (centred in feature space)."""
    k = gram.shape[0]
    h = torch.eye(k, dtype=gram.dtype) - 1.0 / k
    vals, vecs = torch.linalg.eigh(h @ gram @ h)
    top = vals.argsort(descending=True)[:dims]
    return (vecs[:, top] * vals[top].clamp_min(0).sqrt()).float()


SPLIT_HEADERS = {"seen": "seen tasks, unseen descriptions", "held_out": "held-out tasks",
                 "new_values": "new parameter values", "new_compositions": "new compositions",
                 "new_families": "new families"}
# What T2L SFT should reach per split: its accuracy over the oracles' ("ratio"), and its lead in points over
# the multi-task LoRA, the unrelated-description control and the nearest training adapter.
TARGETS = {
    "seen": {"ratio": 0.85},
    "held_out": {"ratio": 0.80, "vs_multi": 10, "vs_control": 10},
    "new_values": {"ratio": 0.70, "vs_multi": 15, "vs_nearest": 15},
    "new_compositions": {"ratio": 0.50, "vs_multi": 15, "vs_nearest": 15},
    "new_families": {"vs_multi": 15, "vs_control": 10, "vs_nearest": 15},
}
BASELINES = {"vs_multi": "multi-task LoRA", "vs_control": "T2L SFT, unrelated description (control)",
             "vs_nearest": "nearest training adapter (by description)"}


def markdown(result: dict) -> str:
    """The quality table, the targets per split and the geometry summary as markdown."""
    splits = [k for k in next(iter(result["rows"].values())) if k != "per_task"]
    lines = ["| adapter | " + " | ".join(SPLIT_HEADERS.get(sp, sp) for sp in splits) + " |",
             "| --- |" + " --- |" * len(splits)]
    for name, row in result["rows"].items():
        cells = []
        for split in splits:
            r = row[split]
            lo, hi = r["ci95"]
            cells.append(f"{r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] (n={r['total']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    t = result.get("targets")
    if t:
        out += ("\nTargets for T2L SFT (ratio: its accuracy over the oracle LoRAs'; the others: its lead in points "
                "over each baseline):\n\n| split | ratio to oracle | − multi-task LoRA | − unrelated control | "
                "− nearest training adapter |\n| --- | --- | --- | --- | --- |\n")
        for split, m in t.items():
            goal = TARGETS.get(split, {})
            cells = [_target_cell(m, goal, key, fmt) for key, fmt in
                     (("ratio", ".2f"), ("vs_multi", "+.1f"), ("vs_control", "+.1f"), ("vs_nearest", "+.1f"))]
            out += f"| {SPLIT_HEADERS.get(split, split)} | " + " | ".join(cells) + " |\n"
    im = result.get("held_out_imitation")
    if im:
        pairs = ", ".join(f"{t} → {v['most_often_nearest']} {v['does_nearest_task']:.0%}" for t, v in im["per_task"].items())
        out += (f"\nOn held-out tasks, {im['does_nearest_seen_task']:.1%} of T2L SFT answers are those of the seen task whose "
                f"training description is nearest to the one given ({pairs}).\n")
    g = result.get("geometry")
    if g:
        held = "; ".join(f"{SPLIT_HEADERS.get(sp, sp)} median {g[f'generated_{sp}_to_nearest_train']['median']:.3f}"
                         for sp in splits if sp != "seen" and f"generated_{sp}_to_nearest_train" in g)
        out += ("\nDelta-W distances (Frobenius, via r×r products): training adapters pairwise median "
                f"{g['train_pairwise']['median']:.3f} (nearest-neighbour median {g['train_nearest_neighbour']['median']:.3f}); "
                f"generated → nearest training adapter, seen tasks median {g['generated_seen_to_nearest_train']['median']:.3f}, "
                f"{held}; {g['generated_seen_nearest_is_own_oracle']:.0%} of seen-task generated adapters lie nearest "
                "their own task's oracle.\n")
    return out


def _target_cell(measured: dict, goal: dict, key: str, fmt: str) -> str:
    value = measured.get(key)
    if value is None or value != value:  # absent, or NaN (no oracle accuracy to divide by)
        return "–"
    text = format(value, fmt)
    if key in goal:
        text += f" (target ≥ {format(goal[key], fmt)}: {'met' if value >= goal[key] else 'not met'})"
    return text


def targets(rows: dict) -> dict:
    """split → T2L SFT's ratio to the oracles and its lead in points over each baseline."""
    sft = rows["T2L SFT"]
    out = {}
    for split in (k for k in sft if k != "per_task"):
        acc = sft[split]["accuracy"]
        oracle = rows["oracle LoRA (per task)"][split]["accuracy"]
        out[split] = {"accuracy": acc, "ratio": acc / oracle if oracle else float("nan"),
                      **{key: 100 * (acc - rows[row][split]["accuracy"]) for key, row in BASELINES.items()}}
    return out


def task_function(name: str) -> Callable[[str], str] | None:
    """The function of a demo-suite or universe task; None for a task known only by its examples."""
    from generator.train.suite import TASK_BY_NAME
    from generator.train.universe import task_fn

    if name in TASK_BY_NAME:
        return TASK_BY_NAME[name].fn
    try:
        return task_fn(name)
    except KeyError:
        return None


def _answer(fn: Callable[[str], str], x: str) -> str | None:
    """fn's answer to x, or None where x is outside fn's domain (another task's input)."""
    try:
        return fn(x)
    except (IndexError, ValueError):
        return None


def run_eval(bundle_dir: str | Path, out_dir: str | Path | None = None, *, n_examples: int | None = None,
             sft: str | Path | None = None) -> dict:
    """Evaluate a bundle (with the T2L SFT checkpoint `sft` in place of its own, if given); write quality.json,
    quality.md and adapters.png into out_dir (default <bundle>/eval)."""
    bundle = Bundle(Path(bundle_dir))
    out = Path(out_dir) if out_dir else bundle.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(bundle, n_examples, sft=sft)
    rows = ev.evaluate()
    result = {"suite_seed": ev.suite.seed, "tasks": len(ev.suite.tasks), "held_out": ev.suite.held_out,
              "evaluated": ev.splits, "rows": rows, "targets": targets(rows), "held_out_imitation": ev.imitation(),
              "geometry": ev.geometry(), **({"sft": str(sft)} if sft is not None else {})}
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(result))
    ev.plot(out / "adapters.png")
    return result


__all__ = ["Bundle", "Evaluator", "Score", "delta_w_gram", "distances", "gram_pca", "markdown", "run_eval"]
