"""Training on any Hugging Face causal LM with its own tokenizer and prompt format.

Two tiny random bases are built here from their transformers config classes, each with a tokenizer
trained on this file's texts: a Llama (SentencePiece-style BPE that puts BOS itself, no chat template: the
plain format) and a Qwen2 (byte-level BPE with a ChatML chat template: the chat format). `loragen train sft`
on a five-task JSONL file trains a hypernetwork for each, a real `loragen serve` (on a real Redis) serves
both checkpoints, and PEFT loads the adapters it returns onto the bases. Real models, no mocks, no network.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import re
import signal
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from generator import DEMO_BUNDLE
from generator.errors import InputError
from generator.train.tasks import load_tasks, suite_from_tasks
from tests.helpers import HELD_OUT, TINY, write_task_file
from tests.helpers import llama_tokenizer as _llama_tokenizer
from tests.helpers import qwen_tokenizer as _qwen_tokenizer
from tests.service_server import ServiceProcess

QV = "q_proj,v_proj"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """tasks.jsonl (five tasks, one held out), tiny-llama/ and tiny-qwen2/ (model + tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("bases")
    write_task_file(root / "tasks.jsonl")
    llama_tok, qwen_tok = _llama_tokenizer(), _qwen_tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama_tok), bos_token_id=1, eos_token_id=2, **TINY))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(qwen_tok), eos_token_id=0, **TINY))
    for name, model, tok in (("tiny-llama", llama, llama_tok), ("tiny-qwen2", qwen, qwen_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    # as a config saved from a hub model by older transformers: the id the llama's adapters name by default
    config = json.loads((root / "tiny-llama" / "config.json").read_text())
    (root / "tiny-llama" / "config.json").write_text(json.dumps({**config, "_name_or_path": "tiny-random/llama"}))
    return {"tasks": root / "tasks.jsonl", "llama": root / "tiny-llama", "qwen": root / "tiny-qwen2", "root": root}


def _suite(bases):
    return suite_from_tasks(load_tasks(bases["tasks"]), seed=0)  # what `loragen train` makes of the file (--seed 0)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from service.cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------- formats


def test_plain_format_puts_the_loss_on_the_answers_and_decodes_from_the_training_prefix(bases):
    from transformers import AutoTokenizer

    from generator.train.prompting import Plain

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    eos = tok.eos_token_id
    for template, instruction in (("{instruction}\nInput: {input}\nOutput: ", None),
                                  ("Q ({instruction}): {input} A:", "Reverse the word.")):
        fmt = Plain(tok, template)
        pairs = [("apple", "elppa"), ("river", "revir")]
        ids, mask = fmt.sequence(pairs, instruction)
        assert len(ids) == len(mask) and ids[0] == tok.bos_token_id  # the tokenizer's own BOS starts the text
        answer_ids = [i for i, m in zip(ids, mask, strict=True) if m]
        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        assert answer_ids == encode("elppa") + [eos] + encode("revir") + [eos]
        first = fmt.prompt("apple", instruction)
        assert ids[:len(first)] == first and not any(mask[:len(first)]) and mask[len(first)]
        assert fmt.answer(encode("elppa")) == "elppa" and fmt.stop_ids == {eos}
    assert tok.decode(Plain(tok).prompt("apple")).startswith("<s> Input: apple")  # no instruction: no blank first line


def test_chat_format_puts_the_loss_on_the_assistant_turns_only(bases):
    from transformers import AutoTokenizer

    from generator.train.prompting import Chat

    tok = AutoTokenizer.from_pretrained(bases["qwen"])
    fmt = Chat(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.stop_ids == {tok.eos_token_id, im_end}
    ids, mask = fmt.sequence([("apple", "elppa"), ("river", "revir")], "Reverse the word.")
    answer_ids = [i for i, m in zip(ids, mask, strict=True) if m]
    assert answer_ids == tok.encode("elppa<|im_end|>revir<|im_end|>", add_special_tokens=False)
    rest = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert rest == ("<|im_start|>user\nReverse the word.\napple<|im_end|>\n<|im_start|>assistant\n"
                    "\n<|im_start|>user\nriver<|im_end|>\n<|im_start|>assistant\n")
    first = fmt.prompt("apple", "Reverse the word.")
    assert ids[:len(first)] == first and mask[len(first)]
    assert tok.decode(first) == tok.apply_chat_template([{"role": "user", "content": "Reverse the word.\napple"}],
                                                        tokenize=False, add_generation_prompt=True)


def test_auto_format_and_base_id_follow_the_documented_rules(bases):
    from transformers import AutoTokenizer

    from generator.train.basemodel import is_demo_base
    from generator.train.conditioning import DEMO_BASE_ID, base_id
    from generator.train.prompting import prompt_format

    assert is_demo_base(DEMO_BUNDLE / "base") and not is_demo_base(bases["llama"])
    demo_tok = AutoTokenizer.from_pretrained(DEMO_BUNDLE / "base")
    assert prompt_format("auto", demo_tok, demo_base=True).name == "spaced"
    assert prompt_format("auto", AutoTokenizer.from_pretrained(bases["llama"])).name == "plain"  # no chat template
    assert prompt_format("auto", AutoTokenizer.from_pretrained(bases["qwen"])).name == "chat"
    assert base_id(DEMO_BUNDLE / "base") == DEMO_BASE_ID
    assert base_id(bases["llama"]) == "tiny-random/llama"  # config.json's hub id
    assert base_id(bases["qwen"]) == "tiny-qwen2"  # none saved: the directory's name


def test_batched_answers_on_a_chat_base_match_one_by_one(bases):
    from generator.train.basemodel import load_base
    from generator.train.prompting import answers

    model, fmt = load_base(bases["qwen"])
    inputs = ["apple", "a much longer input than the first one"]
    assert answers(model, fmt, inputs, max_new=6) == [answers(model, fmt, [x], max_new=6)[0] for x in inputs]


def test_functional_lora_names_what_a_model_lacks(bases):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from generator.train.functional import FunctionalLora

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(InputError, match=r"GPT2LMHeadModel has no decoder layers at model\.model\.layers"):
        FunctionalLora(gpt2, ["q_proj"], 1.0)
    llama = AutoModelForCausalLM.from_pretrained(bases["llama"])
    llama.model.layers[1].self_attn.v_proj = torch.nn.Identity()
    with pytest.raises(InputError, match=r"layer 1 of LlamaForCausalLM has no Linear self_attn\.v_proj; it has .*q_proj"):
        FunctionalLora(llama, ["q_proj", "v_proj"], 1.0)
    lora = FunctionalLora(llama, ["q_proj"], 1.0)
    with pytest.raises(InputError, match=r"q_proj 32→32; generate it for this base model"):
        with lora.use({"q_proj": (torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 32, 4))}):
            pass


# ------------------------------------------------------------------------------ CLI: sft, serve, PEFT


@pytest.fixture(scope="module")
def checkpoints(bases, tmp_path_factory) -> dict[str, Path]:
    """`loragen train sft` on each base: the llama with the auto (plain) format and its default base id, the
    qwen2 with the auto (chat) format and --base-id."""
    from service.cli import main

    out = tmp_path_factory.mktemp("sft")
    for name, extra in (("llama", []), ("qwen", ["--base-id", "tiny-random/qwen2"])):
        argv = ["train", "sft", "--tasks", str(bases["tasks"]), "--base", str(bases[name]), "--target-modules", QV,
                "--rank", "4", "--alpha", "8", "--steps", "3", "--out", str(out / name), "--batch-size", "4",
                "--latent", "16", "--head-in", "32", "--lr", "1e-2", "--quiet", *extra]
        assert main(argv) == 0
    return {"llama": out / "llama", "qwen": out / "qwen"}


@pytest.fixture(scope="module")
def server(checkpoints, redis_server, redis_prefix_module, tmp_path_factory):
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module}
    proc = ServiceProcess(checkpoints, tmp_path_factory.mktemp("serve") / "serve.log", env)
    yield proc
    proc.stop()


@contextlib.contextmanager
def recorded_warnings():
    """Python warnings and WARNING+ records of the peft/transformers loggers (which do not propagate)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
            messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


@pytest.mark.parametrize("family, base_model, prompt_format", [("llama", "tiny-random/llama", "plain"),
                                                               ("qwen", "tiny-random/qwen2", "chat")])
def test_sft_checkpoint_serves_adapters_peft_loads_onto_the_base(family, base_model, prompt_format, bases, checkpoints,
                                                                 server, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    log = json.loads((checkpoints[family] / "train_log.json").read_text())
    assert log["prompt_format"] == prompt_format and log["base_model"] == base_model
    r = httpx.post(f"{server.url}/generate", json={"task": "Mirror the letters of the word.", "checkpoint": family},
                   timeout=60)
    assert r.status_code == 200, r.text
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(r.content)
    with safe_open(weights, "pt") as f:
        config = json.loads(f.metadata()["adapter_config"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert config["base_model_name_or_path"] == base_model
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4 and config["lora_alpha"] == 8

    base = AutoModelForCausalLM.from_pretrained(bases[family]).eval()
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    with recorded_warnings() as messages:
        adapted = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert not [m for m in messages if re.search(r"missing|unexpected", m, re.IGNORECASE)], messages
    in_peft = {n: p for n, p in adapted.named_parameters() if ".lora_" in n}
    tensors = load_file(str(weights))
    assert len(in_peft) == len(tensors) == 2 * 2 * 2  # 2 modules x 2 layers x (A, B)
    for key, t in tensors.items():
        torch.testing.assert_close(in_peft[key.replace(".weight", ".default.weight")], t.float())
    with torch.no_grad():
        out = adapted(input_ids=ids).logits
    assert (out - plain).abs().max() > 1e-4  # the adapter changes what the base model says


def test_sft_conditions_only_on_the_training_table(bases, checkpoints):
    """The table SFT looked texts up in holds the seen tasks' training texts and nothing else: no evaluation
    description, no held-out task's text (the log records the digest of the texts the table held)."""
    from generator.config import EncoderSpec
    from generator.train.conditioning import EmbeddingTable, texts_digest

    suite = _suite(bases)
    training = suite.training_texts()
    evaluation = {d for ds in suite.eval_descriptions.values() for d in ds}
    held_out = set(suite.train_descriptions[HELD_OUT]) | set(suite.eval_descriptions[HELD_OUT])
    assert evaluation and held_out and not (evaluation | held_out) & training
    everything = {t for group in (suite.train_descriptions, suite.eval_descriptions) for ds in group.values() for t in ds}
    for family in ("llama", "qwen"):
        table = json.loads((checkpoints[family] / "train_log.json").read_text())["table"]
        assert table == {"texts": len(training), "sha256": texts_digest(training)}
        assert table["sha256"] != texts_digest(everything)
    built = EmbeddingTable(EncoderSpec(), suite.training_texts())
    assert set(built.index) == training and built.digest == texts_digest(training)
    with pytest.raises(KeyError, match="not in this embedding table"):
        built([sorted(evaluation)[0]])


def test_train_lora_on_a_task_file_with_lora_settings(bases, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from generator.train.functional import read_peft

    out = tmp_path / "reverse"
    rc, err = _cli(["train", "lora", "--tasks", str(bases["tasks"]), "--base", str(bases["llama"]), "--task", "reverse",
                    "--target-modules", "q_proj,k_proj,down_proj", "--rank", "4", "--alpha", "8",
                    "--template", "Q: {input}\\nA:", "--steps", "3", "--batch-size", "4", "--out", str(out), "--quiet"],
                   capsys)
    assert rc == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "q_proj"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"]
    assert json.loads((out / "train_log.json").read_text())["prompt_format"] == "plain"
    ab = read_peft(out)  # modules and layers from the adapter itself
    assert {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in ab.items()} == {
        "q_proj": ((1, 2, 4, 32), (1, 2, 32, 4)), "k_proj": ((1, 2, 4, 32), (1, 2, 16, 4)),
        "down_proj": ((1, 2, 4, 64), (1, 2, 32, 4))}
    with recorded_warnings() as messages:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), str(out))
    assert not [m for m in messages if re.search(r"missing|unexpected", m, re.IGNORECASE)], messages


