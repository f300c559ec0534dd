"""The Doc-to-LoRA kind on the other base families loragen promises besides Qwen3: Gemma 2, Mistral and Llama.

tests/test_d2l_reference.py checks D2L stage by stage against the reference's own outputs, but only for a Qwen3
base. These families differ where the context encoder and the export could go wrong: Gemma 2 scales its
embeddings by sqrt(hidden), normalizes with 1 + w, caps its attention and final logits with tanh, alternates
sliding and full attention layers, and its chat template refuses a system turn; Mistral has sliding attention
and a template without a generation prompt; Llama is the plain case. For each family a tiny random base is built
from its transformers config class, with a byte-level BPE tokenizer trained here and a chat template in the
family's style, plus a random D2L checkpoint for it (every parameter seeded noise, the B side included, so that
adapters are not zero). Then:

  - the chat template's affixes are the family's turn markers, and Gemma's refused system turn is dropped;
  - the context encoder's activations equal an independent computation with transformers' own
    `output_hidden_states` on a separate copy of the full model (input of every layer, the final norm of the
    last layer's input), on a batch of two chunks of different lengths, and its last layer never runs;
  - the exported adapter loaded by PEFT gives the logits of the base with D2L's update
    y = W x + alpha * (x A^T) B applied by hand from the generator's (A, B);
  - a base of another size is refused.

Real models and real PEFT, no mocks, no network.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from generator.adapter import padded_rank
from generator.checkpoint import Checkpoint
from generator.config import modules_for_base
from generator.d2l import context
from generator.d2l.config import D2LConfig, PerceiverSpec
from generator.d2l.generator import DocLoraGenerator
from generator.d2l.hypernet import D2LHypernet
from generator.errors import CheckpointError, InputError
from generator.pipeline import TaskInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = ("The lighthouse keeper of Varn island lit the lamp every evening at seven. In the winter of the great storm "
       "the keeper rowed to the mainland for oil, and the harbour master wrote the crossing into the log book.")
QUERY = "When did the keeper light the lamp?"
CHUNK_TOKENS = 40  # DOC is about 50 tokens with the template: two chunks of different lengths
SLIDING = 8  # shorter than a chunk, so that the sliding-window layers of Gemma 2 and Mistral see a window
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)
TARGETS = ["down_proj", "q_proj"]
PARENT = {"down_proj": "mlp", "q_proj": "self_attn"}  # where each target Linear sits in a decoder layer
R = 4

# chat templates in each family's style (trimmed from the real ones, same turn markers and system handling)
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
         " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
           "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
           "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
           "{%- if loop.last and system_message is defined %}"
           "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
           "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
           "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
           "{%- endfor %}")


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]  # pad, eos, bos first, then the template's markers
    template: str
    prefix: str  # what the template puts before a document, and after it
    suffix: str


FAMILIES = {
    "gemma2": Family("gemma2", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), GEMMA,
                     "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": Family("mistral", ("<pad>", "</s>", "<s>", "[INST]", "[/INST]"), MISTRAL, "<s>[INST] \n\n", "[/INST]"),
    "llama": Family("llama", ("<|finetune_right_pad_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>"), LLAMA,
                    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n",
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def build_tokenizer(family: Family):
    """Byte-level BPE trained on this file's texts, the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [DOC, QUERY, "user model assistant system"] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=list(family.specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    pad, eos, bos, *markers = family.specials
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   additional_special_tokens=markers, chat_template=family.template)


def base_config(family: str, vocab_size: int, **changes):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    ids = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma2":  # softcaps small enough for tanh to bend the tiny model's values
        return Gemma2Config(**TINY, **ids, sliding_window=SLIDING, final_logit_softcapping=0.3,
                            attn_logit_softcapping=0.05, query_pre_attn_scalar=16, **changes)
    if family == "mistral":
        return MistralConfig(**TINY, **ids, sliding_window=SLIDING, tie_word_embeddings=False, **changes)
    return LlamaConfig(**TINY, **ids, tie_word_embeddings=False, **changes)


