"""Task collections users write: JSONL, one task per line, turned into a `Suite` every trainer reads.

    {"name": "reverse",                                  unique; letters, digits, _ . - (a directory name)
     "descriptions": ["Reverse the word.", ...],         how a user would ask for the task (≥ 1)
     "examples": [{"input": "abc", "output": "cba"}],    what the adapted model must answer (≥ 2)
     "documents": ["Examples: ab -> ba; ..."],           optional: other texts that define the task
     "held_out": false}                                  optional: never shown to the hypernetwork

Each line is validated once, at load, and an error names the file, the line and the field. A suite is
then made from the collection with one seed: every task with three or more descriptions keeps a third of
them (at least one) for evaluation only, so evaluation reads descriptions no training step saw; a fifth of
each task's examples (at most `n_eval`) likewise. Tasks marked `held_out` are kept out of every
hypernetwork training step and evaluated as new tasks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from generator.errors import InputError
from generator.train.suite import Suite

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
KEYS = {"name", "descriptions", "examples", "documents", "held_out"}
MAX_TEXT = 4000  # characters of one description, document, input or output


@dataclass(frozen=True)
class TaskSpec:
    """One task of a collection, as its line gave it."""

    name: str
    descriptions: tuple[str, ...]
    examples: tuple[tuple[str, str], ...]
    documents: tuple[str, ...] = ()
    held_out: bool = False

    def to_json(self) -> str:
        d: dict = {"name": self.name, "descriptions": list(self.descriptions),
                   "examples": [{"input": x, "output": y} for x, y in self.examples]}
        if self.documents:
            d["documents"] = list(self.documents)
        if self.held_out:
            d["held_out"] = True
        return json.dumps(d, ensure_ascii=False)


def _texts(value, where: str, *, minimum: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InputError(f"{where} must be a list of strings")
    if len(value) < minimum:
        raise InputError(f"{where} needs at least {minimum} entr{'y' if minimum == 1 else 'ies'}, got {len(value)}")
    for i, t in enumerate(value):
        if not t.strip():
            raise InputError(f"{where}[{i}] is empty")
        if len(t) > MAX_TEXT:
            raise InputError(f"{where}[{i}] has {len(t)} characters; the limit is {MAX_TEXT}")
    return tuple(value)


def _example(value, where: str) -> tuple[str, str]:
    if not isinstance(value, dict) or set(value) != {"input", "output"}:
        raise InputError(f'{where} must be an object with exactly "input" and "output"')
    for key in ("input", "output"):
        v = value[key]
        if not isinstance(v, str) or not v.strip() or "\n" in v:
            raise InputError(f'{where}.{key} must be a non-empty string on one line')
        if len(v) > MAX_TEXT:
            raise InputError(f"{where}.{key} has {len(v)} characters; the limit is {MAX_TEXT}")
    return value["input"], value["output"]


def parse_task(line: str) -> TaskSpec:
    """One JSONL line → TaskSpec; InputError names the field (the caller adds file and line)."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise InputError("a task must be a JSON object")
    unknown = sorted(set(d) - KEYS)
    if unknown:
        raise InputError(f"unknown fields {unknown}; a task has {sorted(KEYS)}")
    missing = [k for k in ("name", "descriptions", "examples") if k not in d]
    if missing:
        raise InputError(f"missing fields {missing}")
    name = d["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f'"name" must be 1-64 letters, digits, "_", "." or "-" starting with a letter or digit, '
                         f"got {name!r}")
    if not isinstance(d["examples"], list) or len(d["examples"]) < 2:
        raise InputError('"examples" must be a list of at least 2 {"input", "output"} objects')
    examples = tuple(_example(e, f'"examples"[{i}]') for i, e in enumerate(d["examples"]))
    held_out = d.get("held_out", False)
    if not isinstance(held_out, bool):
        raise InputError(f'"held_out" must be true or false, got {held_out!r}')
    return TaskSpec(name, _texts(d["descriptions"], '"descriptions"', minimum=1), examples,
                    _texts(d.get("documents", []), '"documents"', minimum=0), held_out)


def load_tasks(path: str | Path) -> list[TaskSpec]:
    """Every task of a JSONL file (blank lines skipped); InputError names the file, line and field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"task file {p} not found") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise InputError(f"task file {p} cannot be read as UTF-8 text ({type(e).__name__})") from None
    tasks, lines = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            t = parse_task(line)
        except InputError as e:
            raise InputError(f"{p} line {n}: {e}") from None
        if t.name in lines:
            raise InputError(f'{p} line {n}: "name" {t.name!r} is already used on line {lines[t.name]}')
        lines[t.name] = n
        tasks.append(t)
    if not tasks:
        raise InputError(f"task file {p} holds no task (one JSON object per line)")
    if all(t.held_out for t in tasks):
        raise InputError(f"every task of {p} is held out: at least one must be left for training")
    return tasks


def save_tasks(tasks: Iterable[TaskSpec], path: str | Path) -> None:
    Path(path).write_text("".join(t.to_json() + "\n" for t in tasks), encoding="utf-8")


def suite_from_tasks(tasks: list[TaskSpec], seed: int = 0, n_eval: int = 50) -> Suite:
    """The suite of a collection: descriptions, documents and examples split into training and evaluation
    parts by `seed` (see the module docstring)."""
    rng = random.Random(seed)
    train_d, eval_d, train_doc, eval_doc, train_x, eval_x = {}, {}, {}, {}, {}, {}
    for t in tasks:
        train_d[t.name], eval_d[t.name] = _split(list(dict.fromkeys(t.descriptions)), rng, 3, 3)
        train_doc[t.name], eval_doc[t.name] = _split(list(dict.fromkeys(t.documents)), rng, 3, 3)
        train_x[t.name], eval_x[t.name] = _split(list(t.examples), rng, 5, 5, cap=n_eval)
    held = [t.name for t in tasks if t.held_out]
    return Suite(seed, [t.name for t in tasks], held, train_d, eval_d, train_doc, eval_doc, train_x, eval_x,
                 splits={"held_out": held} if held else {})


def _split(items: list, rng: random.Random, min_items: int, share: int, cap: int | None = None) -> tuple[list, list]:
    """(training part, evaluation part): 1/share of the items (at least one, at most cap) for evaluation
    when there are at least min_items; otherwise all for training."""
    if len(items) < min_items:
        return items, []
    order = list(range(len(items)))
    rng.shuffle(order)
    k = max(1, len(items) // share)
    if cap is not None:
        k = min(k, cap)
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]

