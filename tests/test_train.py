"""Training and evaluation: the demo suite, the training loop, functional LoRA vs PEFT, and a scaled-down
build of the whole demo bundle (base, library, reconstruction, SFT, evaluation)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from generator.errors import InputError
from generator.train.basemodel import Codec, base_config, build_tokenizer, canonical, collate, completion_loss, greedy, prompt
from generator.train.functional import FunctionalLora, read_peft, stack
from generator.train.loop import LoopConfig, train_loop
from generator.train.sft import SFT_BUCKETS
from generator.train.suite import FRAMES, TASKS, build_suite


def test_suite_meets_the_spec_and_is_reproducible(tmp_path):
    suite = build_suite(seed=3, n_train=40, n_eval=10)
    assert len(suite.tasks) >= 30 and len(suite.held_out) >= 8
    assert set(suite.held_out) <= set(suite.tasks)
    for t in TASKS:
        train, ev = suite.train_descriptions[t.name], suite.eval_descriptions[t.name]
        assert len(set(train) | set(ev)) >= 20 and len(set(train) | set(ev)) == len(train) + len(ev)
        assert not set(train) & set(ev)
        # evaluation paraphrases use core phrasings that no training description contains
        train_cores = {p for p in t.phrasings if any(p in d.lower() for d in train)}
        assert all(not any(p in d.lower() for p in train_cores) for d in ev)
        for x, y in suite.train_examples[t.name] + suite.eval_examples[t.name]:
            assert t.fn(x) == y and y
    assert len(FRAMES) * 6 >= 20
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    suite.save(a)
    build_suite(seed=3, n_train=40, n_eval=10).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert build_suite(seed=4, n_train=40, n_eval=10).train_examples != suite.train_examples


def test_tokenizer_has_word_tokens_for_instructions_and_one_token_per_data_character():
    codec = Codec(build_tokenizer(["Reverse the word", "Reverse the letters"] * 20))
    ids, mask = codec.sequence([("abc", "c ba")], "Reverse the word.")
    tokens = codec.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:5] == ["<s>", "Reverse", "the", "word", "."]  # words learned from the corpus
    assert tokens[5:] == ["\n", "In", ":", "a", "b", "c", "\n", "Out", ":", "c", "b", "a", "\n"]
    assert [t for t, m in zip(tokens, mask, strict=True) if m] == ["c", "b", "a", "\n"]  # loss on the completion only
    assert canonical("c b a") == canonical("cba") == "cba"


def _tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(base_config(len(tok), hidden=32, layers=2, heads=2, intermediate=64)).eval()
    return model, Codec(tok)


def test_functional_lora_equals_peft(tmp_path):
    """What the hooks compute (used by SFT and evaluation) is what PEFT computes for a loaded adapter."""
    from peft import PeftModel, get_peft_model

    from generator.train.functional import peft_scaling
    from generator.train.lora import lora_config

    model, codec = _tiny_model()
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora_config())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B is zero at init: make the adapter do something
    peft_model.save_pretrained(tmp_path / "ad")

    from transformers import LlamaForCausalLM

    ids, _ = collate([codec.sequence([("hello", "x")]), codec.sequence([("ab", "yz")], "Do it.")])
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    plain = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ad").eval()
    expected = loaded(input_ids=ids).logits
    lora = FunctionalLora(base, ["q_proj", "v_proj"], peft_scaling(tmp_path / "ad"))
    ab = read_peft(tmp_path / "ad", ["q_proj", "v_proj"], 2)
    with lora.use(ab):
        got = base(input_ids=ids).logits
    with lora.use(stack([ab, ab])):  # per-sample adapters: the same adapter twice
        got_batched = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_batched, expected, atol=1e-5, rtol=1e-5)
    lora.remove()
    torch.testing.assert_close(base(input_ids=ids).logits, plain)  # hooks gone: the base model is untouched


def test_packed_batches_keep_each_sequence_apart_and_give_the_padded_loss():
    """Base pretraining lays short sequences end to end (prompting.pack); the loss must be the one
    of one padded row per sequence, which it is only if no sequence attends to another."""
    from generator.train.prompting import Packed, honours_packing, pack, packed_loss

    model, codec = _tiny_model(3)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) for _ in range(24)]
    seqs = [codec.sequence([(w, w[::-1])], "Reverse the word." if i % 2 else None) for i, w in enumerate(words)]
    ids, mask, positions, which = pack(seqs, codec.pad_id, cap=48)
    assert ids.shape[0] < len(seqs) and ids.shape[1] <= 48  # several sequences share a row
    assert int(mask.sum()) == sum(sum(m) for _, m in seqs)  # every completion token is still scored once
    assert int(((positions == 0) & (ids != codec.pad_id)).sum()) == len(seqs)  # positions restart at each sequence
    assert sorted(ids[which == i].tolist() for i in range(len(seqs))) == sorted(s for s, _ in seqs)
    torch.testing.assert_close(packed_loss(model, Packed(ids, mask, positions, which)), completion_loss(model, *collate(seqs)),
                               atol=1e-5, rtol=1e-5)
    assert honours_packing(model, codec.pad_id)
    # positions that run on across a row's sequences let them see each other: the loss is no longer the padded one
    running = torch.arange(ids.shape[1]).expand_as(ids)
    padded = float(completion_loss(model, *collate(seqs)))
    assert abs(float(packed_loss(model, Packed(ids, mask, running, which))) - padded) > 1e-4


def test_length_buckets_partition_the_batch_with_the_fewest_padded_tokens():
    """Each group padded to its longest: the groups `length_buckets` picks cost no more tokens than any other
    split of the sorted lengths into at most k runs, and they hold every index once."""
    from itertools import combinations

    from generator.train.prompting import length_buckets

    def padded(groups, lengths):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups)

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(3, 30) for _ in range(rng.randint(1, 9))]
        k = rng.randint(1, 4)
        groups = length_buckets(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= k
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(padded([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)), strict=True)], lengths)
                   for j in range(min(k, len(lengths))) for cuts in combinations(range(1, len(order)), j))
        assert padded(groups, lengths) == best
    assert padded(length_buckets([4, 20, 5, 21], 2), [4, 20, 5, 21]) == 2 * 5 + 2 * 21 < 4 * 21


def test_bucketed_sft_loss_is_the_padded_loss_with_each_sample_keeping_its_adapter():
    """SFT computes a batch in length buckets, each with its samples' own slice of the generated adapters:
    the loss and the adapters' gradients are those of the whole batch padded in one pass."""
    from generator.train.prompting import bucketed_completion_loss, length_buckets
    from generator.train.prompting import completion_loss as padded_loss

    model, codec = _tiny_model(4)
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))) for _ in range(10)]
    seqs = [codec.sequence([(w, w[::-1])]) for w in words]
    assert len(length_buckets([len(s) for s, _ in seqs], 3)) == 3
    lora = FunctionalLora(model, ["q_proj", "v_proj"], 2.0)
    torch.manual_seed(2)
    ab = {m: (torch.randn(len(seqs), 2, 4, 32, requires_grad=True), torch.randn(len(seqs), 2, 32, 4, requires_grad=True))
          for m in ("q_proj", "v_proj")}  # a different adapter per sample
    with lora.use(ab):
        whole = padded_loss(model, *codec.batch(seqs))
    expected = torch.autograd.grad(whole, [t for pair in ab.values() for t in pair])
    got = bucketed_completion_loss(model, codec, seqs, 3, lambda idx: lora.use({m: (a[idx], b[idx]) for m, (a, b) in ab.items()}))
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, [t for pair in ab.values() for t in pair]), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    # a bucket given the adapters in batch order instead of its own samples' scores another loss
    shuffled = bucketed_completion_loss(model, codec, seqs, 3,
                                        lambda idx: lora.use({m: (a[:len(idx)], b[:len(idx)]) for m, (a, b) in ab.items()}))
    assert abs(float(shuffled) - float(whole)) > 1e-3
    lora.remove()