def noisy_hypernet(config: D2LConfig, seed: int) -> D2LHypernet:
    """Every parameter seeded noise as in tests/fixtures/d2l-reference/README.md: norms 1 + 0.2 N, linear weights
    N / sqrt(fan_in), biases 0.2 N, latent queries N, head 0.012 N, bias LoRA 0.01 N, scaler_A 1 + 0.2 N and
    scaler_B 0.5 + 0.2 N (the reference starts scaler_B and bias_B at zero: every update would be zero)."""
    net = D2LHypernet(config)
    norms = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, torch.nn.LayerNorm)
             or type(m).__name__ == "RMSNorm"}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            n = torch.randn(p.shape, generator=g)
            if name.startswith("scaler_A."):
                value = 1 + 0.2 * n
            elif name.startswith("scaler_B."):
                value = 0.5 + 0.2 * n
            elif name.startswith(("bias_A.", "bias_B.")):
                value = 0.01 * n
            elif name == "head.weight":
                value = 0.012 * n
            elif name.endswith("latents_q"):
                value = n
            elif name in norms:
                value = 1 + 0.2 * n
            elif name.endswith(".bias"):
                value = 0.2 * n
            elif p.dim() == 2:  # nn.Linear (d_out, d_in)
                value = n / math.sqrt(p.shape[1])
            else:
                assert p.dim() == 3, name  # per-layer weight (L, d_in, d_out)
                value = n / math.sqrt(p.shape[1])
            p.copy_(value)
    return net


@dataclass
class Base:
    family: Family
    path: Path
    config: object  # the transformers config it was built from
    checkpoint: Checkpoint
    gen: DocLoraGenerator


