"""The task universe: hundreds of tasks from parametric families of string, list and number operations
and compositions of two, each with many descriptions, and held-out splits that test zero-shot generation.

A *family* is one operation with a parameter ("shift each letter k places forward", k = 1..5; "replace
every x with y"); a *single task* is a family with one parameter value; a *composition* is two single
tasks applied in order ("reverse the word, then wrap it in square brackets"). Tasks are kept only if they
compute a function no earlier task computes (compared on fixed probe inputs), so every task is distinct.

Descriptions. Every family has eight hand-written phrasings with parameter slots; the seed sends two of
them to evaluation only, so evaluation reads words no training description uses. A parameter is written in
several forms (three / 3; "a" / a; a dash / "-"), and each phrasing in several framings ("Please ...",
"Your task: ..."). Compositions join two phrasings with a connector; connectors, too, are split between
training and evaluation.

Held-out splits, fixed by the seed, never shown to a hypernetwork in training (the base model learns every
task, held-out ones included, told by the task's *program* in its prompt: its steps' names spelled out,
"shift forward 3 then append z", so that it can do any task when told; free-form descriptions are the
hypernetwork's input only):
    new_values        new parameter values of seen families ("replace a with q" where a→q was never
                      trained but other pairs with a and with q were; "shift 3" where 1, 2, 4, 5 were)
    new_compositions  compositions of seen operations whose pair of families was never trained together
    new_families      every task of a few whole families, and every composition that uses one
Compositions that contain a new-value task are left out of the universe: they would mix two splits.

Documents describe a task in other words: a prose paragraph, or a few worked examples written as text.
"""

from __future__ import annotations

import functools
import itertools
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from generator.errors import InputError
from generator.train.suite import FRAMES, UNRELATED, Suite, write_documents

SPLITS = ("new_values", "new_compositions", "new_families")
CONNECTORS_TRAIN = ("{a}, then {b}", "first {a}, and after that {b}", "{a}; next, {b}", "{a} and then {b}")
CONNECTORS_EVAL = ("start by doing this: {a}; finish with this: {b}", "{a}, followed by this step: {b}")
N_EVAL_PHRASINGS = 2  # of each family's eight phrasings
MAX_OUT = 18  # characters of any output (decoding budget of a tiny model; compositions beyond it are left out)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINALS = ("zeroth", "first", "second", "third", "fourth", "fifth", "sixth")
SUFFIX = {1: "st", 2: "nd", 3: "rd"}


# --- parameter forms: how a value may be written in a description -------------------------------------
def _count(k: int) -> list[dict]:
    plural = "" if k == 1 else "s"
    return [{"k": NUMBER_WORDS[k], "s": plural}, {"k": str(k), "s": plural}]


def _ordinal(k: int) -> list[dict]:
    plural = "" if k == 1 else "s"
    return [{"nth": ORDINALS[k], "k": NUMBER_WORDS[k], "s": plural},
            {"nth": f"{k}{SUFFIX.get(k, 'th')}", "k": str(k), "s": plural}]


def _letter(x: str) -> list[dict]:
    return [{"x": x}, {"x": f'"{x}"'}]


def _letters(x: str, y: str) -> list[dict]:
    return [{"x": x, "y": y}, {"x": f'"{x}"', "y": f'"{y}"'}]


def _digit(v: int) -> list[dict]:
    return [{"v": NUMBER_WORDS[v]}, {"v": str(v)}]


SEPARATORS = {"-": ("dash", "a dash"), ".": ("dot", "a full stop"), "+": ("plus", "a plus sign"),
              "*": ("star", "an asterisk"), "_": ("underscore", "an underscore"), ",": ("comma", "a comma"),
              ":": ("colon", "a colon"), "/": ("slash", "a slash"), "=": ("equals", "an equals sign"),
              "#": ("hash", "a hash sign")}
WRAPPERS = {"()": ("parens", "round brackets"), "[]": ("square", "square brackets"), "<>": ("angle", "angle brackets"),
            '""': ("dquotes", "double quotes"), "''": ("squotes", "single quotes"), "**": ("stars", "asterisks"),
            "__": ("underscores", "underscores"), "##": ("hashes", "hash signs"), "==": ("equals", "equals signs")}
SORT_ORDERS = {"asc": ("ascending", "from smallest to largest"), "desc": ("descending", "from largest to smallest")}


def _sep(s: str) -> list[dict]:
    return [{"sep": f'"{s}"'}, {"sep": SEPARATORS[s][1]}]


def _wrap(p: str) -> list[dict]:
    return [{"p": WRAPPERS[p][1]}, {"p": f"{p[0]} and {p[1]}"}]


def _order(o: str) -> list[dict]:
    return [{"o": SORT_ORDERS[o][0]}, {"o": SORT_ORDERS[o][1]}]


def _none(*_args) -> list[dict]:
    return [{}]


# --- operations ---------------------------------------------------------------------------------------
def _shift(w: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)


