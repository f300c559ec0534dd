"""The demo task suite: small text tasks, many ways to describe each, examples generated from a seed.

Every task maps a short input (a made-up word, a number, or a list of digits) to an exact output. Each
task has six hand-written core phrasings; wrapped in five framings they give 30 descriptions. The split
keeps two core phrasings of every task out of training, so evaluation reads descriptions in words no
model has seen, and holds 8 whole tasks out of hypernetwork training (the base model still learns them
from instructions, as an instruction-tuned LLM knows many tasks nobody trained an adapter for).

Documents describe a task another way: a paragraph in prose, or a few worked examples written as text.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VOWELS = set("aeiou")
FRAMES = ("{p}", "Please {p}.", "Your task: {p}.", "Given the input, {p}.", "Instruction: {p}.")
N_EVAL_PHRASINGS = 2  # of the six core phrasings, held out for evaluation
HELD_OUT = ("last_char", "drop_last", "shift_prev", "rotate_right", "list_min", "sub_one", "count_vowels", "mirror")


def _shift(w: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)


def _digits(s: str) -> list[int]:
    return [int(t) for t in s.split()]


def _join(xs: list[int]) -> str:
    return " ".join(str(x) for x in xs)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "word" | "list" | "number": what its inputs look like
    fn: Callable[[str], str]
    phrasings: tuple[str, ...]  # six core phrasings, lower case, no final full stop
    about: str  # one sentence for the prose document

    def descriptions(self) -> list[str]:
        """All 30 descriptions: every framing of every phrasing (phrasing-major order)."""
        out = []
        for p in self.phrasings:
            for f in FRAMES:
                text = f.format(p=p)
                out.append(text[0].upper() + text[1:])
        return out


TASKS: tuple[Task, ...] = (
    Task("reverse", "word", lambda w: w[::-1], (
        "reverse the letters of the word", "write the word backwards", "spell the string from its last character to its first",
        "flip the order of the characters", "output the input string in reverse order", "read the word right to left"),
        "It writes the letters of the word in the opposite order."),
    Task("upper", "word", str.upper, (
        "convert the word to uppercase", "write the string in capital letters", "make every letter upper case",
        "capitalize all of the characters", "change all letters to caps", "shout the word in all capitals"),
        "It turns every lowercase letter into the matching capital letter."),
    Task("first_char", "word", lambda w: w[0], (
        "give the first letter of the word", "return only the initial character", "output the leading letter",
        "say which letter the word starts with", "keep just the first character", "print the opening character of the string"),
        "It answers with the single letter at the start of the word."),
    Task("last_char", "word", lambda w: w[-1], (
        "give the last letter of the word", "return only the final character", "output the trailing letter",
        "say which letter the word ends with", "keep just the last character", "print the closing character of the string"),
        "It answers with the single letter at the end of the word."),
    Task("length", "word", lambda w: str(len(w)), (
        "count how many letters the word has", "return the length of the string", "say how many characters there are",
        "output the number of letters", "measure the word's length in characters", "tell me the character count"),
        "It answers with the number of characters in the word."),
    Task("repeat", "word", lambda w: w + w, (
        "write the word twice", "repeat the whole string two times", "say the word and then say it again",
        "output the input followed by itself", "duplicate the entire word", "concatenate the string with a copy of itself"),
        "It writes the whole word two times in a row."),
    Task("double_chars", "word", lambda w: "".join(c + c for c in w), (
        "double every letter of the word", "write each character two times", "repeat each letter once more in place",
        "stutter every character", "output every letter twice in a row", "duplicate each individual character"),
        "It writes every letter twice before moving to the next one."),
    Task("drop_first", "word", lambda w: w[1:], (
        "remove the first letter of the word", "delete the initial character", "drop the leading letter",
        "output everything except the first character", "cut off the opening letter", "strip the first character away"),
        "It writes the word without its first letter."),
    Task("drop_last", "word", lambda w: w[:-1], (
        "remove the last letter of the word", "delete the final character", "drop the trailing letter",
        "output everything except the last character", "cut off the closing letter", "strip the last character away"),
        "It writes the word without its last letter."),
    Task("quote", "word", lambda w: f'"{w}"', (
        "put the word in double quotes", "wrap the string in quotation marks", "quote the input",
        "surround the word with double quote characters", "enclose the string in quotes",
        "place the word between two quote marks"),
        "It writes the word between two double quote characters."),
    Task("shift_next", "word", lambda w: _shift(w, 1), (
        "replace each letter with the next letter of the alphabet", "shift every character forward by one",
        "move each letter one step later in the alphabet", "apply a caesar shift of plus one",
        "advance every letter by one position", "change each letter to the one that follows it"),
        "It moves every letter one place forward in the alphabet, so z becomes a."),
    Task("shift_prev", "word", lambda w: _shift(w, -1), (
        "replace each letter with the previous letter of the alphabet", "shift every character back by one",
        "move each letter one step earlier in the alphabet", "apply a caesar shift of minus one",
        "move every letter back one position", "change each letter to the one that precedes it"),
        "It moves every letter one place back in the alphabet, so a becomes z."),
    Task("capitalize", "word", lambda w: w[0].upper() + w[1:], (
        "capitalize only the first letter", "make the initial character upper case", "start the word with a capital letter",
        "turn the word into title case", "uppercase the leading letter and keep the rest", "write the word like a proper name"),
        "It makes the first letter a capital and leaves the others lowercase."),
    Task("remove_vowels", "word", lambda w: "".join(c for c in w if c not in VOWELS) or "-", (
        "remove all the vowels from the word", "delete every a, e, i, o and u", "keep only the consonants",
        "strip out the vowels", "write the string without its vowels", "drop each vowel character"),
        "It deletes the vowels and keeps the consonants in order; a word of only vowels gives a dash."),
    Task("count_vowels", "word", lambda w: str(sum(c in VOWELS for c in w)), (
        "count the vowels in the word", "say how many vowels the string has", "return the number of a, e, i, o and u letters",
        "tally the vowel characters", "output how many vowels appear", "tell me the vowel count"),
        "It answers with how many of the letters are vowels."),
    Task("first_three", "word", lambda w: w[:3], (
        "give the first three letters", "return the opening three characters", "keep only the first three letters",
        "output the three-letter prefix", "take the beginning three characters",
        "print the start of the word, three letters long"),
        "It answers with the first three letters of the word."),
    Task("last_three", "word", lambda w: w[-3:], (
        "give the last three letters", "return the closing three characters", "keep only the final three letters",
        "output the three-letter suffix", "take the ending three characters", "print the end of the word, three letters long"),
        "It answers with the last three letters of the word."),
    Task("swap_ends", "word", lambda w: w[-1] + w[1:-1] + w[0], (
        "swap the first and last letters", "exchange the initial and final characters", "trade the letters at both ends",
        "switch the opening letter with the closing one", "put the last letter first and the first letter last",
        "interchange the two end characters"),
        "It exchanges the letter at the start with the letter at the end."),
    Task("mirror", "word", lambda w: w + w[::-1], (
        "write the word followed by its reverse", "make a palindrome by appending the reversed word",
        "mirror the string", "output the word and then the word backwards", "reflect the word onto itself",
        "append the backwards spelling to the word"),
        "It writes the word and then the same word backwards."),
    Task("rotate_left", "word", lambda w: w[1:] + w[0], (
        "move the first letter to the end", "rotate the word left by one",
        "shift the characters one place to the left, wrapping around",
        "take the leading letter and append it", "cycle the string leftwards by one character",
        "send the initial character to the back"),
        "It moves the first letter to the end of the word."),
    Task("rotate_right", "word", lambda w: w[-1] + w[:-1], (
        "move the last letter to the front", "rotate the word right by one",
        "shift the characters one place to the right, wrapping around",
        "take the final letter and prepend it", "cycle the string rightwards by one character",
        "bring the last character to the start"),
        "It moves the last letter to the start of the word."),
    Task("dashes", "word", lambda w: "-".join(w), (
        "put a dash between every two letters", "separate the characters with hyphens", "spell the word out with dashes",
        "insert a hyphen between each pair of letters", "join the letters using minus signs", "hyphenate every character"),
        "It writes the letters with a dash between each pair of neighbours."),
    Task("brackets", "word", lambda w: f"[{w}]", (
        "wrap the word in square brackets", "put brackets around the string", "enclose the input in [ and ]",
        "surround the word with square brackets", "place the string between brackets", "bracket the whole word"),
        "It writes the word between an opening and a closing square bracket."),
    Task("list_last", "list", lambda s: s.split()[-1], (
        "give the last number of the list", "return the final element", "output the closing value of the sequence",
        "say which number comes last", "keep only the last item", "print the tail end of the list"),
        "It answers with the number at the end of the list."),
    Task("list_max", "list", lambda s: str(max(_digits(s))), (
        "find the largest number in the list", "return the maximum value", "pick the biggest digit",
        "say which number is highest", "output the greatest element", "give the top value of the sequence"),
        "It answers with the largest number of the list."),
    Task("list_min", "list", lambda s: str(min(_digits(s))), (
        "find the smallest number in the list", "return the minimum value", "pick the lowest digit",
        "say which number is least", "output the smallest element", "give the bottom value of the sequence"),
        "It answers with the smallest number of the list."),
    Task("list_drop_first", "list", lambda s: " ".join(s.split()[1:]), (
        "remove the first number from the list", "drop the leading element", "output the list without its initial value",
        "delete the first item of the sequence", "skip the head of the list and keep the rest", "cut the opening number off"),
        "It writes the list without its first number."),
    Task("list_reverse", "list", lambda s: _join(_digits(s)[::-1]), (
        "reverse the order of the list", "write the numbers backwards", "output the sequence from last to first",
        "flip the list around", "list the elements in the opposite order", "read the values right to left"),
        "It writes the numbers of the list in the opposite order."),
    Task("list_count", "list", lambda s: str(len(_digits(s))), (
        "count how many numbers are in the list", "return the length of the list", "say how many elements there are",
        "output the number of items", "tell me how many values the sequence holds", "give the size of the list"),
        "It answers with how many numbers the list holds."),
    Task("list_first", "list", lambda s: s.split()[0], (
        "give the first number of the list", "return the leading element", "output the initial value of the sequence",
        "say which number comes first", "keep only the first item", "print the head of the list"),
        "It answers with the number at the start of the list."),
    Task("add_one", "number", lambda s: str(int(s) + 1), (
        "add one to the number", "increment the value by one", "return the next integer",
        "say the number that comes after it", "increase the number by 1", "count up by one"),
        "It answers with the number plus one."),
    Task("sub_one", "number", lambda s: str(int(s) - 1), (
        "subtract one from the number", "decrement the value by one", "return the previous integer",
        "say the number that comes before it", "decrease the number by 1", "count down by one"),
        "It answers with the number minus one."),
    Task("times_ten", "number", lambda s: s + "0", (
        "multiply the number by ten", "append a zero to the number", "return ten times the value",
        "scale the integer up by a factor of 10", "add a trailing zero", "compute the input times ten"),
        "It answers with ten times the number, which is the number with a zero appended."),
    Task("parity", "number", lambda s: "even" if int(s) % 2 == 0 else "odd", (
        "say whether the number is even or odd", "classify the value as odd or even", "tell me the parity of the integer",
        "answer even if divisible by two, otherwise odd", "decide if the number is odd or even",
        "report whether the number is even"),
        "It answers with the word even or the word odd."),
)
TASK_BY_NAME = {t.name: t for t in TASKS}


def sample_input(kind: str, rng: random.Random) -> str:
    if kind == "word":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    if kind == "list":
        return _join([rng.randint(0, 9) for _ in range(rng.randint(3, 5))])
    return str(rng.randint(1, 99))


def examples(task: Task, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n input/output pairs of `task`; inputs drawn from rng (duplicates possible for the small spaces)."""
    out = []
    for _ in range(n):
        x = sample_input(task.kind, rng)
        out.append((x, task.fn(x)))
    return out


