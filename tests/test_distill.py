"""Context distillation of the base-reading kind (generator/train/distill.py), end to end on tiny random bases:
a Llama (given a Llama-3-style chat template) and a Qwen2 (ChatML), both built here from their config classes
with tokenizers trained on the task texts. `loragen train distill` trains a Doc-to-LoRA hypernetwork on a
five-task JSONL file; the loss falls; a real `loragen serve` serves the checkpoint with its base; PEFT loads the
adapter it returns onto the base, and the base's output changes. Real models, no mocks, no network."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext

import httpx
import pytest
import torch

from generator.checkpoint import load_checkpoint
from generator.d2l.config import D2LConfig
from generator.errors import InputError
from generator.train.distill import Reader, d2l_config, draw, init_for_training
from generator.train.tasks import load_tasks, suite_from_tasks
from tests.helpers import HELD_OUT, TINY, llama_tokenizer, qwen_tokenizer, write_task_file
from tests.service_server import ServiceProcess

LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
              "<|end_header_id|>\n\n{% endif %}")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("distill-bases")
    write_task_file(root / "tasks.jsonl")
    llama_tok, qwen_tok = llama_tokenizer(LLAMA_CHAT), qwen_tokenizer()
    torch.manual_seed(0)
    # weights 10x the usual init's scale: a base at the usual scale barely reads its prompt (the teacher's and the
    # student's next-token distributions then differ by a KL of 1e-4), and nothing would be there to distil
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama_tok), bos_token_id=1, eos_token_id=2,
                                         initializer_range=0.2, **TINY))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(qwen_tok), eos_token_id=0, initializer_range=0.2, **TINY))
    for name, model, tok in (("llama", llama, llama_tok), ("qwen", qwen, qwen_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"tasks": root / "tasks.jsonl", "llama": root / "llama", "qwen": root / "qwen", "root": root}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """`loragen train distill` on each base, 40 steps."""
    from service.cli import main

    out = tmp_path_factory.mktemp("distilled")
    for name in ("llama", "qwen"):
        argv = ["train", "distill", "--tasks", str(bases["tasks"]), "--base", str(bases[name]), "--out", str(out / name),
                "--target-modules", "down_proj,q_proj", "--rank", "4", "--latent", "32", "--latent-queries", "4",
                "--blocks", "1", "--steps", "40", "--batch-size", "8", "--lr", "1e-2", "--quiet",
                "--base-id", f"tiny-random/{name}"]
        assert main(argv) == 0
    return {"llama": out / "llama", "qwen": out / "qwen"}


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_distillation_lowers_the_loss_and_writes_a_d2l_checkpoint(family, trained):
    log = json.loads((trained[family] / "train_log.json").read_text())
    losses = log["loss"]
    assert log["name"] == "D2L context distillation" and log["teacher"] == "description"
    assert HELD_OUT not in log["tasks"]  # held-out tasks never reach a step
    assert losses[-1] < 0.85 * losses[0], losses  # step 0: the no-op adapters' KL, the teacher's gap itself
    ckpt = load_checkpoint(trained[family])
    assert ckpt.kind == "d2l" and isinstance(ckpt.config, D2LConfig)
    assert ckpt.config.base_model == f"tiny-random/{family}" and ckpt.config.target_modules == ["down_proj", "q_proj"]


def test_a_fresh_network_generates_no_op_adapters(bases):
    """The reference's start: scaler B and bias B at zero, so the student starts as the base model itself."""
    from generator.d2l.hypernet import D2LHypernet
    from generator.train.basemodel import load_base

    model, fmt = load_base(bases["qwen"])
    net = D2LHypernet(d2l_config(bases["qwen"], r=4, latent=32, latent_queries=4, blocks=1))
    init_for_training(net, 0)
    ab = Reader(net, model, fmt.tokenizer).adapters(["Reverse the word.", "A longer text about the task at hand."])
    for a, b in ab.values():
        assert a.abs().sum() > 0 and not b.any()  # A carries the text, B is zero: the update is zero
        assert a.shape[0] == 2 and a.shape[2] == b.shape[3] == 8  # (n, L, R, d_in): one chunk + the bias, r 4


def test_the_teacher_reads_the_instruction_and_the_student_does_not(bases):
    from generator.train.basemodel import load_base

    suite = suite_from_tasks(load_tasks(bases["tasks"]), seed=0)
    _, fmt = load_base(bases["qwen"])
    texts, student, teacher = draw(suite, fmt, random.Random(0), batch_size=4, teacher="description", document_share=0)
    for text, (s_ids, s_mask), (t_ids, t_mask) in zip(texts, student, teacher, strict=True):
        assert text not in fmt.tokenizer.decode(s_ids) and text in fmt.tokenizer.decode(t_ids)
        answer = [i for i, m in zip(s_ids, s_mask, strict=True) if m]
        assert answer == [i for i, m in zip(t_ids, t_mask, strict=True) if m]  # the same answer tokens
        assert any(text in suite.train_descriptions[t] for t in suite.seen)