def _digits(s: str) -> list[int]:
    return [int(t) for t in s.split()]


def _join(xs: Sequence[int]) -> str:
    return " ".join(str(x) for x in xs) if xs else "-"


def _nonempty(s: str) -> str:
    return s if s else "-"


@dataclass(frozen=True)
class Family:
    """One parametric operation. `op(*value)` is the function str → str of one parameter value; `forms`
    renders a value into the slot dicts its phrasings are formatted with; `about` is a prose template.
    `needs` (a letter parameter's position) makes inputs contain that letter, so the task is not a no-op."""

    name: str
    kind: str  # input: "word" | "list" | "number"
    out: str  # output: "word" | "list" | "number" | "text"
    values: tuple[tuple, ...]
    op: Callable[..., Callable[[str], str]]
    forms: Callable[..., list[dict]]
    phrasings: tuple[str, ...]  # eight, lower case, no final full stop
    about: str
    needs: int | None = None
    first: bool = True  # may be the first step of a composition
    second: bool = True  # may be the second step of a composition

    def slug(self, value: tuple) -> str:
        parts = []
        for v in value:
            parts.append(SEPARATORS[v][0] if v in SEPARATORS else WRAPPERS[v][0] if v in WRAPPERS else str(v))
        return "_".join([self.name, *parts])


