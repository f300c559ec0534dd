"""TaskEncoder against the real packaged all-MiniLM-L6-v2 (E=384), offline, no mocks."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: never touch the network

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from generator.config import EncoderSpec
from generator.encoder import TaskEncoder, packaged_minilm_dir
from generator.errors import EncoderError, InputError

E = 384
SQRT_E = math.sqrt(E)

SENTENCES = [
    "The committee reviewed the quarterly budget and postponed the vote until spring.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "She tuned the old violin carefully before the evening concert began.",
    "Rivers carve canyons over millions of years through slow and steady erosion.",
    "A binary search halves the remaining interval at every comparison it makes.",
    "The bakery on the corner sells sourdough loaves with a crisp dark crust.",
    "Volcanic islands often form above hotspots deep within the Earth's mantle.",
    "Translate each paragraph into French while keeping the original tone intact.",
    "The detective noticed muddy footprints leading away from the greenhouse door.",
    "Compound interest grows savings faster than simple interest over long periods.",
    "Migratory birds navigate using the magnetic field and the position of the stars.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
]


@pytest.fixture(scope="module")
def enc() -> TaskEncoder:
    return TaskEncoder.load(EncoderSpec())


def variant(enc: TaskEncoder, **changes) -> TaskEncoder:
    """The same loaded MiniLM under another spec (no reload)."""
    spec = EncoderSpec(**{**enc.spec.__dict__, **changes})
    return TaskEncoder(spec, enc.tokenizer, enc.model)


def long_document(n_words: int = 3000) -> str:
    words, i = [], 0
    while len(words) < n_words:
        s = SENTENCES[i % len(SENTENCES)]
        words += f"Part {i}: {s}".split()  # the counter keeps repeated sentences from being identical
        i += 1
    return " ".join(words)


# ------------------------------------------------------------------------------------------------ loading


def test_loads_packaged_minilm_offline(enc):
    assert packaged_minilm_dir() is not None
    assert enc.dim == E
    assert enc.window == 512
    assert not enc.model.training
    assert next(enc.model.parameters()).dtype == torch.float32
    out = enc.encode(["summarise the article"])
    assert out.shape == (1, E) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()


def test_short_name_resolves_to_package(enc):
    other = TaskEncoder.load(EncoderSpec(name="all-MiniLM-L6-v2"))
    assert torch.equal(other.encode(["classify sentiment"]), enc.encode(["classify sentiment"]))


def test_local_directory_load_equals_packaged(enc):
    local = TaskEncoder.load(EncoderSpec(name=str(packaged_minilm_dir())))
    texts = ["solve the math word problem", "write a haiku about autumn"]
    torch.testing.assert_close(local.encode(texts), enc.encode(texts), atol=1e-6, rtol=0)


def test_remote_code_needs_opt_in():
    spec = EncoderSpec(requires_remote_code=True)
    with pytest.raises(EncoderError, match="trust_remote_code") as e:
        TaskEncoder.load(spec)
    assert "--trust-remote-code" in str(e.value) and "LORAGEN_TRUST_REMOTE_CODE=1" in str(e.value)
    assert TaskEncoder.load(spec, trust_remote_code=True).dim == E  # the opt-in lets it load


def test_missing_local_dir(tmp_path):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(EncoderError, match="does not exist") as e:
        TaskEncoder.load(EncoderSpec(name=str(missing)))
    assert str(missing) in str(e.value)


def test_dir_without_weights(tmp_path):
    src = packaged_minilm_dir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, tmp_path / f)
    with pytest.raises(EncoderError, match="cannot load encoder") as e:
        TaskEncoder.load(EncoderSpec(name=str(tmp_path)))
    assert "\n" not in str(e.value)


def test_uncached_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError, match="no-such-org/no-such-encoder"):
        TaskEncoder.load(EncoderSpec(name="no-such-org/no-such-encoder"))


def test_dim_mismatch():
    with pytest.raises(EncoderError, match="384-dim.*dim=1024"):
        TaskEncoder.load(EncoderSpec(dim=1024))


def test_max_length_beyond_positions(enc):
    with pytest.raises(EncoderError, match="max_length"):
        variant(enc, max_length=4096)


# ---------------------------------------------------------------------------------------- preprocessing


def test_normalizations(enc):
    text = ["answer the trivia question"]
    x = enc.encode(text)
    assert abs(x.norm().item() - SQRT_E) < 1e-4
    unit = variant(enc, normalization="l2").encode(text)
    assert abs(unit.norm().item() - 1.0) < 1e-5
    torch.testing.assert_close(unit * SQRT_E, x, atol=1e-5, rtol=0)
    raw = variant(enc, normalization="none").encode(text)
    assert abs(raw.norm().item() - 1.0) > 1e-2 and abs(raw.norm().item() - SQRT_E) > 1e-2
    torch.testing.assert_close(F.normalize(raw, dim=-1), unit, atol=1e-6, rtol=0)


def test_cls_vs_mean_pooling(enc):
    text = "translate english to german"
    cls = enc.encode_one(text)
    mean = variant(enc, pooling="mean", normalization="l2").encode_one(text)
    assert (F.normalize(cls, dim=-1) - mean).abs().max() > 1e-2
    # mean pooling by hand over the full-stopped text (includes [CLS]/[SEP], as sentence-transformers does)
    batch = enc.tokenizer([text + "."], return_tensors="pt")
    with torch.inference_mode():
        h = enc.model(**batch).last_hidden_state[0]  # [T, E]
    torch.testing.assert_close(mean, F.normalize(h.mean(0), dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls, F.normalize(h[0], dim=-1) * SQRT_E, atol=1e-4, rtol=0)


def test_full_stop(enc):
    torch.testing.assert_close(enc.encode_one("answer math"), enc.encode_one("answer math."), atol=0, rtol=0)
    no_stop = variant(enc, append_full_stop=False)
    assert (no_stop.encode_one("answer math") - enc.encode_one("answer math")).abs().max() > 1e-3
    assert enc.preprocess(["answer math", "ends with digit 7", "already done.", "why?"]) == [
        "answer math.", "ends with digit 7", "already done.", "why?",
    ]
    torch.testing.assert_close(
        enc.encode_one("ends with digit 7"), no_stop.encode_one("ends with digit 7"), atol=0, rtol=0
    )


def test_whitespace_stripped(enc):
    torch.testing.assert_close(
        enc.encode_one("  \n\tsummarise the text \n "), enc.encode_one("summarise the text"), atol=0, rtol=0
    )


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_text_rejected(enc, bad):
    with pytest.raises(InputError, match="index 1"):
        enc.encode(["fine", bad])


def test_bad_inputs(enc):
    with pytest.raises(InputError, match="encode_one"):
        enc.encode("a single string")
    with pytest.raises(InputError, match="index 0"):
        enc.encode([3])
    with pytest.raises(InputError, match="batch_size"):
        enc.encode(["x"], batch_size=0)
    assert enc.encode([]).shape == (0, E)


# -------------------------------------------------------------------------------------------- batching


def test_batch_equals_singles(enc):
    texts = ["a", "classify the sentiment of movie reviews", "sum 2 and 3", SENTENCES[0], "  hi  "]
    for batch_size in (32, 2):
        batched = enc.encode(texts, batch_size=batch_size)
        singles = torch.stack([enc.encode_one(t) for t in texts])
        torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    mean = variant(enc, pooling="mean")
    torch.testing.assert_close(
        mean.encode(texts), torch.stack([mean.encode_one(t) for t in texts]), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------------------- long documents


def test_short_text_is_one_unchanged_chunk(enc):
    chunks, owners = enc.chunk(["find the capital of France."])
    assert owners == [0]
    assert chunks == [enc.tokenizer("find the capital of France.")["input_ids"]]


def test_long_document(enc):
    doc = long_document()
    assert len(doc.split()) >= 3000
    x = enc.encode_one(doc)
    assert x.shape == (E,) and torch.isfinite(x).all()
    assert abs(x.norm().item() - SQRT_E) < 1e-4

    # recompute by hand: cut content tokens into windows of 512 - [CLS] - [SEP], embed each one alone
    tok = enc.tokenizer
    assert doc.endswith(".")  # so preprocessing leaves it as is
    ids = tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
    size = enc.window - 2
    pieces = [ids[i : i + size] for i in range(0, len(ids), size)]
    assert len(pieces) > 5 and all(len(p) <= size for p in pieces)
    chunks, owners = enc.chunk(enc.preprocess([doc]))
    assert chunks == [[tok.cls_token_id, *p, tok.sep_token_id] for p in pieces] and set(owners) == {0}
    with torch.inference_mode():
        pooled = torch.stack(
            [enc.model(input_ids=torch.tensor([c])).last_hidden_state[0, 0] for c in chunks]
        )  # [C, E]
    w = torch.tensor([len(p) for p in pieces], dtype=torch.float32)
    manual = (pooled * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(x, F.normalize(manual, dim=0) * SQRT_E, atol=1e-4, rtol=0)

    # in a batch with short texts it gives the same row, and the short ones are unaffected
    batch = enc.encode(["rank the search results", doc, "write a limerick"])
    torch.testing.assert_close(batch[1], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[0], enc.encode_one("rank the search results"), atol=1e-5, rtol=0)


def test_small_max_length_chunks(enc):
    small = variant(enc, max_length=16)
    assert small.window == 16
    text = " ".join(SENTENCES[:3])
    chunks, owners = small.chunk([text])
    assert len(chunks) > 2 and all(len(c) <= 16 for c in chunks) and set(owners) == {0}
    x = small.encode_one(text)
    assert abs(x.norm().item() - SQRT_E) < 1e-4
    assert (x - enc.encode_one(text)).abs().max() > 1e-3  # windows of 16 see less context than 512