@pytest.mark.parametrize("stage, flags, needle", [
    ("sft", ["--template", "Answer the question."], "has no {input} field"),
    ("sft", ["--template", "{input} in {colour}"], "unknown fields ['colour']"),
    ("sft", ["--template", "chat"], "has no chat template; give --template a template string"),
    ("sft", ["--target-modules", "q_proj,qkv_proj"], "unknown target modules ['qkv_proj']"),
    ("lora", ["--template", "{input"], "is not a format string"),
    ("lora", ["--rank", "0"], "LoRA rank must be a positive integer"),
    ("recon", ["--alpha", "-1"], "LoRA alpha must be a positive number"),
    ("sft", ["--dropout", "1"], "dropout must be at least 0 and below 1, got 1.0"),
    ("recon", ["--dropout", "-0.1"], "dropout must be at least 0 and below 1, got -0.1"),
    ("sft", ["--weight-decay", "-1"], "--weight-decay must be at least 0, got -1.0"),
])
def test_bad_lora_and_template_flags_are_one_line(stage, flags, needle, bases, tmp_path, capsys):
    argv = ["train", stage, "--tasks", str(bases["tasks"]), "--base", str(bases["llama"]), "--out", str(tmp_path / "out"),
            "--steps", "1", "--quiet", *flags]
    argv += {"lora": ["--task", "reverse"], "recon": ["--library", str(bases["root"])], "sft": []}[stage]
    rc, err = _cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_sft_dropout_changes_the_training_not_the_checkpoint_config(bases, tmp_path):
    """--dropout regularises the hypernetwork while it trains (the weights end elsewhere than without it)
    and is not part of the checkpoint it writes: the config is the same as without it."""
    from safetensors.torch import load_file

    from generator.train.conditioning import hyper_config, training_table
    from generator.train.loop import LoopConfig
    from generator.train.lora import LoraSettings
    from generator.train.sft import train_sft

    suite = _suite(bases)
    config = hyper_config(bases["llama"], lora=LoraSettings(("q_proj", "v_proj"), 4, 8), latent=16, head_in=32)
    table = training_table(config, suite)
    cfg = LoopConfig(steps=4, lr=1e-2, warmup=1, ckpt_every=0, log_every=2, progress=False)
    logs = {p: train_sft(config, suite, bases["llama"], tmp_path / str(p), cfg, batch_size=4, table=table, dropout=p)
            for p in (0.0, 0.5)}
    assert logs[0.5]["dropout"] == 0.5 and logs[0.0]["dropout"] == 0.0
    plain, dropped = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("0.0", "0.5"))
    assert plain.keys() == dropped.keys() and any(not torch.equal(plain[k], dropped[k]) for k in plain)
    assert (tmp_path / "0.0" / "config.json").read_text() == (tmp_path / "0.5" / "config.json").read_text()