LETTERS_FROM = tuple("aeiorstn")
LETTERS_TO = tuple("bdgkmpqz")
WORD_FAMILIES: tuple[Family, ...] = (
    Family("shift_forward", "word", "word", tuple((k,) for k in range(1, 6)), lambda k: lambda w: _shift(w, k), _count, (
        "shift each letter {k} place{s} forward in the alphabet", "move every letter {k} step{s} later in the alphabet",
        "replace each letter with the letter {k} position{s} after it", "apply a caesar shift of plus {k}",
        "advance every character by {k} letter{s}", "encode the word by moving each letter {k} ahead",
        "push each letter {k} spot{s} down the alphabet, z wrapping to a",
        "rotate every letter forward through the alphabet by {k}"),
        "It moves every letter {k} place{s} forward in the alphabet, wrapping from z to a."),
    Family("shift_back", "word", "word", tuple((k,) for k in range(1, 6)), lambda k: lambda w: _shift(w, -k), _count, (
        "shift each letter {k} place{s} back in the alphabet", "move every letter {k} step{s} earlier in the alphabet",
        "replace each letter with the letter {k} position{s} before it", "apply a caesar shift of minus {k}",
        "move every character back by {k} letter{s}", "decode the word by moving each letter {k} behind",
        "pull each letter {k} spot{s} up the alphabet, a wrapping to z",
        "rotate every letter backward through the alphabet by {k}"),
        "It moves every letter {k} place{s} back in the alphabet, wrapping from a to z."),
    Family("rotate_left", "word", "word", tuple((k,) for k in range(1, 4)), lambda k: lambda w: w[k:] + w[:k], _count, (
        "move the first {k} letter{s} to the end", "rotate the word left by {k}",
        "shift the characters {k} place{s} to the left, wrapping around", "cycle the string leftwards by {k}",
        "send the first {k} character{s} to the back", "take the leading {k} letter{s} and append them",
        "left-rotate the letters {k} time{s}", "carry {k} character{s} from the front around to the end"),
        "It moves the first {k} letter{s} of the word to its end."),
    Family("rotate_right", "word", "word", tuple((k,) for k in range(1, 4)), lambda k: lambda w: w[-k:] + w[:-k], _count, (
        "move the last {k} letter{s} to the front", "rotate the word right by {k}",
        "shift the characters {k} place{s} to the right, wrapping around", "cycle the string rightwards by {k}",
        "bring the last {k} character{s} to the start", "take the final {k} letter{s} and prepend them",
        "right-rotate the letters {k} time{s}", "carry {k} character{s} from the end around to the front"),
        "It moves the last {k} letter{s} of the word to its start."),
    Family("take_first", "word", "word", tuple((k,) for k in range(1, 5)), lambda k: lambda w: w[:k], _count, (
        "keep only the first {k} letter{s}", "return the opening {k} character{s}", "give the first {k} letter{s} of the word",
        "truncate the word to its first {k} character{s}", "take the beginning {k} character{s}",
        "output the {k} leading letter{s} and nothing else", "cut the word down to its first {k} letter{s}",
        "write just the start of the word, {k} letter{s} long"),
        "It answers with the first {k} letter{s} of the word."),
    Family("take_last", "word", "word", tuple((k,) for k in range(1, 5)), lambda k: lambda w: w[-k:], _count, (
        "keep only the last {k} letter{s}", "return the closing {k} character{s}", "give the last {k} letter{s} of the word",
        "truncate the word to its final {k} character{s}", "take the ending {k} character{s}",
        "output the {k} trailing letter{s} and nothing else", "cut the word down to its last {k} letter{s}",
        "write just the end of the word, {k} letter{s} long"),
        "It answers with the last {k} letter{s} of the word."),
    Family("drop_first", "word", "word", tuple((k,) for k in range(1, 4)), lambda k: lambda w: _nonempty(w[k:]), _count, (
        "remove the first {k} letter{s}", "delete the initial {k} character{s}", "drop the leading {k} letter{s}",
        "output everything except the first {k} character{s}", "cut off the opening {k} letter{s}",
        "strip {k} character{s} from the start", "skip the first {k} letter{s} and write the rest",
        "chop {k} letter{s} off the front of the word"),
        "It writes the word without its first {k} letter{s}."),
    Family("drop_last", "word", "word", tuple((k,) for k in range(1, 4)), lambda k: lambda w: _nonempty(w[:-k]), _count, (
        "remove the last {k} letter{s}", "delete the final {k} character{s}", "drop the trailing {k} letter{s}",
        "output everything except the last {k} character{s}", "cut off the closing {k} letter{s}",
        "strip {k} character{s} from the end", "write the word but leave out its last {k} letter{s}",
        "chop {k} letter{s} off the back of the word"),
        "It writes the word without its last {k} letter{s}."),
    Family("replace", "word", "word", tuple((x, y) for x in LETTERS_FROM for y in LETTERS_TO),
           lambda x, y: lambda w: w.replace(x, y), _letters, (
        "replace every {x} with {y}", "change each letter {x} into {y}", "substitute {y} for every {x}",
        "swap each occurrence of {x} for {y}", "write {y} wherever the word has {x}", "turn every {x} into a {y}",
        "put {y} in place of each {x}", "rewrite the word with all {x} letters becoming {y}"),
        "It writes the word with every letter {x} changed into {y}.", needs=0, second=False),
    Family("remove", "word", "word", tuple((x,) for x in "abdeilnorstu"),
           lambda x: lambda w: _nonempty(w.replace(x, "")), _letter, (
        "remove every {x} from the word", "delete all occurrences of {x}", "drop each letter {x}",
        "write the word without any {x}", "strip out the letter {x}", "leave out every {x}",
        "erase each {x} and keep the other letters", "filter the letter {x} out of the word"),
        "It writes the word with every letter {x} left out.", needs=0, second=False),
    Family("join", "word", "word", tuple((s,) for s in SEPARATORS), lambda s: lambda w: s.join(w), _sep, (
        "put {sep} between every two letters", "join the characters with {sep}", "separate the letters using {sep}",
        "insert {sep} between each pair of neighbouring letters", "spell the word out with {sep} in between",
        "interleave the characters with {sep}", "write the letters apart, split by {sep}",
        "link every letter to the next one with {sep}"),
        "It writes the letters with {sep} between each pair of neighbours."),
    Family("wrap", "word", "word", tuple((p,) for p in WRAPPERS), lambda p: lambda w: p[0] + w + p[1], _wrap, (
        "wrap the word in {p}", "put {p} around the string", "enclose the word in {p}",
        "surround the input with {p}", "place the word between {p}", "bracket the word with {p}",
        "write the word inside {p}", "frame the whole word with {p}"),
        "It writes the word between {p}."),
    Family("repeat", "word", "word", tuple((k,) for k in range(2, 5)), lambda k: lambda w: w * k, _count, (
        "write the word {k} times", "repeat the whole string {k} times", "output the input {k} times in a row",
        "concatenate {k} copies of the word", "say the word {k} times without spaces", "duplicate the word into {k} copies",
        "chain {k} copies of the string together", "write the entire word over and over, {k} times"),
        "It writes the whole word {k} times in a row."),
    Family("stutter", "word", "word", tuple((k,) for k in range(2, 4)), lambda k: lambda w: "".join(c * k for c in w), _count, (
        "write each letter {k} times", "repeat every character {k} times in place", "stutter every letter {k} times",
        "output every letter {k} times in a row", "multiply each individual character by {k}",
        "make {k} copies of every letter where it stands", "say each character {k} times before moving on",
        "expand every letter into a run of {k}"),
        "It writes every letter {k} times before moving to the next one."),
    Family("append", "word", "word", tuple((c,) for c in string.ascii_lowercase), lambda c: lambda w: w + c, _letter, (
        "add the letter {x} at the end", "append {x} to the word", "put {x} after the last letter",
        "end the word with an extra {x}", "write the word and then {x}", "attach {x} to the end",
        "tack a trailing {x} onto the word", "finish the word with one more letter, {x}"),
        "It writes the word followed by the letter {x}."),
    Family("prepend", "word", "word", tuple((c,) for c in string.ascii_lowercase), lambda c: lambda w: c + w, _letter, (
        "add the letter {x} at the start", "prepend {x} to the word", "put {x} before the first letter",
        "begin the word with an extra {x}", "write {x} and then the word", "attach {x} to the front",
        "tack a leading {x} onto the word", "start the word with one more letter, {x}"),
        "It writes the letter {x} followed by the word."),
    Family("count_letter", "word", "number", tuple((x,) for x in "aeiorstn"), lambda x: lambda w: str(w.count(x)), _letter, (
        "count how many times {x} appears", "say how many {x} letters the word has", "return the number of {x}s",
        "tally the occurrences of {x}", "output how often the letter {x} occurs", "tell me the count of {x}",
        "give the frequency of {x} in the word", "report the number of times the word uses {x}"),
        "It answers with how many times the letter {x} appears in the word.", needs=0, first=False),
    Family("char_at", "word", "word", tuple((k,) for k in range(1, 5)), lambda k: lambda w: w[k - 1], _ordinal, (
        "give the {nth} letter of the word", "return the character at position {k}", "output letter number {k}",
        "say which letter is {nth}", "keep only the {nth} character", "print the {nth} letter and nothing else",
        "pick out the letter in place {k}", "answer with character {k} of the word"),
        "It answers with the {nth} letter of the word.", first=False),
    Family("reverse", "word", "word", ((),), lambda: lambda w: w[::-1], _none, (
        "reverse the letters of the word", "write the word backwards", "spell the string from its last character to its first",
        "flip the order of the characters", "output the input string in reverse order", "read the word right to left",
        "mirror the letter order", "turn the word around"),
        "It writes the letters of the word in the opposite order."),
    Family("upper", "word", "word", ((),), lambda: str.upper, _none, (
        "convert the word to uppercase", "write the string in capital letters", "make every letter upper case",
        "capitalize all of the characters", "change all letters to caps", "shout the word in all capitals",
        "set every character in upper case", "print the word in block capitals"),
        "It turns every lowercase letter into the matching capital letter."),
    Family("capitalize", "word", "word", ((),), lambda: lambda w: w[0].upper() + w[1:], _none, (
        "capitalize only the first letter", "make the initial character upper case", "start the word with a capital letter",
        "turn the word into title case", "uppercase the leading letter and keep the rest", "write the word like a proper name",
        "give the word a capital initial", "raise just the first letter to upper case"),
        "It makes the first letter a capital and leaves the others as they are."),
    Family("sort_letters", "word", "word", ((),), lambda: lambda w: "".join(sorted(w)), _none, (
        "sort the letters alphabetically", "arrange the characters in alphabetical order", "put the letters in a to z order",
        "order the word's letters from a to z", "rearrange the letters so they are sorted", "alphabetize the characters",
        "list the letters of the word in dictionary order", "write the letters sorted from first to last in the alphabet"),
        "It writes the letters of the word sorted in alphabetical order."),
    Family("swap_ends", "word", "word", ((),), lambda: lambda w: w[-1] + w[1:-1] + w[0], _none, (
        "swap the first and last letters", "exchange the initial and final characters", "trade the letters at both ends",
        "switch the opening letter with the closing one", "put the last letter first and the first letter last",
        "interchange the two end characters", "flip the outermost letters", "exchange the word's two end letters"),
        "It exchanges the letter at the start with the letter at the end."),
)