def test_the_program_teacher_reads_the_tasks_program_where_the_suite_has_one(bases):
    from dataclasses import replace

    from generator.train.basemodel import load_base

    suite = suite_from_tasks(load_tasks(bases["tasks"]), seed=0)
    programs = {t: [f"program of {t}"] for t in suite.seen[:1]}  # one task with a program, the others without
    suite = replace(suite, instructions=programs)
    _, fmt = load_base(bases["qwen"])
    texts, _, teacher = draw(suite, fmt, random.Random(0), batch_size=16, teacher="program", document_share=0)
    with_program = [fmt.tokenizer.decode(ids) for ids, _ in teacher if "program of" in fmt.tokenizer.decode(ids)]
    assert with_program and all(f"program of {suite.seen[0]}" in t for t in with_program)
    for text, (ids, _) in zip(texts, teacher, strict=True):  # the student's text is always a description
        assert "program of" not in text
        assert "program of" in fmt.tokenizer.decode(ids) or text in fmt.tokenizer.decode(ids)


def test_a_base_without_a_chat_template_is_refused_in_one_line(bases, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from service.cli import main

    tok = llama_tokenizer()  # no chat template
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **TINY)).save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    capsys.readouterr()
    rc = main(["train", "distill", "--tasks", str(bases["tasks"]), "--base", str(tmp_path / "b"), "--out",
               str(tmp_path / "o"), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no chat template" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, needle", [(["--target-modules", "nope"], "unknown target modules"),
                                           (["--chunk-tokens", "-1"], "chunk_tokens"),
                                           (["--teacher", "oracle"], "invalid choice")])
def test_bad_flags_are_one_line(flags, needle, bases, tmp_path, capsys):
    from service.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) if "--teacher" in flags else nullcontext():  # argparse refuses a choice itself
        rc = main(["train", "distill", "--tasks", str(bases["tasks"]), "--base", str(bases["qwen"]), "--out",
                   str(tmp_path / "o"), "--steps", "2", "--quiet", *flags])
        assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_distilled_checkpoint_is_served_and_peft_loads_its_adapter(bases, trained, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    proc = ServiceProcess({"d2l": trained["qwen"]}, tmp_path / "serve.log", {"LORAGEN_BASE_DIRS": f"d2l={bases['qwen']}"})
    try:
        r = httpx.post(f"{proc.url}/generate", json={"task": "Write the word backwards."}, timeout=60)
    finally:
        proc.stop()
    assert r.status_code == 200, r.text
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(r.content)
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        (tmp_path / "lora" / "adapter_config.json").write_text(f.metadata()["adapter_config"])
    base = AutoModelForCausalLM.from_pretrained(bases["qwen"]).eval()
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        out = adapted(input_ids=ids).logits
    assert (out - plain).abs().max() > 1e-4  # the distilled adapter changes what the base model says


def test_the_cross_entropy_term_adds_its_weight_times_the_students_answer_loss(bases):
    from generator.d2l.hypernet import D2LHypernet
    from generator.train.basemodel import load_base
    from generator.train.distill import completion_logits, distill_loss
    from generator.train.functional import FunctionalLora

    suite = suite_from_tasks(load_tasks(bases["tasks"]), seed=0)
    model, fmt = load_base(bases["qwen"])
    config = d2l_config(bases["qwen"], r=4, latent=32, latent_queries=4, blocks=1)
    net = D2LHypernet(config)
    init_for_training(net, 0)
    reader, lora = Reader(net, model, fmt.tokenizer), FunctionalLora(model, config.target_modules, config.lora_alpha)
    texts, student, teacher = draw(suite, fmt, random.Random(1), batch_size=3, teacher="description", document_share=0)
    try:
        with torch.no_grad():
            kl = distill_loss(model, fmt, lora, reader, texts, student, teacher, 0.0)
            both = distill_loss(model, fmt, lora, reader, texts, student, teacher, 0.5)
            logits, ids = completion_logits(model, fmt, student)  # fresh adapters are no-ops: the base alone
    finally:
        lora.remove()
    assert kl > 0
    torch.testing.assert_close(both - kl, 0.5 * torch.nn.functional.cross_entropy(logits, ids))


def test_an_unknown_teacher_in_the_library_is_an_input_error(bases, tmp_path):
    from generator.train.distill import train_distill
    from generator.train.loop import LoopConfig

    suite = suite_from_tasks(load_tasks(bases["tasks"]), seed=0)
    with pytest.raises(InputError, match="teacher must be one of description, program"):
        train_distill(d2l_config(bases["qwen"]), suite, bases["qwen"], tmp_path, LoopConfig(steps=1), teacher="oracle")
