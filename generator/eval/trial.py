"""Trying one adapter on a bundle's base model (`loragen try`): greedy answers of the base model without and
with the adapter, no instruction in the prompt, so only the adapter says what to do.

The demo base model reads the spaced layout (generator/train/prompting.py): a prompt is
`<s>In: j c d g\\nOut: `, data characters one token each, and the answer ends at the newline.
The adapter is a PEFT directory or the single safetensors file `POST /generate` returns (its metadata
carries adapter_config.json).
"""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_safetensors_metadata
from generator.errors import InputError

__all__ = ["Trial", "run_trial"]

MAX_INPUT = 64  # characters: the demo base was trained on words and lists of a few characters


@dataclass(frozen=True)
class Trial:
    """One input's answers; `expected` is None when the caller gave bare inputs."""

    input: str
    expected: str | None
    base: str
    adapted: str

    @property
    def correct(self) -> bool | None:
        """Whether the adapted answer is the expected one (None without an expected answer)."""
        return self._matches(self.adapted)

    @property
    def base_correct(self) -> bool | None:
        return self._matches(self.base)

    def _matches(self, answer: str) -> bool | None:
        from generator.train.basemodel import canonical

        return None if self.expected is None else canonical(answer) == canonical(self.expected)


def run_trial(bundle: str | Path, adapter: str | Path, inputs: Sequence[str] = (), task: str | None = None,
              n: int = 8) -> list[Trial]:
    """Answers of `bundle`'s base model to `inputs` (or to the first `n` evaluation examples of the suite's
    `task`), without and with `adapter`."""
    from peft import PeftModel

    from generator.train.basemodel import CHARS, greedy, load_base, prompt
    from generator.train.suite import Suite

    root = Path(bundle)
    if not (root / "base").is_dir() or not (root / "suite.json").is_file():
        raise InputError(f"bundle {root}: no base/ and suite.json there; give --bundle a directory written by "
                         "`loragen train demo`")
    if task is not None:
        examples = Suite.load(root / "suite.json").eval_examples
        if task not in examples:
            known = sorted(examples)
            raise InputError(f"task {task!r} is not in {root / 'suite.json'}; it has {len(known)} tasks, e.g. "
                             f"{', '.join(known[:6])}")
        pairs: list[tuple[str, str | None]] = [(x, y) for x, y in examples[task][:n]]
    else:
        pairs = [(_checked(x, CHARS), None) for x in inputs]
    if not pairs:
        raise InputError("nothing to try: give --input X (repeatable) or --examples TASK")
    base, codec = load_base(root / "base")
    prompts = [prompt(x) for x, _ in pairs]
    before = greedy(base, codec, prompts, max_new=32)
    with tempfile.TemporaryDirectory(prefix="loragen-try-") as tmp:
        directory = _peft_directory(Path(adapter), Path(tmp))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, raised inside PEFT
                model = PeftModel.from_pretrained(base, str(directory)).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(f"adapter {adapter} does not fit the base model {root / 'base'}: "
                             f"{' '.join(str(e).split())[:300]}") from None
        after = greedy(model, codec, prompts, max_new=32)
    return [Trial(x, y, b, a) for (x, y), b, a in zip(pairs, before, after, strict=True)]


def _checked(x: str, chars: str) -> str:
    bad = sorted({c for c in x if c not in chars + " " or c == "\n"})  # spaces are not tokens: '3 1 2' is 312
    if not x or len(x) > MAX_INPUT or bad:
        why = ("it is empty" if not x else f"it is longer than {MAX_INPUT} characters" if len(x) > MAX_INPUT
               else f"the base model has no token for {''.join(bad)!r}")
        raise InputError(f"input {x!r}: {why}; the demo base model reads letters, digits and punctuation, "
                         "e.g. --input jcdg or --input '3 1 2'")
    return x


def _peft_directory(path: Path, tmp: Path) -> Path:
    """`path` if it is a PEFT directory; for a safetensors file, a directory in `tmp` holding it and the
    adapter_config.json its metadata carries."""
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise InputError(f"adapter {path}: a PEFT directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        return path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"adapter {path} not found") from None
    except OSError as e:
        raise InputError(f"cannot read adapter {path}: {e.strerror}") from None
    try:
        config = read_safetensors_metadata(raw)["adapter_config"]
        json.loads(config)
    except (struct.error, KeyError, ValueError, TypeError, AttributeError):
        raise InputError(f"adapter {path} is not a safetensors file from loragen (no adapter_config in its "
                         "metadata); give a PEFT directory or the file POST /generate returns") from None
    (tmp / ADAPTER_WEIGHTS).write_bytes(raw)
    (tmp / ADAPTER_CONFIG).write_text(config, encoding="utf-8")
    return tmp