LIST_FAMILIES: tuple[Family, ...] = (
    Family("list_nth", "list", "number", tuple((k,) for k in range(1, 6)), lambda k: lambda s: s.split()[k - 1], _ordinal, (
        "give the {nth} number of the list", "return element number {k}", "output the item at position {k}",
        "say which number is {nth} in the list", "pick the {nth} value of the sequence", "keep only the {nth} element",
        "answer with entry {k} of the list", "print the {nth} item and nothing else"),
        "It answers with the {nth} number of the list.", first=False),
    Family("list_nth_last", "list", "number", tuple((k,) for k in range(1, 4)), lambda k: lambda s: s.split()[-k], _ordinal, (
        "give the {nth} number from the end of the list", "return the {nth} element counting from the back",
        "output the item {k} place{s} from the end", "say which number is {nth} to last",
        "pick the {nth} value counted from the right", "keep only the {nth} element from the end",
        "answer with entry {k} counting backwards", "print the {nth}-last item and nothing else"),
        "It answers with the {nth} number counted from the end of the list.", first=False),
    Family("list_sort", "list", "list", (("asc",), ("desc",)),
           lambda o: lambda s: _join(sorted(_digits(s), reverse=o == "desc")), _order, (
        "sort the numbers in {o} order", "arrange the list {o}", "order the values {o}", "put the digits in {o} order",
        "rearrange the sequence {o}", "sort the list, {o}", "write the numbers sorted {o}", "list the elements {o}"),
        "It writes the numbers of the list sorted {o}."),
    Family("list_take", "list", "list", tuple((k,) for k in range(1, 4)), lambda k: lambda s: _join(_digits(s)[:k]), _count, (
        "keep only the first {k} number{s}", "return the opening {k} element{s}", "take the first {k} item{s} of the list",
        "truncate the list to {k} value{s}", "output the {k} leading number{s}", "cut the sequence down to its first {k}",
        "write just the start of the list, {k} long", "give the head of the list, {k} element{s}"),
        "It writes the first {k} number{s} of the list."),
    Family("list_drop", "list", "list", tuple((k,) for k in range(1, 4)), lambda k: lambda s: _join(_digits(s)[k:]), _count, (
        "remove the first {k} number{s} from the list", "drop the leading {k} element{s}",
        "output the list without its initial {k} value{s}", "delete the first {k} item{s} of the sequence",
        "skip {k} number{s} at the start and keep the rest", "cut {k} value{s} off the front",
        "discard the opening {k} entr{ies} of the list", "leave out the first {k} number{s}"),
        "It writes the list without its first {k} number{s}."),
    Family("list_above", "list", "list", tuple((k,) for k in range(1, 8)),
           lambda k: lambda s: _join([d for d in _digits(s) if d > k]), _count, (
        "keep only the numbers greater than {k}", "remove every value of {k} or less", "filter the list to items above {k}",
        "output the elements bigger than {k}", "drop each number that is not more than {k}",
        "select the values exceeding {k}", "write only the entries larger than {k}", "keep what is above {k}, in order"),
        "It writes the numbers of the list that are greater than {k}, in order; if none is, a dash."),
    Family("list_remove", "list", "list", tuple((v,) for v in range(10)),
           lambda v: lambda s: _join([d for d in _digits(s) if d != v]), _digit, (
        "remove every {v} from the list", "delete all occurrences of {v}", "drop each number equal to {v}",
        "write the list without any {v}", "filter out the value {v}", "leave out every {v} and keep the rest",
        "erase each {v} from the sequence", "keep every element that is not {v}"),
        "It writes the list with every {v} left out; if nothing is left, a dash.", needs=0, second=False),
    Family("list_count", "list", "number", tuple((v,) for v in range(10)),
           lambda v: lambda s: str(_digits(s).count(v)), _digit, (
        "count how many times {v} appears in the list", "say how many elements equal {v}", "return the number of {v}s",
        "tally the occurrences of {v}", "output how often the value {v} occurs", "tell me the count of {v}",
        "give the frequency of {v} in the list", "report how many entries are {v}"),
        "It answers with how many times the number {v} appears in the list.", needs=0, first=False),
    Family("list_reverse", "list", "list", ((),), lambda: lambda s: _join(_digits(s)[::-1]), _none, (
        "reverse the order of the list", "write the numbers backwards", "output the sequence from last to first",
        "flip the list around", "list the elements in the opposite order", "read the values right to left",
        "turn the sequence around", "give the items in reverse"),
        "It writes the numbers of the list in the opposite order."),
    Family("list_max", "list", "number", ((),), lambda: lambda s: str(max(_digits(s))), _none, (
        "find the largest number in the list", "return the maximum value", "pick the biggest digit",
        "say which number is highest", "output the greatest element", "give the top value of the sequence",
        "answer with the list's maximum", "report the highest entry"),
        "It answers with the largest number of the list.", first=False),
    Family("list_min", "list", "number", ((),), lambda: lambda s: str(min(_digits(s))), _none, (
        "find the smallest number in the list", "return the minimum value", "pick the lowest digit",
        "say which number is least", "output the smallest element", "give the bottom value of the sequence",
        "answer with the list's minimum", "report the lowest entry"),
        "It answers with the smallest number of the list.", first=False),
    Family("list_sum", "list", "number", ((),), lambda: lambda s: str(sum(_digits(s))), _none, (
        "add up all the numbers in the list", "return the sum of the values", "compute the total of the list",
        "say what the elements add up to", "output the sum of every item", "give the total of the sequence",
        "answer with the list's sum", "report what all the entries total"),
        "It answers with the sum of the numbers of the list.", first=False),
)

