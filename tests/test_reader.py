"""The token reader: hypernetworks conditioned on the encoder's token states instead of one pooled embedding.

Tiny reader checkpoints on the packaged MiniLM (E=384, windows cut to 16 tokens so that a short document
already spans several), a real `loragen serve` on a real Redis, and `loragen train sft --reader` on a tiny
random Llama with a five-task JSONL file. No mocks, no network.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from generator.checkpoint import Checkpoint, load_checkpoint
from generator.config import EncoderSpec, HyperConfig, ModuleSpec, ReaderSpec
from generator.errors import CheckpointError, ConfigError, InputError
from generator.hypernet import build_hypernet
from generator.pipeline import LoraGenerator, TaskInput
from tests.helpers import TASKS, WORDS, write_task_file
from tests.service_server import ServiceProcess

WINDOW = 16  # encoder tokens per window: 14 content tokens between [CLS] and [SEP]
ENCODER = EncoderSpec(max_length=WINDOW)
READER = ReaderSpec(latents=4, width=16, heads=2, layers=1, max_tokens=64)
DOCUMENT = ("This note explains a small word game. You are given one English word. Write the same word again but with "
            "its letters in the opposite order, so that the last letter comes first and the first letter comes last.")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reader_config(variant: str = "L", reader: ReaderSpec | None = READER) -> HyperConfig:
    return HyperConfig(variant=variant, task_emb_dim=384, latent=16, head_in=32, n_layers=2,
                       modules=(ModuleSpec("q_proj", 32, 32), ModuleSpec("v_proj", 32, 16)), r=2, encoder=ENCODER,
                       base_model="tiny-random/llama", reader=reader)


def reader_checkpoint(variant: str = "L", seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    return Checkpoint.from_module(build_hypernet(reader_config(variant)), source="tiny-reader")


@pytest.fixture(scope="module")
def generator() -> LoraGenerator:
    return LoraGenerator(reader_checkpoint("M"))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, needle", [
    (dict(latents=0), "reader.latents must be a positive integer"),
    (dict(layers=True), "reader.layers must be a positive integer"),
    (dict(width=24, heads=5), "must be a multiple of reader.heads (5)"),
    (dict(width=15, heads=3), "reader.width must be even"),
    (dict(max_tokens=4), "reader.max_tokens must be at least 8"),
])
def test_reader_spec_refuses_bad_sizes_and_names_the_fix(fields, needle):
    with pytest.raises(ConfigError) as e:
        ReaderSpec(**fields)
    assert needle in str(e.value)


def test_config_round_trips_the_reader_and_old_configs_still_load():
    config = reader_config()
    d = json.loads(config.to_json())
    assert d["reader"] == {"latents": 4, "width": 16, "heads": 2, "layers": 1, "max_tokens": 64}
    assert HyperConfig.from_dict(d) == config
    pooled = reader_config(reader=None)
    assert "reader" not in pooled.to_dict()  # a pooled config.json is what it was before readers existed
    assert HyperConfig.from_dict(json.loads(pooled.to_json())) == pooled
    assert HyperConfig.from_dict({**pooled.to_dict(), "reader": None}) == pooled
    with pytest.raises(ConfigError, match="reader must be a JSON object"):
        HyperConfig.from_dict({**d, "reader": 16})
    with pytest.raises(ConfigError, match="malformed config"):
        HyperConfig.from_dict({**d, "reader": {"queries": 4}})
    with pytest.raises(ConfigError, match="reader.heads must be a positive integer"):
        HyperConfig.from_dict({**d, "reader": {**d["reader"], "heads": 0}})


# ------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("variant", ["L", "M", "S"])
def test_reader_checkpoint_saves_loads_and_hashes_its_reader(variant, tmp_path):
    ckpt = reader_checkpoint(variant)
    assert any(k.startswith("task_reader.") for k in ckpt.state_dict)
    assert not any(k.startswith("task_encoder.") for k in ckpt.state_dict)
    loaded = load_checkpoint(ckpt.save(tmp_path / "ckpt"))
    assert loaded.config == ckpt.config and loaded.sha256 == ckpt.sha256
    assert loaded.describe()["reader"] == {"latents": 4, "width": 16, "heads": 2, "layers": 1, "max_tokens": 64,
                                           "pooled_skip": False}
    states = torch.randn(2, 7, 384)
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        want, got = ckpt.build().forward_tokens(states, mask), loaded.build().forward_tokens(states, mask)
    for m in want:
        assert torch.equal(want[m][0], got[m][0]) and torch.equal(want[m][1], got[m][1])

    nudged = dict(ckpt.state_dict)
    nudged["task_reader.latents"] = nudged["task_reader.latents"] + 1e-3
    assert Checkpoint.from_state_dict(ckpt.config, nudged).sha256 != ckpt.sha256

    without = {k: v for k, v in ckpt.state_dict.items() if k != "task_reader.out.0.weight"}
    with pytest.raises(CheckpointError, match=r"with a token reader .*missing keys \[task_reader.out.0.weight\]"):
        Checkpoint.from_state_dict(ckpt.config, without)
    pooled = build_hypernet(reader_config(variant, reader=None)).state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys \[task_reader\..*unexpected keys \[task_encoder\."):
        Checkpoint.from_state_dict(ckpt.config, pooled)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[task_reader\."):  # reader weights, pooled config
        Checkpoint.from_state_dict(reader_config(variant, reader=None), ckpt.state_dict)


def test_a_pooled_skip_starts_as_the_pooled_hypernetwork_and_round_trips(tmp_path):
    """With pooled_skip the first token's state feeds the task code and the reader's part starts at zero: a
    fresh net generates, from token states, exactly what a pooled net with the same trunk and heads generates
    from the first state; once the reader's part moves, the other tokens count. The field is written only
    when set, so a reader config without it keeps its hash."""
    skip = ReaderSpec(latents=4, width=16, heads=2, layers=1, max_tokens=64, pooled_skip=True)
    assert "pooled_skip" not in reader_config().to_dict()["reader"]
    assert reader_config(reader=skip).to_dict()["reader"]["pooled_skip"] is True
    with pytest.raises(ConfigError, match="reader.pooled_skip must be true or false"):
        ReaderSpec(pooled_skip="yes")
    torch.manual_seed(0)
    net = build_hypernet(reader_config(reader=skip))
    pooled = build_hypernet(reader_config(reader=None))
    own = net.state_dict()
    shared = {k: own[k] for k in pooled.state_dict() if k in own}
    shared.update({k: own["task_reader.first." + k.removeprefix("task_encoder.")]
                   for k in pooled.state_dict() if k.startswith("task_encoder.")})
    pooled.load_state_dict(shared)
    states = torch.nn.functional.normalize(torch.randn(3, 6, 384), dim=-1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    with torch.no_grad():
        got, want = net.forward_tokens(states, mask), pooled(states[:, 0])
        for m in want:
            assert torch.allclose(got[m][0], want[m][0], atol=1e-6) and torch.allclose(got[m][1], want[m][1], atol=1e-6)
        net.task_reader.out[1].weight.fill_(1.0)  # the reader's part, once trained, reads the other tokens
        moved = net.forward_tokens(states, mask)
        other = states.clone()
        other[:, 1:] = torch.nn.functional.normalize(torch.randn(3, 5, 384), dim=-1)
        assert not torch.allclose(net.forward_tokens(other, mask)["q_proj"][1], moved["q_proj"][1])
    ckpt = Checkpoint.from_module(net, source="skip")
    loaded = load_checkpoint(ckpt.save(tmp_path / "skip"))
    assert loaded.config.reader.pooled_skip and loaded.sha256 == ckpt.sha256


def test_each_forward_takes_only_its_own_input():
    reader, pooled = build_hypernet(reader_config()), build_hypernet(reader_config(reader=None))
    with pytest.raises(ValueError, match="call forward_tokens"):
        reader(torch.randn(1, 384))
    with pytest.raises(ValueError, match=r"call net\(task_emb\)"):
        pooled.forward_tokens(torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one unmasked token"):
        reader.forward_tokens(torch.randn(2, 3, 384), torch.tensor([[True] * 3, [False] * 3]))


# ------------------------------------------------------------------------------------------- encoding


def test_token_states_are_normalised_padded_and_read_across_windows(generator):
    enc = generator.encoder
    short, long = "Add 3 to the number.", DOCUMENT
    n_long = len(enc.tokenizer(long, add_special_tokens=False)["input_ids"])
    windows = -(-n_long // (WINDOW - 2))
    assert windows >= 3
    states, mask = enc.token_states([short, long], max_tokens=1000)
    assert states.shape == (2, n_long + 2 * windows, 384) and states.dtype == torch.float32
    assert mask[1].all() and 0 < mask[0].sum() < WINDOW and not states[0][~mask[0]].any()
    norms = states[mask].norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 384 ** 0.5))  # l2_sqrt_dim, token by token
    first_window = enc.token_states([long], max_tokens=WINDOW).states[0]  # only the first window is run
    assert first_window.shape == (WINDOW, 384)
    torch.testing.assert_close(first_window, states[1, :WINDOW], atol=1e-5, rtol=1e-5)
    capped = enc.token_states([long], max_tokens=20)
    assert capped.states.shape == (1, 20, 384) and capped.mask.all()


# ---------------------------------------------------------------------------------------- generation


def test_the_reader_follows_token_order(generator):
    """The same token states in another order give another adapter: the reader codes positions (the windows of
    a document restart the encoder's own), so it is not the bag of tokens plain cross-attention would be."""
    states, mask = generator.encoder.token_states(["Reverse the word, then capitalize it."], max_tokens=64)
    perm = torch.cat([torch.tensor([0]), torch.randperm(states.shape[1] - 1, generator=torch.Generator().manual_seed(0)) + 1])
    net = generator.net
    with torch.no_grad():
        code, permuted = net.task_reader(states, mask), net.task_reader(states[:, perm], mask[:, perm])  # (1, D/2)
        adapter = net.forward_tokens(states, mask)["q_proj"][0]
        permuted_adapter = net.forward_tokens(states[:, perm], mask[:, perm])["q_proj"][0]
    # a bag of tokens would differ by float rounding only (~1e-7); an untrained reader moves it by a few percent
    assert (code - permuted).norm() > 1e-3 * code.norm()
    assert (adapter - permuted_adapter).abs().max() > 1e-5
    swapped = generator.generate([TaskInput.task("Reverse the word, then capitalize it."),
                                  TaskInput.task("Capitalize the word, then reverse it.")])
    assert swapped[0].safetensors_bytes() != swapped[1].safetensors_bytes()


def test_padding_in_a_batch_does_not_change_an_input(generator):
    """One forward over a padded batch matches each input alone (masked keys get weight zero), and the
    float32 pipeline is byte-exact: an input's adapter is the same alone or among longer and shorter texts."""
    texts = ["Add 3 to the number.", "Subtract 3 from the number.", DOCUMENT]
    enc, net = generator.encoder, generator.net
    with torch.no_grad():
        batch = net.forward_tokens(*enc.token_states(texts, max_tokens=64))
        for i, text in enumerate(texts):
            alone = net.forward_tokens(*enc.token_states([text], max_tokens=64))
            for m, (a, b) in alone.items():
                torch.testing.assert_close(batch[m][0][i : i + 1], a, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(batch[m][1][i : i + 1], b, atol=1e-5, rtol=1e-4)
    inputs = [TaskInput.task(texts[0]), TaskInput.task(texts[1]), TaskInput.document(texts[2])]
    together = generator.generate(inputs)
    for i, x in enumerate(inputs):
        assert together[i].safetensors_bytes() == generator.generate([x])[0].safetensors_bytes()
    assert together[0].safetensors_bytes() != together[1].safetensors_bytes()


def test_an_embedding_cannot_condition_a_reader_checkpoint(generator, tmp_path, capsys):
    from service.cli import main

    with pytest.raises(InputError, match="ready embedding cannot condition it"):
        generator.generate([TaskInput.from_embedding([0.1] * 384)])
    ckpt = generator.checkpoint.save(tmp_path / "ckpt")
    save_file({"emb": torch.full((384,), 0.1)}, str(tmp_path / "emb.safetensors"))
    capsys.readouterr()
    rc = main(["generate", "--checkpoint", str(ckpt), "--embedding", str(tmp_path / "emb.safetensors"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "ready embedding cannot condition it" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "token states, latents 4, width 16, heads 2, layers 1, max_tokens 64" in out


# ------------------------------------------------------------------------------- SFT --reader, serve


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> dict[str, Path]:
    """tasks.jsonl (five tasks, one held out) and tiny-llama/ (random model + a BPE tokenizer of these texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("reader-base")
    write_task_file(root / "tasks.jsonl")
    corpus = [d for _, ds, _ in TASKS for d in ds] + [f"Input: {w}\nOutput: {fn(w)}" for _, _, fn in TASKS for w in WORDS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), bos_token_id=1, eos_token_id=2, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(root / "tiny-llama")
    fast.save_pretrained(root / "tiny-llama")
    return {"tasks": root / "tasks.jsonl", "llama": root / "tiny-llama"}


SFT_STEPS = 80


@pytest.fixture(scope="module")
def sft_reader(tiny_base, tmp_path_factory) -> Path:
    from service.cli import main

    out = tmp_path_factory.mktemp("sft-reader") / "ckpt"
    argv = ["train", "sft", "--tasks", str(tiny_base["tasks"]), "--base", str(tiny_base["llama"]), "--target-modules",
            "q_proj,v_proj", "--rank", "4", "--alpha", "8", "--steps", str(SFT_STEPS), "--batch-size", "4",
            "--latent", "16", "--head-in", "32", "--lr", "2e-2", "--quiet", "--reader", "--reader-latents", "4",
            "--reader-width", "16", "--reader-heads", "2", "--reader-layers", "1", "--reader-max-tokens", "48"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def test_sft_with_a_reader_lowers_the_loss_and_trains_the_reader(sft_reader, tiny_base):
    from generator.train.conditioning import texts_digest
    from generator.train.sft import zero_b_heads
    from generator.train.tasks import load_tasks, suite_from_tasks

    log = json.loads((sft_reader / "train_log.json").read_text())
    loss = log["loss"]  # means over 10 steps
    assert len(loss) == SFT_STEPS // 10 and loss[-1] < loss[0] - 0.1 and loss[-1] == min(loss), loss
    training = suite_from_tasks(load_tasks(tiny_base["tasks"]), seed=0).training_texts()
    assert log["table"] == {"texts": len(training), "sha256": texts_digest(training)}  # the training table only
    ckpt = load_checkpoint(sft_reader)
    assert ckpt.config.reader == ReaderSpec(latents=4, width=16, heads=2, layers=1, max_tokens=48)
    torch.manual_seed(0)  # what train_sft starts from (--seed 0)
    start = build_hypernet(ckpt.config)
    zero_b_heads(start)
    moved = [k for k, v in start.state_dict().items() if k.startswith("task_reader.") and not torch.equal(v, ckpt.state_dict[k])]
    assert len(moved) > 10  # gradients reach the reader through the trunk


@pytest.mark.parametrize("flags, needle", [
    (["--reader-latents", "4"], "--reader-latents size the token reader; add --reader"),
    (["--reader", "--reader-width", "18", "--reader-heads", "4"], "--reader-width (18) must be a multiple of --reader-heads (4)"),
    (["--reader", "--reader-layers", "0"], "--reader-layers must be a positive integer"),
])
def test_bad_reader_flags_are_one_line(flags, needle, tiny_base, tmp_path, capsys):
    from service.cli import main

    capsys.readouterr()
    rc = main(["train", "sft", "--tasks", str(tiny_base["tasks"]), "--base", str(tiny_base["llama"]),
               "--out", str(tmp_path / "out"), "--steps", "1", "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_train_recon_refuses_a_table_of_the_wrong_kind(tiny_base, tmp_path):
    from generator.train.conditioning import EmbeddingTable, check_table, training_table
    from generator.train.tasks import load_tasks, suite_from_tasks

    suite = suite_from_tasks(load_tasks(tiny_base["tasks"]), seed=0)
    config = reader_config()
    table = training_table(config, suite)
    assert set(table.index) == suite.training_texts() and table.packed.dtype == torch.float16
    states, mask = table(sorted(suite.training_texts())[:3])
    assert states.shape[0] == 3 and mask.any(dim=1).all()
    with pytest.raises(KeyError, match="not in this embedding table"):
        table([next(iter(suite.eval_descriptions["reverse"]))])
    with pytest.raises(InputError, match="condition it through a TokenTable"):
        check_table(config, EmbeddingTable(config.encoder, ["Reverse the word."]))
    with pytest.raises(InputError, match="takes pooled embeddings"):
        check_table(replace(config, reader=None), table)


@pytest.fixture(scope="module")
def server(sft_reader, redis_server, redis_prefix_module, tmp_path_factory):
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module}
    proc = ServiceProcess({"reader": sft_reader}, tmp_path_factory.mktemp("serve") / "serve.log", env)
    yield proc
    proc.stop()


def test_serve_generates_from_text_and_refuses_an_embedding(server, sft_reader):
    from safetensors import safe_open

    r = httpx.post(f"{server.url}/generate", json={"task": "Mirror the letters of the word.", "checkpoint": "reader"},
                   timeout=60)
    assert r.status_code == 200, r.text
    want = LoraGenerator(load_checkpoint(sft_reader)).generate([TaskInput.task("Mirror the letters of the word.")])[0]
    got = safetensors_load(r.content)
    assert got.keys() == want.tensors.keys()
    for k, v in want.tensors.items():  # the server may run more threads: float32 rounding, not meaning, may differ
        torch.testing.assert_close(got[k], v)
    doc = httpx.post(f"{server.url}/generate", json={"document": DOCUMENT, "checkpoint": "reader"}, timeout=60)
    assert doc.status_code == 200, doc.text
    assert doc.content != r.content
    path = Path(server.log_path).with_name("adapter.safetensors")
    path.write_bytes(doc.content)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["adapter_config"])["r"] == 4
    bad = httpx.post(f"{server.url}/generate", json={"embedding": [0.1] * 384, "checkpoint": "reader"}, timeout=60)
    assert bad.status_code == 422, bad.text
    error = bad.json()["error"]
    assert error["type"] == "invalid_input" and error["message"].startswith(
        "checkpoint reader reads the token states of a text (it has a token reader), so a ready embedding cannot")
