"""The task universe: enough distinct tasks from enough families, three held-out splits that mean what their
names say, and evaluation texts that no training text contains."""

from __future__ import annotations

import random

import pytest

from generator.train.universe import (
    CONNECTORS_EVAL,
    CONNECTORS_TRAIN,
    FAMILIES,
    FAMILY_BY_NAME,
    SPLITS,
    UniverseConfig,
    atom_phrases,
    build_universe,
    build_universe_suite,
    task_fn,
)


@pytest.fixture(scope="module")
def universe():
    return build_universe(UniverseConfig())


@pytest.fixture(scope="module")
def suite():
    return build_universe_suite(UniverseConfig())


def _steps(suite, name: str) -> list[tuple[str, tuple]]:
    return [(s["family"], tuple(s["value"])) for s in suite.meta[name]["steps"]]


def test_at_least_500_distinct_tasks_from_15_parametric_families_and_compositions(universe):
    tasks, _ = universe
    assert len(tasks) >= 500
    parametric = {f.name for f in FAMILIES if len(f.values) >= 2}
    used = {fam for t in tasks for fam in t.families}
    assert len(parametric & used) >= 15
    assert sum(len(t.steps) == 2 for t in tasks) >= 150
    assert len({t.name for t in tasks}) == len(tasks)
    # distinct functions, not just distinct names: no two tasks answer alike on inputs written here
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    inputs = {
        "word": [c + "".join(rng.choice(letters) for _ in range(rng.randint(3, 5))) for c in letters for _ in range(3)]
        + ["".join(rng.choice(letters) for _ in range(rng.randint(3, 5))) + c for c in letters for _ in range(3)],
        "list": [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(5, 6))) for _ in range(300)],
        "number": [str(n) for n in range(10, 100)],
    }
    answers: dict[tuple, str] = {}
    for t in tasks:
        sig = (t.kind, *(t(x) if t.accepts(x) else None for x in inputs[t.kind]))
        assert sig not in answers, f"{t.name} computes what {answers.get(sig)} computes"
        answers[sig] = t.name
    # and no composition mostly does the work of one of its steps (on its own inputs)
    from generator.train.universe import UTask, sample_input

    for t in tasks:
        if len(t.steps) == 2:
            xs = [sample_input(t, rng) for _ in range(100)]
            for step in t.steps:
                alone = UTask((step,))
                same = sum(alone.accepts(x) and alone(x) == t(x) for x in xs)
                assert same <= 70, f"{t.name} answers as {step.name} alone on {same}% of its inputs"


def test_every_example_is_its_tasks_answer_with_at_least_50_for_evaluation(suite):
    for name in suite.tasks:
        fn = task_fn(name)
        assert len(suite.eval_examples[name]) >= 50
        for x, y in suite.train_examples[name][:40] + suite.eval_examples[name]:
            assert fn(x) == y and y and len(y) <= 18
    # the parameter is written in words and in digits (or symbols and names) across a task's descriptions
    texts = " ".join(suite.train_descriptions["shift_forward_4"])
    assert "four" in texts and " 4 " in texts
    texts = " ".join(suite.train_descriptions["join_dash"])
    assert '"-"' in texts and "a dash" in texts


def test_new_values_are_unseen_values_of_seen_families(suite):
    split = suite.splits["new_values"]
    assert len(split) >= 20
    seen_steps = [_steps(suite, t) for t in suite.seen]
    seen_singles = {s[0] for s in seen_steps if len(s) == 1}
    every_seen_atom = {a for s in seen_steps for a in s}
    for name in split:
        ((family, value),) = _steps(suite, name)
        assert (family, value) not in every_seen_atom  # not even inside a training composition
        assert any(f == family for f, _ in seen_singles), f"{family} has no trained value"
        if len(value) == 2:  # replace x with y: x and y each appear in a trained pair
            assert any(f == family and v[0] == value[0] for f, v in seen_singles)
            assert any(f == family and v[1] == value[1] for f, v in seen_singles)
    assert {FAMILY_BY_NAME[_steps(suite, n)[0][0]].name for n in split} >= {"replace", "shift_forward"}
    # no composition anywhere (seen or held out) contains a new-value task: it would mix two splits
    held_atoms = {_steps(suite, n)[0] for n in split}
    for name in suite.tasks:
        steps = _steps(suite, name)
        assert len(steps) == 1 or not set(steps) & held_atoms


def test_new_compositions_pair_seen_operations_never_trained_together(suite):
    split = suite.splits["new_compositions"]
    assert len(split) >= 20
    seen_singles = {_steps(suite, t)[0] for t in suite.seen if len(_steps(suite, t)) == 1}
    trained_pairs = {(a[0], b[0]) for t in suite.seen if len(s := _steps(suite, t)) == 2 for a, b in [s]}
    for name in split:
        a, b = _steps(suite, name)
        assert a in seen_singles and b in seen_singles  # each operation, as it is, was trained alone
        assert (a[0], b[0]) not in trained_pairs  # the pair of families never was


def test_new_families_are_wholly_unseen(suite):
    split = suite.splits["new_families"]
    families = {f for n in split for f, _ in _steps(suite, n)} & {f for n in split if len(_steps(suite, n)) == 1
                                                                 for f, _ in _steps(suite, n)}
    assert len(families) >= 3
    for name in suite.seen:
        assert not {f for f, _ in _steps(suite, name)} & families
    # every task of those families, alone or composed, is in this split
    for name in suite.tasks:
        if {f for f, _ in _steps(suite, name)} & families:
            assert name in split