NUMBER_FAMILIES: tuple[Family, ...] = (
    Family("add", "number", "number", tuple((k,) for k in range(1, 10)), lambda k: lambda s: str(int(s) + k), _count, (
        "add {k} to the number", "increase the value by {k}", "return the number plus {k}", "count up by {k}",
        "raise the integer by {k}", "compute the input plus {k}", "give the number that is {k} more",
        "make the number bigger by {k}"),
        "It answers with the number plus {k}."),
    Family("subtract", "number", "number", tuple((k,) for k in range(1, 10)), lambda k: lambda s: str(int(s) - k), _count, (
        "subtract {k} from the number", "decrease the value by {k}", "return the number minus {k}", "count down by {k}",
        "lower the integer by {k}", "compute the input minus {k}", "give the number that is {k} less",
        "make the number smaller by {k}"),
        "It answers with the number minus {k}."),
    Family("multiply", "number", "number", tuple((k,) for k in (2, 3, 10)), lambda k: lambda s: str(int(s) * k), _count, (
        "multiply the number by {k}", "return {k} times the value", "scale the integer up by a factor of {k}",
        "compute the input times {k}", "give the product of the number and {k}", "make the number {k} times as big",
        "take the number {k} times over and add it up", "answer with the number multiplied by {k}"),
        "It answers with the number multiplied by {k}."),
)