def documents(task: Task, rng: random.Random, n: int) -> list[str]:
    """n documents of `task`, alternating a prose paragraph and a few worked examples written as text."""
    return write_documents(task.kind, task.about, lambda: examples(task, 3, rng), n)


def write_documents(kind: str, about: str, shots: Callable[[], list[tuple[str, str]]], n: int) -> list[str]:
    """n documents of a task whose inputs are of `kind`: even ones a prose paragraph (`about` and one worked
    example), odd ones worked examples written as text; `shots()` draws three (input, output) pairs."""
    noun = {"word": "a short word", "list": "a list of digits", "number": "a whole number"}[kind]
    out = []
    for i in range(n):
        pairs = shots()
        if i % 2 == 0:
            x, y = pairs[0]
            out.append(f"This task takes {noun} as input. {about} For example, the input {x} gives {y}.")
        else:
            out.append("Examples of the task: " + "; ".join(f"{x} -> {y}" for x, y in pairs) + ".")
    return out


@dataclass
class Suite:
    """The built suite: what every model of the demo trains and is evaluated on; JSON-serialisable."""

    seed: int
    tasks: list[str]
    held_out: list[str]
    train_descriptions: dict[str, list[str]]
    eval_descriptions: dict[str, list[str]]
    train_documents: dict[str, list[str]]
    eval_documents: dict[str, list[str]]
    train_examples: dict[str, list[tuple[str, str]]]
    eval_examples: dict[str, list[tuple[str, str]]]
    unrelated: list[str] = field(default_factory=list)  # control descriptions that name no task
    # held-out tasks by split (split name → tasks; together exactly `held_out`); empty: one split "held_out"
    splits: dict[str, list[str]] = field(default_factory=dict)
    # the tasks evaluation scores, by split ("seen" and each held-out split); a split not named: all of it
    eval_tasks: dict[str, list[str]] = field(default_factory=dict)
    # per task, what it is made of (a universe's family and parameters); informative only
    meta: dict[str, dict] = field(default_factory=dict)
    # per task, the instructions the base model is pretrained with (a universe's task program in words, e.g.
    # "reverse then wrap brackets"); empty: its training descriptions. Never a hypernetwork's input.
    instructions: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.splits and sorted(t for ts in self.splits.values() for t in ts) != sorted(self.held_out):
            raise ValueError("the held-out splits must together hold exactly the held-out tasks, each once")

    @property
    def seen(self) -> list[str]:
        held = set(self.held_out)
        return [t for t in self.tasks if t not in held]

    @property
    def held_out_splits(self) -> dict[str, list[str]]:
        return self.splits or ({"held_out": list(self.held_out)} if self.held_out else {})

    def base_instructions(self, task: str) -> list[str]:
        """What the base model reads in its prompt for `task`, in pretraining and in the "instruction in
        prompt" evaluation rows."""
        return self.instructions.get(task) or self.train_descriptions[task]

    def evaluated(self) -> dict[str, list[str]]:
        """split → the tasks evaluation scores: "seen" first, then each held-out split."""
        every = {"seen": self.seen, **self.held_out_splits}
        return {s: self.eval_tasks.get(s) or tasks for s, tasks in every.items()}

    def with_seen(self, keep: list[str]) -> Suite:
        """This suite with only the seen tasks `keep` (held-out ones unchanged): what a hypernetwork trained
        on fewer tasks may see."""
        unknown = sorted(set(keep) - set(self.seen))
        if unknown:
            raise ValueError(f"not seen tasks of this suite: {unknown[:5]}")
        wanted = set(keep) | set(self.held_out)
        tasks = [t for t in self.tasks if t in wanted]

        def only(d: dict) -> dict:
            return {t: v for t, v in d.items() if t in wanted}

        eval_tasks = {s: [t for t in ts if t in wanted] for s, ts in self.eval_tasks.items()}
        return Suite(self.seed, tasks, list(self.held_out), only(self.train_descriptions), only(self.eval_descriptions),
                     only(self.train_documents), only(self.eval_documents), only(self.train_examples),
                     only(self.eval_examples), list(self.unrelated), dict(self.splits),
                     {s: ts for s, ts in eval_tasks.items() if ts}, only(self.meta), only(self.instructions))

    def training_texts(self) -> set[str]:
        """Every text a hypernetwork may be conditioned on in training: the seen tasks' training
        descriptions and documents. Nothing else (no evaluation phrasing, no held-out task)."""
        return {t for task in self.seen for group in (self.train_descriptions, self.train_documents)
                for t in group.get(task, ())}

    def save(self, path: str | Path) -> None:
        # written only when set: a plain suite's file is unchanged
        optional = ("splits", "eval_tasks", "meta", "instructions")
        d = {k: v for k, v in self.__dict__.items() if k not in optional or v}
        Path(path).write_text(json.dumps(d, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Suite:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: dict) -> Suite:
        """A suite from its parsed JSON (examples come back as tuples)."""
        d = dict(d)
        for key in ("train_examples", "eval_examples"):
            d[key] = {t: [tuple(p) for p in v] for t, v in d[key].items()}
        return cls(**d)


UNRELATED = (
    "The weather in Lisbon is mild in the spring.", "A recipe for bread needs flour, water, salt and yeast.",
    "Translate the poem into French.", "The train leaves the station at nine o'clock.",
    "Summarise the history of the Roman empire.", "Cats sleep for most of the day.",
)


def build_suite(seed: int = 0, n_train: int = 400, n_eval: int = 50, n_docs: int = 12) -> Suite:
    """The whole suite from one seed. Eval examples are drawn apart from train examples where the input
    space allows (numbers 1..99 are few: they overlap, as any evaluation of a total function would)."""
    rng = random.Random(seed)
    train_d, eval_d, train_doc, eval_doc, train_x, eval_x = {}, {}, {}, {}, {}, {}
    n_frames = len(FRAMES)
    for t in TASKS:
        descs = t.descriptions()
        order = list(range(len(t.phrasings)))
        rng.shuffle(order)
        held = set(order[:N_EVAL_PHRASINGS])
        train_d[t.name] = [d for i, d in enumerate(descs) if i // n_frames not in held]
        eval_d[t.name] = [d for i, d in enumerate(descs) if i // n_frames in held]
        train_doc[t.name] = documents(t, rng, n_docs)
        eval_doc[t.name] = documents(t, rng, max(2, n_docs // 3))
        train_x[t.name] = examples(t, n_train, rng)
        seen_inputs = {x for x, _ in train_x[t.name]}
        ev: list[tuple[str, str]] = []
        for _ in range(50 * n_eval):  # prefer inputs never trained on
            if len(ev) == n_eval:
                break
            x = sample_input(t.kind, rng)
            if x not in seen_inputs or t.kind == "number":
                ev.append((x, t.fn(x)))
        eval_x[t.name] = ev
    return Suite(seed, [t.name for t in TASKS], list(HELD_OUT), train_d, eval_d, train_doc, eval_doc, train_x, eval_x,
                 list(UNRELATED))