def test_splits_partition_the_held_out_tasks_and_evaluation_samples_each(suite):
    assert set(suite.splits) == set(SPLITS)
    held = [t for s in SPLITS for t in suite.splits[s]]
    assert len(held) == len(set(held)) and set(held) == set(suite.held_out)
    evaluated = suite.evaluated()
    assert set(evaluated) == {"seen", *SPLITS}
    assert set(evaluated["seen"]) <= set(suite.seen)
    for s in SPLITS:
        assert len(evaluated[s]) >= 16 and set(evaluated[s]) <= set(suite.splits[s])


def test_no_training_text_is_an_evaluation_text_or_uses_an_evaluation_phrasing(suite):
    training = suite.training_texts()
    assert len(training) > 10_000
    held = set(suite.held_out)
    for name in suite.tasks:
        assert not set(suite.eval_descriptions[name]) & training
        assert not set(suite.eval_documents[name]) & training
        if name in held:
            assert not set(suite.train_descriptions[name]) & training
            assert not set(suite.train_documents[name]) & training
    # stronger: no phrasing or connector reserved for evaluation appears inside any training text
    haystack = "\n".join(sorted(training)).lower()
    from generator.train.universe import Atom, _phrasing_split

    phrasings = _phrasing_split(random.Random(suite.seed + 1))
    for f in FAMILIES:
        _, eval_phrasings = phrasings[f.name]
        for value in f.values[:3]:
            for core in atom_phrases(Atom(f, value), eval_phrasings):
                assert core.lower() not in haystack, f"{core!r} appears in training"
    for connector in CONNECTORS_EVAL:
        glue = connector.format(a="\x00", b="\x00").split("\x00")[1]
        assert glue.lower() not in haystack
    assert all(c not in CONNECTORS_EVAL for c in CONNECTORS_TRAIN)


def test_the_base_model_reads_task_programs_which_no_hypernetwork_text_contains(suite):
    """The base model is told each task, held-out ones included, by its program (its steps' names spelled
    out); programs are the base model's prompt only: no text a hypernetwork trains on is one, and a
    program says exactly which steps, in which order, with which values."""
    from generator.train.universe import task_fn

    programs = {t: suite.base_instructions(t) for t in suite.tasks}
    assert all(len(p) == 1 for p in programs.values())
    assert len({p[0] for p in programs.values()}) == len(suite.tasks)  # one program per task, all distinct
    assert programs["shift_forward_3.then.append_z"] == ["shift forward 3 then append z"]
    assert programs["replace_a_q"] == ["replace a q"] and programs["reverse"] == ["reverse"]
    for t in suite.held_out[:50]:  # the base is told held-out tasks too, in programs of seen steps' words
        assert programs[t][0] == " then ".join(part.replace("_", " ") for part in t.split(".then."))
        assert task_fn(t).program == programs[t][0]
    assert not {p[0] for p in programs.values()} & suite.training_texts()
    assert not any(p[0] in suite.train_descriptions[t] for t, p in programs.items())


def test_the_universe_is_fixed_by_its_seed(tmp_path, suite):
    from generator.train.suite import Suite

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    suite.save(a)
    loaded = Suite.load(a)
    assert loaded.splits == suite.splits and loaded.eval_tasks == suite.eval_tasks
    assert loaded.instructions == suite.instructions
    assert loaded.train_examples == suite.train_examples
    # a second build from the same seed writes the same bytes; another seed draws other splits (a smaller
    # universe of a few families: the same code, a fraction of the time)
    small = dict(families=("shift_forward", "take_first", "replace", "wrap", "reverse", "list_nth", "add"),
                 n_new_families=1, n_compositions=60, n_train_examples=20)
    build_universe_suite(UniverseConfig(**small)).save(a)
    build_universe_suite(UniverseConfig(**small)).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert build_universe_suite(UniverseConfig(seed=1, **small)).splits != Suite.load(a).splits


def test_train_suite_cli_writes_the_universe_by_default_and_the_basic_suite_when_asked(tmp_path, capsys):
    from generator.train.suite import Suite
    from service.cli import main

    out = tmp_path / "universe.json"
    assert main(["train", "suite", "--examples", "20", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "new_values" in line and "new_compositions" in line and "new_families" in line
    s = Suite.load(out)
    assert len(s.tasks) >= 500 and len(s.train_examples[s.tasks[0]]) == 20
    assert main(["train", "suite", "--universe", "--examples", "20", "--out", str(tmp_path / "u2.json")]) == 0
    assert (tmp_path / "u2.json").read_bytes() == out.read_bytes()
    assert main(["train", "suite", "--basic", "--examples", "20", "--out", str(tmp_path / "basic.json")]) == 0
    basic = Suite.load(tmp_path / "basic.json")
    assert len(basic.tasks) == 34 and len(basic.held_out) == 8 and not basic.splits


def test_train_demo_cli_takes_one_suite(capsys):
    from service.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit through SystemExit
        main(["train", "demo", "--basic", "--universe", "--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--universe: not allowed with argument --basic" in err[0], err


def test_a_smaller_universe_of_chosen_families_keeps_three_splits():
    from generator.errors import InputError

    chosen = ("shift_forward", "take_first", "drop_last", "replace", "wrap", "reverse", "list_nth", "list_sort", "add")
    small = build_universe_suite(UniverseConfig(families=chosen, n_new_families=1, n_compositions=60,
                                                n_train_examples=10, eval_tasks_per_split=3))
    assert {s["family"] for m in small.meta.values() for s in m["steps"]} <= set(chosen)
    assert all(len(small.splits[s]) >= 3 for s in SPLITS)
    assert all(len(v) == 3 for v in small.evaluated().values())
    with pytest.raises(InputError, match="unknown task families"):
        UniverseConfig(families=("shift_forward", "nope"))
    with pytest.raises(InputError, match="choose more families or fewer new ones"):
        UniverseConfig(families=("reverse", "upper", "add"), n_new_families=1)