FAMILIES: tuple[Family, ...] = WORD_FAMILIES + LIST_FAMILIES + NUMBER_FAMILIES
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class Atom:
    """A single task: a family and one parameter value."""

    family: Family
    value: tuple

    @property
    def name(self) -> str:
        return self.family.slug(self.value)

    @functools.cached_property
    def fn(self) -> Callable[[str], str]:
        return self.family.op(*self.value)


@dataclass(frozen=True)
class UTask:
    """A task of the universe: one atom, or two applied in order."""

    steps: tuple[Atom, ...]

    @property
    def name(self) -> str:
        return ".then.".join(a.name for a in self.steps)

    @property
    def program(self) -> str:
        """The task in the base model's words: its steps' names, spelled out ("reverse then wrap brackets").
        The base model is pretrained on these, so it can do every task, held-out ones included, when told."""
        return " then ".join(a.name.replace("_", " ") for a in self.steps)

    @property
    def kind(self) -> str:
        return self.steps[0].family.kind

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(a.family.name for a in self.steps)

    def __call__(self, x: str) -> str:
        y = self.answer(x)
        if y is None:
            raise ValueError(f"{x!r} is not an input of task {self.name}")
        return y

    def answer(self, x: str) -> str | None:
        """The task's answer, or None where x is outside its domain: a step is undefined on it, or a
        composition's first step leaves nothing (the dash of an empty result) for its second."""
        try:
            mid = self.steps[0].fn(x)
            if len(self.steps) == 1:
                return mid
            return None if mid == "-" else self.steps[1].fn(mid)
        except (IndexError, ValueError):
            return None

    def accepts(self, x: str) -> bool:
        return self.answer(x) is not None


# --- inputs ------------------------------------------------------------------------------------------
def sample_input(task: UTask, rng: random.Random) -> str:
    """An input in the task's domain (drawn again until the task accepts it; a task is kept in the
    universe only if inputs it accepts are common)."""
    for _ in range(100):
        x = _draw(task, rng)
        if task.accepts(x):
            return x
    raise ValueError(f"task {task.name} accepts almost no input")


def _draw(task: UTask, rng: random.Random) -> str:
    first = task.steps[0]
    if first.family.kind == "number":
        return str(rng.randint(10, 99))
    if first.family.kind == "list":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(5, 6))]
        if first.family.needs is not None:  # the digit the task is about appears once or twice
            for i in rng.sample(range(len(xs)), rng.randint(1, 2)):
                xs[i] = first.value[first.family.needs]
        return _join(xs)
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6))]
    if first.family.needs is not None:  # the letter the task is about appears once or twice, never alone
        for i in rng.sample(range(len(letters)), rng.randint(1, 2)):
            letters[i] = first.value[first.family.needs]
    return "".join(letters)


def _probes(kind: str) -> list[str]:
    """Fixed inputs that tell tasks apart: random ones and ones holding every letter or digit."""
    rng = random.Random(12345)
    if kind == "number":
        return [str(n) for n in range(10, 100, 3)]
    if kind == "list":
        out = [_join([rng.randint(0, 9) for _ in range(rng.randint(5, 6))]) for _ in range(30)]
        return out + [_join([d, (d + 3) % 10, d, (d + 7) % 10, (d + 1) % 10]) for d in range(10)]
    out = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6))) for _ in range(30)]
    return out + [c + "".join(rng.choice(string.ascii_lowercase) for _ in range(4)) + c for c in string.ascii_lowercase]


# --- descriptions ------------------------------------------------------------------------------------
def _render(template: str, slots: dict) -> str:
    return template.format(**{"ies": "ies" if slots.get("s") else "y", **slots})


def atom_phrases(atom: Atom, templates: Sequence[str]) -> list[str]:
    """Every phrasing of `templates` with every written form of the atom's parameter."""
    return [_render(t, slots) for t in templates for slots in atom.family.forms(*atom.value)]


def _frame(p: str, f: str) -> str:
    text = f.format(p=p)
    return text[0].upper() + text[1:]


# --- the universe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UniverseConfig:
    seed: int = 0
    n_compositions: int = 460  # compositions drawn (before removing duplicates and splits' conflicts)
    new_values_share: float = 0.15  # of each seen family's parameter values (at least one where it has 3+)
    new_composition_pairs_share: float = 0.15  # of the ordered family pairs that compositions are drawn from
    n_new_families: int = 3
    n_train_descriptions: int = 40  # per task, at most (a sample of every phrasing × form × framing)
    n_eval_descriptions: int = 12
    n_train_examples: int = 200
    n_eval_examples: int = 50
    n_docs: int = 8
    eval_tasks_per_split: int = 16  # tasks that evaluation scores per split (seen ones included)
    families: tuple[str, ...] = ()  # a smaller universe of these families only (empty: every family)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILY_BY_NAME))
        if unknown:
            raise InputError(f"unknown task families {unknown}; the universe has {', '.join(FAMILY_BY_NAME)}")
        eligible = [f for f in self.chosen() if len(f.values) >= 3]
        if self.n_new_families >= len(eligible):
            raise InputError(f"{self.n_new_families} new families leave no seen family of three or more values "
                             f"among {len(eligible)}; choose more families or fewer new ones")

    def chosen(self) -> tuple[Family, ...]:
        return tuple(f for f in FAMILIES if not self.families or f.name in self.families)