# ------------------------------------------------------------------------------------------ resume


def test_sft_on_a_custom_base_resumes_exactly(bases, tmp_path):
    """SFT interrupted (a real Ctrl-C, sent once its first resume state is written) and run again ends with
    the weights of a run that never stopped."""
    from safetensors.torch import load_file

    from generator.train.conditioning import hyper_config, training_table
    from generator.train.loop import STATE, LoopConfig
    from generator.train.lora import LoraSettings
    from generator.train.sft import train_sft

    suite = _suite(bases)
    config = hyper_config(bases["qwen"], lora=LoraSettings(("q_proj", "v_proj"), 4, 8), latent=16, head_in=32)
    table = training_table(config, suite)
    cfg = LoopConfig(steps=40, lr=1e-2, warmup=2, ckpt_every=2, log_every=2, progress=False)

    def run(out: Path) -> dict:
        return train_sft(config, suite, bases["qwen"], out, cfg, batch_size=2, table=table)

    run(tmp_path / "straight")
    state = tmp_path / "resumed" / STATE

    class InterruptOnceStateIsWritten(type(table)):
        """The same training table (its embeddings, not encoded again), which sends Ctrl-C (as a terminal
        does: to the main thread) at the first step after the loop's first resume file appears: the
        observable state, at a known step, however busy the machine."""

        def __init__(self, inner):
            self.__dict__.update(inner.__dict__)
            self.sent = False

        def adapters(self, net, texts):
            if not self.sent and state.exists():
                self.sent = True
                _thread.interrupt_main()
            return super().adapters(net, texts)

    interrupting = InterruptOnceStateIsWritten(table)
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and then interrupt_main() does nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sft(config, suite, bases["qwen"], tmp_path / "resumed", cfg, batch_size=2, table=interrupting)
    finally:
        signal.signal(signal.SIGINT, previous)
    sent = interrupting.sent
    assert sent and state.exists()
    log = run(tmp_path / "resumed")
    assert 2 <= log["resumed_from"] < cfg.steps and not state.exists()
    straight, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
