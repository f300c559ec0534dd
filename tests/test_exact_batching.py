"""float32 batches exactly: one forward pass for a whole batch, and every adapter's bytes identical to generating
its input alone, whatever it was batched with (batches of 1, 3 and 16; every variant; texts and embeddings;
pooled and token-reader checkpoints; head products split into several column blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load

from generator.config import EncoderSpec, HyperConfig, ModuleSpec, ReaderSpec
from generator.exact import exact_block, exact_linear
from generator.hypernet import build_hypernet
from generator.pipeline import LoraGenerator, TaskInput
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

E = 1024  # a task code made from a 1024-wide embedding: as a batch of one, a matrix-vector product
SMALL_BLOCKS = 4096  # bytes of head weights per exact product: several column blocks, the last one partial


def config(variant: str, reader: ReaderSpec | None = None, e: int = E) -> HyperConfig:
    return HyperConfig(variant=variant, task_emb_dim=e, latent=32, head_in=64, n_layers=3,
                       modules=(ModuleSpec("q_proj", 88, 88), ModuleSpec("v_proj", 88, 44)), r=4,
                       encoder=EncoderSpec(dim=e), base_model="tiny-random/llama", reader=reader)


def generator(variant: str, reader: ReaderSpec | None = None, e: int = E) -> LoraGenerator:
    from generator.checkpoint import Checkpoint

    torch.manual_seed(7)
    gen = LoraGenerator(Checkpoint.from_module(build_hypernet(config(variant, reader, e))))
    gen.net.exact_block_bytes = SMALL_BLOCKS
    return gen


def embeddings(n: int, e: int = E, seed: int = 0) -> list[TaskInput]:
    g = torch.Generator().manual_seed(seed)
    return [TaskInput.from_embedding(torch.randn(e, generator=g)) for _ in range(n)]


class Forwards:
    """Counts the hypernetwork's forward passes and the batch each one took (a forward hook of torch's own)."""

    def __init__(self, gen: LoraGenerator):
        self.batches: list[int] = []
        gen.net.register_forward_hook(lambda _m, args, _out: self.batches.append(args[0].shape[0]))


@pytest.mark.parametrize("variant", ["L", "M", "S"])
def test_float32_batches_of_1_3_16_equal_each_input_alone(variant):
    gen = generator(variant)
    assert gen.batch_invariant and gen.exact_batching
    heads = list(gen.net.heads.values())
    assert all(exact_block(h, SMALL_BLOCKS) < h.out_features for h in heads)  # several blocks per head
    assert any(h.out_features % exact_block(h, SMALL_BLOCKS) for h in heads)  # and a partial last one
    items = embeddings(16)
    alone = [gen.generate([x])[0].safetensors_bytes() for x in items]
    forwards = Forwards(gen)
    for b in (1, 3, 16):
        batch = gen.generate(items[:b])
        assert [a.safetensors_bytes() for a in batch] == alone[:b], f"batch of {b}"
    assert forwards.batches == [1, 3, 16]  # one forward pass per batch, not one per input
    assert len(set(alone)) == 16  # sixteen different adapters: the comparison has teeth


def test_an_input_is_the_same_in_every_position_and_company():
    gen = generator("L")
    items = embeddings(16, seed=1)
    want = gen.generate([items[5]])[0].safetensors_bytes()
    for batch in (items[5:8], items[3:6], [items[9], items[5], items[0]], items[::-1], [items[5]] * 3):
        got = [a.safetensors_bytes() for a in gen.generate(batch)]
        assert all(g == want for g, x in zip(got, batch, strict=True) if x is items[5])


def test_the_exact_forward_computes_what_the_plain_forward_does():
    """Only the rounding may differ: the same arithmetic, in another grouping."""
    gen = generator("M")
    emb = torch.stack([torch.tensor(x.embedding) for x in embeddings(5, seed=2)])
    with torch.inference_mode():
        exact, plain = gen.net(emb, exact=True), gen.net(emb)
    for m in plain:
        for got, want in zip(exact[m], plain[m], strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_exact_linear_is_each_input_alone_for_any_batch_and_block():
    torch.manual_seed(3)
    lin = torch.nn.Linear(48, 200)
    xs = [torch.randn(5, 48) for _ in range(17)]
    with torch.inference_mode():
        for block_bytes in (48 * 4 * 64, 48 * 4 * 128, 1 << 30):  # 64, 128 and all 200 columns per product
            alone = [exact_linear(lin, [x], block_bytes)[0] for x in xs]
            for b in (1, 3, 16, 17):
                out = exact_linear(lin, xs[:b], block_bytes)
                assert all(torch.equal(out[i], alone[i]) for i in range(b))
            torch.testing.assert_close(torch.stack(alone), F.linear(torch.stack(xs), lin.weight, lin.bias))


def test_texts_are_encoded_alone_in_a_batch():
    """A text's embedding must not depend on the padding its batch needs: texts of very different lengths."""
    gen = LoraGenerator(tiny_checkpoint("L", seed=4, e=384))
    gen.net.exact_block_bytes = SMALL_BLOCKS
    texts = [TaskInput.task("Reverse the word."), TaskInput.document(" ".join(["Write each letter twice."] * 40)),
             TaskInput.task("Give the first letter of the word, then the last one, then the word in capitals.")]
    alone = [gen.generate([x])[0].safetensors_bytes() for x in texts]
    assert [a.safetensors_bytes() for a in gen.generate(texts)] == alone
    mixed = [texts[1], *embeddings(2, e=384, seed=5), texts[0]]
    got = [a.safetensors_bytes() for a in gen.generate(mixed)]
    assert got[0] == alone[1] and got[3] == alone[0]


