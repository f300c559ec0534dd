"""Task collections users write (JSONL): loaded into a suite, split honestly, and every mistake named by
file, line and field."""

from __future__ import annotations

import json

import pytest

from generator.errors import InputError
from generator.train.tasks import TaskSpec, load_tasks, save_tasks, suite_from_tasks


def _task(name: str, n_desc: int = 6, n_ex: int = 20, **extra) -> dict:
    return {"name": name, "descriptions": [f"Do {name}, phrasing {i}." for i in range(n_desc)],
            "examples": [{"input": f"in{i}", "output": f"{name}{i}"} for i in range(n_ex)], **extra}


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_a_collection_loads_and_splits_descriptions_and_examples_apart(tmp_path):
    f = tmp_path / "tasks.jsonl"
    _write(f, [_task("alpha", documents=["Alpha turns x into y.", "Examples: a -> b.", "More prose."]), "",
               _task("beta"), _task("gamma", n_desc=2, n_ex=3), _task("delta", held_out=True)])
    tasks = load_tasks(f)
    assert [t.name for t in tasks] == ["alpha", "beta", "gamma", "delta"]
    suite = suite_from_tasks(tasks, seed=3)
    assert suite.seen == ["alpha", "beta", "gamma"] and suite.held_out == ["delta"]
    assert suite.held_out_splits == {"held_out": ["delta"]}
    for t in tasks:
        train, ev = suite.train_descriptions[t.name], suite.eval_descriptions[t.name]
        assert sorted(train + ev) == sorted(t.descriptions) and not set(train) & set(ev)
        xs_train, xs_eval = suite.train_examples[t.name], suite.eval_examples[t.name]
        assert sorted(xs_train + xs_eval) == sorted(t.examples) and not set(xs_train) & set(xs_eval)
    assert len(suite.eval_descriptions["alpha"]) == 2 and len(suite.eval_examples["alpha"]) == 4
    assert suite.eval_descriptions["gamma"] == [] and suite.eval_examples["gamma"] == []  # too few to spare any
    assert len(suite.eval_documents["alpha"]) == 1
    # nothing of an evaluation description or of the held-out task is a training text
    training = suite.training_texts()
    assert not training & {d for v in suite.eval_descriptions.values() for d in v}
    assert not training & set(tasks[3].descriptions)
    # the same seed gives the same split; a saved collection reads back the same
    assert suite_from_tasks(tasks, seed=3).eval_descriptions == suite.eval_descriptions
    save_tasks(tasks, tmp_path / "again.jsonl")
    assert load_tasks(tmp_path / "again.jsonl") == tasks


@pytest.mark.parametrize("line, needle", [
    ("{not json", "line 2: not JSON"),
    ('["a list"]', "line 2: a task must be a JSON object"),
    (json.dumps({**_task("x"), "descripton": []}), "line 2: unknown fields ['descripton']"),
    (json.dumps({"name": "x", "examples": []}), "line 2: missing fields ['descriptions']"),
    (json.dumps({**_task("x"), "name": "../etc"}), 'line 2: "name" must be'),
    (json.dumps({**_task("x"), "descriptions": []}), 'line 2: "descriptions" needs at least 1 entry'),
    (json.dumps({**_task("x"), "descriptions": ["ok", 3]}), 'line 2: "descriptions" must be a list of strings'),
    (json.dumps({**_task("x"), "descriptions": ["ok", "  "]}), 'line 2: "descriptions"[1] is empty'),
    (json.dumps({**_task("x"), "examples": [{"input": "a", "output": "b"}]}), '"examples" must be a list of at least 2'),
    (json.dumps({**_task("x"), "examples": [{"input": "a", "output": "b"}, {"input": "a"}]}),
     'line 2: "examples"[1] must be an object with exactly "input" and "output"'),
    (json.dumps({**_task("x"), "examples": [{"input": "a", "output": "b"}, {"input": "a", "output": ""}]}),
     'line 2: "examples"[1].output must be a non-empty string on one line'),
    (json.dumps({**_task("x"), "examples": [{"input": "a", "output": "b"}, {"input": "a\nb", "output": "c"}]}),
     'line 2: "examples"[1].input must be a non-empty string on one line'),
    (json.dumps({**_task("x"), "held_out": "yes"}), 'line 2: "held_out" must be true or false'),
    (json.dumps({**_task("x"), "documents": "one"}), 'line 2: "documents" must be a list of strings'),
    (json.dumps({**_task("x"), "descriptions": ["x" * 4001]}), "4001 characters; the limit is 4000"),
    (json.dumps(_task("first")), "line 2: \"name\" 'first' is already used on line 1"),
])
def test_every_mistake_names_the_file_line_and_field(tmp_path, line, needle):
    f = tmp_path / "tasks.jsonl"
    _write(f, [_task("first"), line])
    with pytest.raises(InputError) as e:
        load_tasks(f)
    assert str(f) in str(e.value) and needle in str(e.value), str(e.value)


def test_files_that_hold_no_usable_collection_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="holds no task"):
        load_tasks(empty)
    only_held = tmp_path / "held.jsonl"
    _write(only_held, [_task("a", held_out=True)])
    with pytest.raises(InputError, match="at least one must be left for training"):
        load_tasks(only_held)
    with pytest.raises(InputError, match="not found"):
        load_tasks(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="cannot be read as UTF-8"):
        load_tasks(binary)


def test_train_commands_take_a_collection_and_name_its_errors_in_one_line(tmp_path, capsys):
    from service.cli import main

    bad = tmp_path / "tasks.jsonl"
    _write(bad, [_task("ok"), {**_task("broken"), "examples": "none"}])
    for stage in (["base"], ["lora", "--base", str(tmp_path), "--task", "ok"], ["sft", "--base", str(tmp_path)]):
        code = main(["train", *stage, "--tasks", str(bad), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"{bad} line 2: " in err and '"examples"' in err, err
    # a suite file is still read as one, and a JSON file that is neither says so in one line
    from generator.train.suite import build_suite

    build_suite(0, n_train=4, n_eval=2).save(tmp_path / "suite.json")
    from generator.train.commands import _suite

    assert _suite(str(tmp_path / "suite.json")).tasks[0] == "reverse"
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(InputError, match="line 1: unknown fields"):
        _suite(str(tmp_path / "other.json"))


def test_task_spec_round_trips_through_its_json_line():
    t = TaskSpec("t", ("Say hi.",), (("a", "b"), ("c", "d")), ("doc",), True)
    from generator.train.tasks import parse_task

    assert parse_task(t.to_json()) == t