def test_packing_is_not_trusted_on_a_model_whose_outputs_vary_between_calls():
    """A model in training mode with dropout cannot show that it keeps packed sequences apart: trainers then
    fall back to one padded row per sequence."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from generator.train.prompting import honours_packing

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                       bos_token_id=1, eos_token_id=2, resid_pdrop=0.5))
    assert not honours_packing(model.train(), 0)
    assert honours_packing(model.eval(), 0)


def test_greedy_decoding_with_left_padding_matches_one_by_one():
    model, codec = _tiny_model(2)
    prompts = [prompt("abcdef"), prompt("xy", "Reverse the word.")]
    batched = greedy(model, codec, prompts, max_new=6)
    assert batched == [greedy(model, codec, [p], max_new=6)[0] for p in prompts]


def test_training_loop_resumes_exactly(tmp_path):
    """A run interrupted after a periodic checkpoint and resumed ends with the same weights as one that
    never stopped: batches come from (seed, step), and the optimiser state is restored."""

    def run(out, stop_at=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def loss_at(step, rng: random.Random):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt
            x = torch.tensor([[rng.random() for _ in range(4)] for _ in range(8)])
            return ((net(x).squeeze(-1) - x.sum(-1)) ** 2).mean()

        cfg = LoopConfig(steps=30, lr=1e-2, warmup=2, ckpt_every=10, log_every=5, progress=False)
        try:
            log = train_loop(net, loss_at, cfg, out)
        except KeyboardInterrupt:
            return None, None
        return net, log

    straight, log = run(tmp_path / "a")
    assert log["loss"][-1] < log["loss"][0]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a" / "train_log.json").read_text())["step"][-1] == 30
    assert run(tmp_path / "b", stop_at=25) == (None, None)
    assert (tmp_path / "b" / "train_state.pt").exists()
    resumed, log_b = run(tmp_path / "b")
    assert log_b["resumed_from"] == 20
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not (tmp_path / "b" / "train_state.pt").exists()


@pytest.mark.parametrize("packed", [False, True])
def test_focus_weights_follow_each_tasks_completion_loss(packed):
    """Focused pretraining draws a task in proportion to its completion loss on a fixed probe, above a
    uniform floor: the weights are exactly (1 - focus)/N + focus * loss / total loss, with each task's loss
    measured as `completion_loss` measures it."""
    from generator.train.basemodel import FOCUS_PROBE, _focus_weights

    suite = build_suite(seed=1, n_train=12, n_eval=4)
    tasks = suite.tasks[:9]
    tok = build_tokenizer(d for t in tasks for d in suite.base_instructions(t))
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(base_config(len(tok), hidden=32, layers=2, heads=2, intermediate=64)).eval()
    codec = Codec(tok)
    weights = _focus_weights(model, codec, suite, tasks, 0.6, 1, batch_size=5, packed=packed)  # batches cut across tasks
    losses = []
    with torch.no_grad():
        for t in tasks:
            ex = suite.train_examples[t]
            seqs = [codec.sequence([ex[j]], suite.base_instructions(t)[0]) for j in range(FOCUS_PROBE)]
            ids, mask = collate(seqs)
            logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]], reduction="sum")
            losses.append(float(nll) / int(mask[:, 1:].sum()))
    expected = [0.4 / len(tasks) + 0.6 * v / sum(losses) for v in losses]
    assert sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx(expected, rel=1e-5)
    assert min(weights) >= 0.4 / len(tasks)  # never starved


def test_focused_pretraining_changes_the_draw_and_resumes_exactly(tmp_path):
    """With focus, pretraining ends elsewhere than with uniform draws (the focus weights are used); a run
    interrupted by a real Ctrl-C once its first resume state is written, and run again, ends with the
    weights of a run that never stopped (the weights are measured again at the resumed step)."""
    import _thread
    import signal

    from safetensors.torch import load_file

    from generator.train.basemodel import pretrain_base
    from generator.train.loop import STATE
    from generator.train.suite import Suite

    suite = build_suite(seed=2, n_train=12, n_eval=4)
    cfg = LoopConfig(steps=12, lr=3e-3, warmup=2, ckpt_every=4, log_every=4, progress=False)
    size = dict(batch_size=4, pack=1, hidden=32, layers=2, heads=2, intermediate=64)
    state = tmp_path / "resumed" / STATE

    class InterruptOnceStateIsWritten(Suite):
        """The same suite, which sends Ctrl-C (to the main thread, as a terminal does) when a sequence is
        drawn after the loop's first resume file appears."""

        sent = False

        def base_instructions(self, task):
            if not self.sent and state.exists():
                type(self).sent = True
                _thread.interrupt_main()
            return super().base_instructions(task)

    def weights(name):
        return load_file(str(tmp_path / name / "model.safetensors"))

    pretrain_base(suite, tmp_path / "straight", cfg, focus=0.8, **size)
    pretrain_base(suite, tmp_path / "uniform", cfg, focus=0.0, **size)
    interrupting = InterruptOnceStateIsWritten(**suite.__dict__)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain_base(interrupting, tmp_path / "resumed", cfg, focus=0.8, **size)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert InterruptOnceStateIsWritten.sent and state.exists()
    log = pretrain_base(suite, tmp_path / "resumed", cfg, focus=0.8, **size)
    assert log["resumed_from"] == 4 and log["focus"] == 0.8 and not state.exists()
    straight, resumed, uniform = weights("straight"), weights("resumed"), weights("uniform")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(straight[k], uniform[k]) for k in straight)
    with pytest.raises(InputError, match="focus"):
        pretrain_base(suite, tmp_path / "bad", cfg, focus=1.5, **size)