@pytest.fixture(scope="module", params=list(FAMILIES))
def base(request, tmp_path_factory) -> Base:
    """A tiny random base of the family saved with its tokenizer, a random D2L checkpoint for it, the generator."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    family = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(family.name)
    tok = build_tokenizer(family)
    cfg = base_config(family.name, len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from their init, so that w vs 1 + w matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    d2l = D2LConfig(base_model=str(path), n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                    modules=tuple(sorted(modules_for_base(cfg, TARGETS), key=lambda m: m.name)), r=R,
                    lora_alpha=2 * R**1.5, latent=32, perceiver=PerceiverSpec(latent_queries=4, blocks=1))
    ckpt = Checkpoint.from_state_dict(d2l, noisy_hypernet(d2l, seed=1236).state_dict())
    gen = DocLoraGenerator(ckpt, base_dir=path, chunk_tokens=CHUNK_TOKENS)
    return Base(family, path, cfg, ckpt, gen)


def fresh_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---- the chat template ----

def test_affixes_are_the_familys_turn_markers_and_gemma_drops_the_system_turn(base):
    tok, family = base.gen.base.tokenizer, base.family
    rendered = context.render(tok, f"  {DOC}\n")
    assert rendered == family.prefix + DOC + family.suffix
    system = [{"role": "system", "content": ""}, {"role": "user", "content": DOC}]
    if family.name == "gemma2":  # the template itself refuses the system turn; render falls back to the user turn
        with pytest.raises(Exception, match="System role not supported"):
            tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    else:
        assert tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == rendered

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    assert list(base.gen.affixes.prefix) == ids(family.prefix)
    assert list(base.gen.affixes.suffix) == ids(family.suffix)
    assert context.tokenize(tok, DOC) == ids(rendered)


# ---- the context encoder ----

def test_activations_equal_the_full_models_hidden_states_and_the_last_layer_never_runs(base):
    gen, cfg = base.gen, base.config
    n_layers = cfg.num_hidden_layers
    chunks = gen.chunks(DOC)
    assert len(chunks) == 2 and len(chunks[0]) != len(chunks[1]), [len(c) for c in chunks]
    assert min(len(c) for c in chunks) > SLIDING

    calls = {"last": 0, "before_last": 0}
    layers = gen.base.model.model.layers
    hooks = [layers[-1].register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1)),
             layers[-2].register_forward_hook(lambda *_: calls.__setitem__("before_last", calls["before_last"] + 1))]
    try:
        acts, mask = gen.activations(chunks)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"last": 0, "before_last": 1}  # the layer before it did run: the hooks work

    # independently: right-padded ids, then transformers' own hidden states of a separate copy of the full model
    s = max(len(c) for c in chunks)
    ids = torch.tensor([c + [gen.base.tokenizer.pad_token_id] * (s - len(c)) for c in chunks])
    valid = torch.tensor([[1] * len(c) + [0] * (s - len(c)) for c in chunks])
    assert torch.equal(mask.long(), valid)
    ref = fresh_model(base.path)
    with torch.no_grad():
        hidden = ref.model(input_ids=ids, attention_mask=valid, output_hidden_states=True).hidden_states
        assert len(hidden) == n_layers + 1  # hidden[l], l < L: the input of layer l
        expected = torch.stack([*hidden[: n_layers - 1], ref.model.norm(hidden[n_layers - 1])], dim=1)
        embedded = ref.model.embed_tokens.weight[ids]
    assert acts.shape == expected.shape == (2, n_layers, s, cfg.hidden_size)
    keep = valid.bool()[:, None, :, None].expand_as(acts)
    assert (acts - expected).abs()[keep].max().item() <= 1e-5
    # entry 0 is the embedding as the model scales it: sqrt(hidden) for Gemma 2, as is for the others
    scale = math.sqrt(cfg.hidden_size) if base.family.name == "gemma2" else 1.0
    assert (acts[:, 0] - embedded * scale).abs()[keep[:, 0]].max().item() <= 1e-5


# ---- the export ----

def test_the_peft_adapter_reproduces_d2ls_update(base, tmp_path):
    from peft import PeftModel

    gen, config = base.gen, base.checkpoint.config
    n_chunks = len(gen.chunks(DOC))
    rank = config.combined_rank(n_chunks)
    (adapter,) = gen.generate([TaskInput.document(DOC)])
    assert adapter.config["r"] == padded_rank(rank) > rank  # zero padding is part of what PEFT loads
    adapter.save_pretrained(tmp_path / "lora")
    lora = gen.lora(DOC)
    query = gen.base.tokenizer(QUERY, return_tensors="pt", add_special_tokens=False)["input_ids"]

    plain = fresh_model(base.path)
    with torch.no_grad():
        logits_base = plain(query).logits
    alpha = config.lora_alpha
    hooks = []
    for m in config.modules:
        a, b = lora[m.name]  # (L, R, d_in), (L, R, d_out), rank-major
        assert a.shape == (config.n_layers, rank, m.d_in) and b.shape == (config.n_layers, rank, m.d_out)
        for layer in range(config.n_layers):
            target = getattr(getattr(plain.model.layers[layer], PARENT[m.name]), m.name)
            assert isinstance(target, torch.nn.Linear) and (target.in_features, target.out_features) == (m.d_in, m.d_out)

            def add(_module, args, out, a=a[layer], b=b[layer]):
                return out + alpha * ((args[0] @ a.T) @ b)

            hooks.append(target.register_forward_hook(add))
    with torch.no_grad():
        logits_manual = plain(query).logits
    for h in hooks:
        h.remove()

    peft = PeftModel.from_pretrained(fresh_model(base.path), tmp_path / "lora").eval()
    with torch.no_grad():
        logits_peft = peft(query).logits
    assert (logits_peft - logits_manual).abs().max().item() <= 2e-5
    change = (logits_manual - logits_base).abs().max().item()
    assert change > 100 * 2e-5, change  # the adapter does something, well beyond the tolerance
    if base.family.name == "gemma2":  # the comparison runs through both softcaps, in their non-linear range
        cap = plain.config.final_logit_softcapping
        assert cap is not None and logits_base.abs().max().item() > 0.5 * cap
        assert plain.config.attn_logit_softcapping is not None and plain.config._attn_implementation != "sdpa"


# ---- a base of another size ----

@pytest.mark.parametrize("change", [{"intermediate_size": 96}, {"num_attention_heads": 2}, {"num_hidden_layers": 4}],
                         ids=lambda c: next(iter(c)))
def test_a_base_of_another_size_is_refused(base, tmp_path, change):
    other = tmp_path / "other-base"
    shutil.copytree(base.path, other)
    cfg = json.loads((other / "config.json").read_text())
    if "num_hidden_layers" in change:
        cfg.pop("layer_types", None)  # Gemma 2 lists one per layer; transformers derives them again
    (other / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match="does not match the checkpoint"):
        DocLoraGenerator(base.checkpoint, base_dir=other)


def test_a_config_that_contradicts_itself_is_a_checkpoint_error(base, tmp_path):
    """A config.json transformers refuses for its own reasons (here one more layer than `layer_types` lists, which
    Gemma 2 validates) is a CheckpointError naming the file, not an exception of huggingface_hub's."""
    other = tmp_path / "broken-base"
    shutil.copytree(base.path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    cfg["layer_types"] = ["full_attention"] * (cfg["num_hidden_layers"] - 1)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json|does not match the checkpoint"):
        DocLoraGenerator(base.checkpoint, base_dir=other)


def test_a_template_that_refuses_a_system_turn_in_other_words_reads_the_user_turn_alone():
    """Mistral-7B-Instruct's template refuses any system turn with "Conversation roles must alternate": the
    document is then read as the user turn alone, as with Gemma's "System role not supported"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent / "fixtures" / "d2l-reference" / "tiny-random"
                                        / "qwen3-d2l")
    tok.chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}")
    assert context.render(tok, "  Paris is in France. ") == f"{tok.bos_token or ''}[INST] Paris is in France. [/INST]"
    tok.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(InputError, match="cannot render a document as a user turn: no chat here"):
        context.render(tok, "x")