def test_a_token_reader_batch_equals_each_text_alone():
    reader = ReaderSpec(latents=4, width=16, heads=2, layers=1, max_tokens=64)
    gen = generator("S", reader=reader, e=384)  # the default encoder: the packaged all-MiniLM-L6-v2, offline
    texts = [TaskInput.task("Reverse the word."), TaskInput.task("Write every letter of the word twice, in order."),
             TaskInput.document("A longer note. " * 12)]
    alone = [gen.generate([x])[0].safetensors_bytes() for x in texts]
    forwards: list[tuple[int, ...]] = []
    gen.net.task_reader.register_forward_hook(lambda _m, args, _out: forwards.append(tuple(args[0].shape[:2])))
    assert [a.safetensors_bytes() for a in gen.generate(texts)] == alone
    assert len(forwards) == 3 and all(b == 1 for b, _ in forwards)  # each text read alone ...
    assert len({t for _, t in forwards}) == 3  # ... at its own length, unpadded


def test_bfloat16_still_batches_the_plain_math():
    """bfloat16 is the fast mode: one plain forward per batch, close to but not always bit-equal with alone."""
    from generator.checkpoint import Checkpoint

    torch.manual_seed(7)
    gen = LoraGenerator(Checkpoint.from_module(build_hypernet(config("L"))), compute_dtype=torch.bfloat16)
    assert not gen.batch_invariant
    calls: list[bool] = []
    gen.net.register_forward_hook(lambda _m, args, kwargs, _out: calls.append(kwargs.get("exact", False)),
                                  with_kwargs=True)
    gen.generate(embeddings(4))
    assert calls == [False]


def test_the_one_at_a_time_path_gives_the_same_bytes():
    """exact_batching False (what the benchmarks compare against) runs each input as its own plain forward."""
    gen = generator("L")
    items = embeddings(3, seed=6)
    batched = [a.safetensors_bytes() for a in gen.generate(items)]
    gen.exact_batching = False
    forwards = Forwards(gen)
    one_by_one = [a.safetensors_bytes() for a in gen.generate(items)]
    assert forwards.batches == [1, 1, 1]
    for got, want in zip(one_by_one, batched, strict=True):  # another kernel path: equal up to rounding
        a, b = load(got), load(want)
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