@pytest.fixture(scope="module")
def mini_bundle(tmp_path_factory):
    """The whole build on a small task universe (nine families, three held-out splits), evaluation
    included, scaled down to about a minute."""
    from generator.train.demo import DemoConfig, build_demo

    out = tmp_path_factory.mktemp("bundle")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small gain nothing from a second thread, and lose a lot on a busy machine
    try:
        result = build_demo(out, DemoConfig.scaled_down_universe(seed=0), evaluate=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, result


@pytest.mark.slow
def test_scaled_down_build_lowers_every_loss_and_writes_artifacts(mini_bundle):
    out, _ = mini_bundle
    oracles = sorted(p.parent.name for p in (out / "library").glob("*/train_log.json") if p.parent.name != "_multitask")
    for stage in ("base", f"library/{oracles[0]}", f"library/{oracles[1]}", "t2l-recon", "t2l-sft"):
        log = json.loads((out / stage / "train_log.json").read_text())
        assert log["loss"][-1] < log["loss"][0], stage
        assert (out / stage / "loss.png").exists()
        if stage == "base":  # several sequences per row: prompting.pack
            assert log["packed"] is True
        if stage == "t2l-sft":  # batches in length buckets: prompting.bucketed_completion_loss
            assert log["buckets"] == SFT_BUCKETS > 1
    # the multi-task LoRA cannot know which task a prompt wants: its loss need not fall in a few steps
    assert (out / "library" / "_multitask" / "adapter_model.safetensors").exists()
    for stage in ("t2l-recon", "t2l-sft"):
        from generator.checkpoint import load_checkpoint

        ck = load_checkpoint(out / stage)
        assert ck.config.base_model == "loragen/demo-base" and ck.config.target_modules == ["q_proj", "v_proj"]
    build = json.loads((out / "build.json").read_text())
    assert set(build["stage_seconds"]) == {"suite", "base", "library", "recon", "sft", "eval"}
    assert build["command"] == f"loragen train demo --out {out} --seed 0"  # the universe is the default


@pytest.mark.slow
def test_universe_build_trains_oracles_where_needed_and_evaluates_every_split(mini_bundle):
    from generator.train.conditioning import texts_digest
    from generator.train.demo import DemoConfig
    from generator.train.suite import Suite
    from generator.train.universe import SPLITS

    out, result = mini_bundle
    suite = Suite.load(out / "suite.json")
    wanted = DemoConfig.scaled_down_universe(seed=0).library_tasks(suite)
    evaluated = {t for tasks in suite.evaluated().values() for t in tasks}
    assert evaluated <= set(wanted) < set(suite.tasks)  # oracles for evaluation and recon only, not every task
    assert {p.name for p in (out / "library").iterdir()} == {*wanted, "_multitask"}
    # no hypernetwork training step could condition on an evaluation text or a held-out task's text
    for stage in ("t2l-sft", "t2l-recon"):
        log = json.loads((out / stage / "train_log.json").read_text())
        assert log["table"]["sha256"] == texts_digest(suite.training_texts()), stage
        assert not set(log["tasks"]) & set(suite.held_out), stage
    sft_log = json.loads((out / "t2l-sft" / "train_log.json").read_text())  # SFT samples as the build config says
    assert (sft_log["batch_size"], sft_log["pack"]) == (16, 1) == tuple(DemoConfig.scaled_down_universe(0).sft_batch.values())
    quality = json.loads((out / "eval" / "quality.json").read_text())
    assert quality == json.loads(json.dumps(result["eval"]))
    for row in quality["rows"].values():
        assert set(row) == {"seen", *SPLITS, "per_task"} and set(row["per_task"]) == evaluated
        assert all(row[s]["total"] == 6 * len(suite.evaluated()[s]) for s in ("seen", *SPLITS))
    assert set(quality["targets"]) == {"seen", *SPLITS}
    assert quality["held_out_imitation"]["per_task"].keys() == evaluated - set(suite.evaluated()["seen"])
    md = (out / "eval" / "quality.md").read_text()
    assert "| adapter | seen tasks, unseen descriptions | new parameter values | new compositions | new families |" in md
    assert "| new families |" in md and (out / "eval" / "adapters.png").stat().st_size > 10_000


@pytest.mark.slow
def test_eval_scores_another_sft_checkpoint_in_place_of_the_bundles_own(mini_bundle, tmp_path, capsys):
    """`loragen eval BUNDLE --sft DIR`: the T2L SFT rows are DIR's. Given the bundle's reconstruction
    checkpoint, the SFT row is the reconstruction row, answer for answer."""
    from service.cli import main

    out, _ = mini_bundle
    assert main(["eval", str(out), "--sft", str(out / "t2l-recon"), "--examples", "2", "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    quality = json.loads((tmp_path / "ev" / "quality.json").read_text())
    assert quality["sft"] == str(out / "t2l-recon")
    assert quality["rows"]["T2L SFT"] == quality["rows"]["T2L reconstruction"]
    own = json.loads((out / "eval" / "quality.json").read_text())
    assert "sft" not in own
    assert main(["eval", str(out), "--sft", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no native checkpoint there" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_hypernetwork_beats_the_untrained_one_on_a_seen_task(mini_bundle):
    """Adapters from the trained T2L give a lower completion loss on a seen task (described in unseen
    words) than those of the same hypernetwork before training."""
    from generator.checkpoint import load_checkpoint
    from generator.hypernet import build_hypernet
    from generator.train.basemodel import load_base
    from generator.train.conditioning import EmbeddingTable
    from generator.train.sft import zero_b_heads
    from generator.train.suite import Suite

    out, _ = mini_bundle
    suite = Suite.load(out / "suite.json")
    model, codec = load_base(out / "base")
    trained = load_checkpoint(out / "t2l-sft")
    torch.manual_seed(0)
    untrained = build_hypernet(trained.config)
    zero_b_heads(untrained)
    lora = FunctionalLora(model, trained.config.target_modules, trained.config.scaling)
    task = suite.seen[0]
    table = EmbeddingTable(trained.config.encoder, suite.eval_descriptions[task])
    seqs = [codec.sequence([pair]) for pair in suite.eval_examples[task]]
    ids, mask = collate(seqs)

    def loss_with(net):
        emb = table(suite.eval_descriptions[task][:1]).expand(len(seqs), -1)
        with torch.no_grad(), lora.use(net.eval()(emb)):
            return completion_loss(model, ids, mask).item()

    assert loss_with(trained.build()) < loss_with(untrained)


def test_scaling_defaults_are_the_bundle_sft_settings_or_the_fallbacks(tmp_path):
    from generator.train.commands import _bundle_sft_settings

    assert _bundle_sft_settings(tmp_path) == {"steps": 1200, "batch_size": 32, "pack": 2}  # no build.json
    (tmp_path / "build.json").write_text(json.dumps({"config": {"sft": {"steps": 2400}}}))  # built before sft_batch
    assert _bundle_sft_settings(tmp_path) == {"steps": 2400, "batch_size": 32, "pack": 2}
    own = {"sft": {"steps": 300}, "sft_batch": {"batch_size": 96, "pack": 1}}
    (tmp_path / "build.json").write_text(json.dumps({"config": own}))
    assert _bundle_sft_settings(tmp_path) == {"steps": 300, "batch_size": 96, "pack": 1}


@pytest.mark.parametrize("argv, needle", [
    (["eval", "/nonexistent/bundle"], "not a demo bundle"),
    (["train", "base", "--suite", "/nonexistent/suite.json", "--out", "OUT"], "task file /nonexistent/suite.json not found"),
    (["train", "sft", "--suite", "SUITE", "--base", "/nonexistent", "--out", "OUT"],
     "base model /nonexistent has no config.json"),
    (["train", "base", "--suite", "SUITE", "--out", "OUT", "--steps", "0"], "--steps and --batch-size must be positive"),
    (["train", "base", "--suite", "SUITE", "--out", "OUT", "--pack", "0"], "--pack must be positive"),
    (["train", "lora", "--suite", "SUITE", "--base", "BASE", "--task", "no_such_task", "--out", "OUT"], "unknown tasks"),
    (["train", "sft", "--suite", "SUITE", "--base", "BASE", "--out", "OUT", "--pack", "0"],
     "--pack and --buckets must be positive"),
    (["train", "sft", "--suite", "SUITE", "--base", "BASE", "--out", "OUT", "--buckets", "0"],
     "--pack and --buckets must be positive"),
    (["train", "demo", "--out", "OUT", "--base-steps", "0"], "--base-steps must be positive"),
])
def test_train_and_eval_cli_errors_are_one_line(argv, needle, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from service.cli import main

    build_suite(0, n_train=5, n_eval=2).save(tmp_path / "suite.json")
    if "BASE" in argv:
        model, codec = _tiny_model()
        model.save_pretrained(tmp_path / "base")
        codec.tokenizer.save_pretrained(tmp_path / "base")
        assert LlamaForCausalLM.from_pretrained(tmp_path / "base") is not None
    capsys.readouterr()  # setup's own output
    subst = {"SUITE": str(tmp_path / "suite.json"), "BASE": str(tmp_path / "base"), "OUT": str(tmp_path / "out")}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_demo_base_steps_flag_sets_the_base_stage_and_the_recorded_command():
    """`loragen train demo --base-steps N` pretrains the base model N steps and nothing else changes; the
    command build.json records says so, and the default build's command does not mention it."""
    import argparse

    from generator.train.commands import add_parsers, demo_command, demo_config
    from generator.train.demo import DemoConfig

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "demo", "--out", "B", "--seed", "3"])
    default = demo_config(args)
    assert default == DemoConfig.universe_build(3)
    assert demo_command(args) == "loragen train demo --out B --seed 3"
    args = parser.parse_args(["train", "demo", "--out", "B", "--seed", "3", "--base-steps", "7500"])
    longer = demo_config(args)
    assert longer.base.steps == 7500 and replace(longer, base=default.base) == default
    assert demo_command(args) == "loragen train demo --out B --seed 3 --base-steps 7500"
    args = parser.parse_args(["train", "demo", "--out", "B", "--basic", "--scaled-down", "--base-steps", "9"])
    assert demo_config(args) == replace(DemoConfig.scaled_down(0), base=replace(DemoConfig.scaled_down(0).base, steps=9))
    assert demo_command(args) == "loragen train demo --out B --seed 0 --basic --scaled-down --base-steps 9"


@pytest.mark.slow
def test_sft_step_benchmark_times_each_bucket_count_on_a_bundle(mini_bundle, tmp_path, capsys):
    """`python -m benchmarks.sft_step` times SFT steps of a bundle by number of length buckets: one row per
    value, more buckets leaving no more padding, every number in its JSON."""
    from benchmarks.sft_step import main

    out, _ = mini_bundle
    assert main(["--bundle", str(out), "--steps", "2", "--buckets", "1", "3", "--threads", "1",
                 "--json", str(tmp_path / "sft.json")]) == 0
    result = json.loads((tmp_path / "sft.json").read_text())
    one, three = result["rows"]
    assert (one["buckets"], three["buckets"]) == (1, 3) and one["step_s"]["n"] == three["step_s"]["n"] == 2
    assert 0 <= three["padding"] < one["padding"] < 1  # the mini universe's samples differ in length
    assert result["batch"]["batch_size"] == 16 and result["machine"]["cpu_model"]
    assert "| 3 |" in capsys.readouterr().out


@pytest.mark.slow
def test_scaling_study_trains_nested_subsets_and_reports_every_split(mini_bundle, tmp_path, capsys):
    from generator.train.suite import Suite
    from generator.train.universe import SPLITS
    from service.cli import main

    out, _ = mini_bundle
    suite = Suite.load(out / "suite.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "scaling", "--bundle", str(out), "--sizes", "4,2", "--steps", "6", "--examples", "3",
                     "--out", str(tmp_path / "sc"), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "sc" / "scaling.json").read_text())
    n_all = len(suite.seen)
    assert set(result["sizes"]) == {"2", "4"}
    small = json.loads((tmp_path / "sc" / "sft-2" / "train_log.json").read_text())["tasks"]
    larger = json.loads((tmp_path / "sc" / "sft-4" / "train_log.json").read_text())["tasks"]
    assert len(small) == 2 and len(larger) == 4 and set(small) < set(larger) <= set(suite.seen)  # nested; never held out
    # every size trains with the bundle's own SFT batch and pack (its build.json), as the command records
    own = json.loads((out / "build.json").read_text())["config"]["sft_batch"]
    assert own == {"batch_size": 16, "pack": 1}  # not the CLI's fallbacks (32, 2): the defaults came from build.json
    log = json.loads((tmp_path / "sc" / "sft-2" / "train_log.json").read_text())
    assert (log["batch_size"], log["pack"]) == (16, 1) and (result["batch_size"], result["pack"]) == (16, 1)
    assert "--batch-size 16 --pack 1" in result["command"]
    from generator.eval.scaling import parse_sizes, subsets

    assert parse_sizes("4,all,2,4", n_all) == [2, 4, n_all] and subsets(suite.seen, [n_all], 0)[n_all] == sorted(suite.seen)
    for scores in result["sizes"].values():
        assert set(scores) == {"seen", *SPLITS}
        assert all(scores[s]["total"] == 3 * len(suite.evaluated()[s]) for s in scores)
    md = (tmp_path / "sc" / "scaling.md").read_text()
    assert md.startswith("| training tasks | seen tasks, unseen descriptions | new parameter values |")
    assert "loragen train scaling" in md and (tmp_path / "sc" / "scaling.png").stat().st_size > 10_000
    # the same study with a token reader: trained, then evaluated through the reader's token tables
    torch.set_num_threads(1)
    try:
        code = main(["train", "scaling", "--bundle", str(out), "--sizes", "4", "--steps", "4", "--examples", "2",
                     "--reader", "--reader-width", "16", "--reader-latents", "2", "--reader-heads", "2",
                     "--reader-layers", "1", "--out", str(tmp_path / "sc-reader"), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    reader = json.loads((tmp_path / "sc-reader" / "scaling.json").read_text())
    assert reader["conditioning"] == "token reader" and set(reader["sizes"]["4"]) == {"seen", *SPLITS}
    saved = json.loads((tmp_path / "sc-reader" / "sft-4" / "config.json").read_text())
    assert saved["reader"]["width"] == 16 and "reader" not in json.loads((out / "t2l-sft" / "config.json").read_text())
    capsys.readouterr()
    for sizes, needle in (("0", "positive task counts"), (f"{n_all + 1}", f"the suite has {n_all} seen tasks")):
        assert main(["train", "scaling", "--bundle", str(out), "--sizes", sizes, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


@pytest.mark.slow
def test_sft_with_mean_pooling_writes_and_is_evaluated_through_it(mini_bundle, tmp_path, capsys):
    """`loragen train sft --pooling mean`: the checkpoint declares mean pooling, and evaluation conditions it on
    mean-pooled embeddings (which are not the first token's state)."""
    from generator.checkpoint import load_checkpoint
    from generator.encoder import TaskEncoder
    from service.cli import main

    out, _ = mini_bundle
    sft = tmp_path / "sft-mean"
    assert main(["train", "sft", "--suite", str(out / "suite.json"), "--base", str(out / "base"), "--pooling", "mean",
                 "--steps", "3", "--latent", "8", "--head-in", "16", "--out", str(sft), "--quiet"]) == 0
    spec = load_checkpoint(sft).config.encoder
    assert spec.pooling == "mean"
    cls = TaskEncoder.load(replace(spec, pooling="cls")).encode(["Reverse the word."])
    assert not torch.allclose(TaskEncoder.load(spec).encode(["Reverse the word."]), cls)
    assert main(["eval", str(out), "--sft", str(sft), "--examples", "2", "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "ev" / "quality.json").read_text())["sft"] == str(sft)