def _phrasing_split(rng: random.Random) -> dict[str, tuple[list[str], list[str]]]:
    """family → (training phrasings, evaluation phrasings)."""
    out = {}
    for f in FAMILIES:
        order = list(range(len(f.phrasings)))
        rng.shuffle(order)
        held = set(order[:N_EVAL_PHRASINGS])
        out[f.name] = ([p for i, p in enumerate(f.phrasings) if i not in held],
                       [p for i, p in enumerate(f.phrasings) if i in held])
    return out


def _new_values(rng: random.Random, families: Sequence[Family], share: float) -> set[str]:
    """Atom names held out as new parameter values of seen families. A two-parameter family (replace x
    with y) holds out a pair only while both its letters keep a trained pair of their own."""
    held: set[str] = set()
    for f in families:
        if len(f.values) < 3:
            continue
        atoms = [Atom(f, v) for v in f.values]
        k = max(1, round(share * len(atoms)))
        if len(f.values[0]) == 1:
            inner = atoms[1:-1] if len(atoms) > 3 else atoms  # interpolation: keep both ends in training
            held |= {a.name for a in rng.sample(inner, min(k, len(inner)))}
            continue
        order = atoms[:]
        rng.shuffle(order)
        trained = {a.value for a in atoms}
        for a in order:
            if len(atoms) - len(trained) >= k:  # this family's pairs held out so far
                break
            rest = trained - {a.value}
            if any(v[0] == a.value[0] for v in rest) and any(v[1] == a.value[1] for v in rest):
                trained = rest
                held.add(a.name)
    return held


def build_universe(cfg: UniverseConfig = UniverseConfig()) -> tuple[list[UTask], dict[str, list[str]]]:
    """Every distinct task, and the held-out splits (split → task names). Deterministic in cfg."""
    rng = random.Random(cfg.seed)
    families = cfg.chosen()
    eligible = [f for f in families if len(f.values) >= 3]
    new_families = {f.name for f in rng.sample(eligible, cfg.n_new_families)}
    seen_families = [f for f in families if f.name not in new_families]
    new_values = _new_values(rng, seen_families, cfg.new_values_share)

    singles, signatures = [], set()
    probes = {k: _probes(k) for k in ("word", "list", "number")}

    def distinct(t: UTask) -> bool:
        """Keep a task that computes something no kept task computes (answers on the probes), accepts
        most inputs of its kind, and answers within the output budget."""
        check = random.Random(cfg.seed + 3)
        own = [(x, y) for x in (_draw(t, check) for _ in range(200)) if (y := t.answer(x)) is not None]
        if len(own) < 150:  # a composition whose first step often leaves nothing
            return False
        answers = [t.answer(x) for x in probes[t.kind]]
        if sum(y is not None for y in answers) < len(answers) // 2:
            return False
        outs = [y for y in answers if y is not None] + [y for _, y in own]
        if len({y for _, y in own}) < 2:
            return False  # a constant answer ("uppercase it, then count the s letters": always 0)
        for step in t.steps if len(t.steps) == 2 else ():  # a composition that mostly does one step's work
            alone = UTask((step,))
            if sum(alone.answer(x) == y for x, y in own) > len(own) // 2:
                return False
        # inputs outside the domain are marked (None), so tasks alike but on different domains differ
        sig = (t.kind, tuple(answers))
        if sig in signatures or max(map(len, outs)) > MAX_OUT:
            return False
        signatures.add(sig)
        return True

    for f in families:
        for v in f.values:
            t = UTask((Atom(f, v),))
            if distinct(t):
                singles.append(t)

    # compositions: first step and second step from different families of one input kind, whose output
    # kind the second step reads; never a new-value atom (it would mix two splits)
    pairs = [(f, g) for f in families for g in families
             if f is not g and f.first and g.second and f.out == f.kind and g.kind == f.kind]
    rng.shuffle(pairs)
    pool_pairs = [(f, g) for f, g in pairs if f.name not in new_families and g.name not in new_families]
    n_held_pairs = round(cfg.new_composition_pairs_share * len(pool_pairs))
    held_pairs = {(f.name, g.name) for f, g in pool_pairs[:n_held_pairs]}
    usable = {f.name: [a for a in (s.steps[0] for s in singles if s.families == (f.name,)) if a.name not in new_values]
              for f in families}
    compositions = []
    for _ in range(cfg.n_compositions if pairs else 0):
        f, g = rng.choice(pairs)
        if not usable[f.name] or not usable[g.name]:
            continue
        t = UTask((rng.choice(usable[f.name]), rng.choice(usable[g.name])))
        if distinct(t):
            compositions.append(t)
    tasks = singles + compositions

    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for t in tasks:
        if any(fam in new_families for fam in t.families):
            splits["new_families"].append(t.name)
        elif len(t.steps) == 1 and t.name in new_values:
            splits["new_values"].append(t.name)
        elif len(t.steps) == 2 and t.families in held_pairs:
            splits["new_compositions"].append(t.name)
    return tasks, splits


def _descriptions(t: UTask, phrasings: dict[str, tuple[list[str], list[str]]], which: int, n: int,
                  rng: random.Random) -> list[str]:
    """Up to n descriptions of t from its families' training (which=0) or evaluation (which=1) phrasings."""
    if len(t.steps) == 1:
        cores = atom_phrases(t.steps[0], phrasings[t.families[0]][which])
    else:
        a = atom_phrases(t.steps[0], phrasings[t.families[0]][which])
        b = atom_phrases(t.steps[1], phrasings[t.families[1]][which])
        connectors = (CONNECTORS_TRAIN, CONNECTORS_EVAL)[which]
        cores = [c.format(a=x, b=y) for x, y in itertools.product(a, b) for c in connectors]
    every = [_frame(p, f) for p in cores for f in FRAMES]
    return sorted(rng.sample(every, n)) if len(every) > n else every


def _documents(t: UTask, rng: random.Random, n: int) -> list[str]:
    about = []
    for a in t.steps:
        slots = rng.choice(a.family.forms(*a.value))
        about.append(_render(a.family.about, slots))
    prose = about[0] if len(about) == 1 else f"It does two things in order. First: {about[0]} Then: {about[1]}"
    return write_documents(t.kind, prose, lambda: [(x, t(x)) for x in (sample_input(t, rng) for _ in range(3))], n)


def build_universe_suite(cfg: UniverseConfig = UniverseConfig()) -> Suite:
    """The universe as a Suite: every task's descriptions, documents and examples split into training and
    evaluation parts, the held-out splits, and the tasks evaluation scores per split."""
    tasks, splits = build_universe(cfg)
    rng = random.Random(cfg.seed + 1)
    phrasings = _phrasing_split(rng)
    train_d, eval_d, train_doc, eval_doc, train_x, eval_x, meta = {}, {}, {}, {}, {}, {}, {}
    for t in tasks:
        train_d[t.name] = _descriptions(t, phrasings, 0, cfg.n_train_descriptions, rng)
        eval_d[t.name] = _descriptions(t, phrasings, 1, cfg.n_eval_descriptions, rng)
        train_doc[t.name] = _documents(t, rng, cfg.n_docs)
        eval_doc[t.name] = _documents(t, rng, max(2, cfg.n_docs // 3))
        train_x[t.name] = [(x, t(x)) for x in (sample_input(t, rng) for _ in range(cfg.n_train_examples))]
        seen_inputs = {x for x, _ in train_x[t.name]}
        ev: list[tuple[str, str]] = []
        for _ in range(50 * cfg.n_eval_examples):  # inputs never trained on where the input space allows
            if len(ev) == cfg.n_eval_examples:
                break
            x = sample_input(t, rng)
            if x not in seen_inputs or t.kind == "number":
                ev.append((x, t(x)))
        eval_x[t.name] = ev
        meta[t.name] = {"steps": [{"family": a.family.name, "value": list(a.value)} for a in t.steps]}
    held = [n for s in SPLITS for n in splits[s]]
    seen = [t.name for t in tasks if t.name not in set(held)]
    pick = random.Random(cfg.seed + 2)
    eval_tasks = {"seen": sorted(pick.sample(seen, min(cfg.eval_tasks_per_split, len(seen))))}
    for s in SPLITS:
        eval_tasks[s] = sorted(pick.sample(splits[s], min(cfg.eval_tasks_per_split, len(splits[s]))))
    return Suite(cfg.seed, [t.name for t in tasks], held, train_d, eval_d, train_doc, eval_doc, train_x, eval_x,
                 list(UNRELATED), splits=splits, eval_tasks=eval_tasks, meta=meta,
                 instructions={t.name: [t.program] for t in tasks})


def task_fn(name: str) -> Callable[[str], str]:
    """The function of a universe task, from its name (used to recognise one task's answers in another's)."""
    steps = []
    for part in name.split(".then."):
        for f in sorted(FAMILIES, key=lambda f: -len(f.name)):  # longest family name first: list_nth_last
            for v in f.values:
                if f.slug(v) == part:
                    steps.append(Atom(f, v))
                    break
            else:
                continue
            break
        else:
            raise KeyError(f"{part!r} is not a task of the universe")
    return UTask(tuple(steps))
