"""Stacking adapters (generator/stack.py) and everything that offers it: POST /v1/adapters/combine on a real
`loragen serve` over a real Redis, `Client.combine` / `AsyncClient.combine`, and `loragen combine`.

The maths is checked where it matters, in PEFT: a stacked adapter loaded with `PeftModel.from_pretrained` onto a
tiny random Llama gives the logits of the base model with every source's weighted update added by hand.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import math
import re
import tarfile

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load
from transformers import LlamaConfig, LlamaForCausalLM

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, lora_config_dict, peft_key, read_safetensors_metadata
from generator.config import ModuleSpec, modules_for_base
from generator.errors import InputError
from generator.stack import MAX_STACK, stack_adapters
from loragen import AsyncClient, Client, InvalidInput, NotFound
from service.cli import main
from tests.helpers import tiny_checkpoint
from tests.service_server import ServiceProcess
from tests.test_peft_roundtrip import recorded_warnings
from tests.test_service import assert_error

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, max_position_embeddings=32)
QV = modules_for_base(BASE, ["q_proj", "v_proj"])  # q 32→32, v 32→16: the modules of tests.helpers.tiny_checkpoint
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2]])
ID = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------------- helpers


def lora_file(r: int, alpha: float, rslora: bool, seed: int, *, dtype=torch.float32, modules=QV, n_layers: int = 2,
              base: str = "tiny-random/llama", **config) -> bytes:
    """A random adapter's safetensors bytes, its PEFT config in its metadata (as loragen writes it); `config`
    overrides fields of that config."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(n_layers):
        for m in modules:
            tensors[peft_key(layer, m, "A")] = (0.3 * torch.randn(r, m.d_in, generator=g)).to(dtype)
            tensors[peft_key(layer, m, "B")] = (0.3 * torch.randn(m.d_out, r, generator=g)).to(dtype)
    cfg = lora_config_dict(base, None, r, alpha, rslora, [m.name for m in modules]) | config
    return LoraAdapter(tensors, cfg, {}).safetensors_bytes()


def peft_model(base, raw: bytes, tmp_path):
    """`base` (copied) with the adapter file `raw` loaded by PEFT, from a PEFT directory made of the file and the
    config in its metadata; no missing-key or other warning allowed."""
    out = tmp_path / f"peft-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    (out / ADAPTER_WEIGHTS).write_bytes(raw)
    (out / ADAPTER_CONFIG).write_text(read_safetensors_metadata(raw)["adapter_config"])
    with recorded_warnings() as warned:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert not warned, warned
    return model


def merged_by_hand(base, files: list[bytes], weights: list[float]):
    """A copy of `base` with W += sum_i w_i s_i B_i A_i for every (layer, module), in float64."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for raw, w in zip(files, weights, strict=True):
            cfg = json.loads(read_safetensors_metadata(raw)["adapter_config"])
            scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
            tensors = load(raw)
            for layer in range(BASE.num_hidden_layers):
                for m in QV:
                    a, b = tensors[peft_key(layer, m, "A")].double(), tensors[peft_key(layer, m, "B")].double()
                    linear = getattr(merged.model.layers[layer].self_attn, m.name)
                    linear.weight.copy_((linear.weight.double() + w * scaling * (b @ a)).float())
    return merged


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(BASE).float().eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# ---------------------------------------------------------------------------------------------------- the maths


def test_stacked_adapter_in_peft_equals_the_weighted_sum_of_updates(base, tmp_path):
    one = lora_file(2, 4, False, seed=1)  # scaling 4/2
    two = lora_file(3, 6, True, seed=2)  # rsLoRA: scaling 6/sqrt(3)
    stacked = stack_adapters([one, two], [1.0, 0.5])
    assert stacked.config["r"] == 8 and stacked.config["lora_alpha"] == 8 and not stacked.config["use_rslora"]
    a = stacked.tensors[peft_key(0, QV[0], "A")]
    assert a.shape == (8, 32) and not a[5:].any()  # rank 5, zero-padded to vLLM's 8
    assert stacked.provenance["kind"] == "stack" and stacked.provenance["rank"] == "5"
    assert json.loads(stacked.provenance["weights"]) == [1.0, 0.5]
    assert all(ID.fullmatch(s) for s in json.loads(stacked.provenance["sources"]))  # sha256 of each file

    got = logits(peft_model(base, stacked.safetensors_bytes(), tmp_path))
    expected = logits(merged_by_hand(base, [one, two], [1.0, 0.5]))
    assert (expected - logits(base)).abs().max() > 1e-2  # the updates do change the output
    assert (got - expected).abs().max() < 1e-5


def test_a_zero_weight_adapter_leaves_the_other_ones_update(base, tmp_path):
    one, two = lora_file(2, 16, True, seed=3), lora_file(4, 8, False, seed=4)
    stacked = stack_adapters([one, two], [1.0, 0.0], ids=["one", "two"])
    assert json.loads(stacked.provenance["sources"]) == ["one", "two"]
    alone = logits(peft_model(base, one, tmp_path))
    assert (logits(peft_model(base, stacked.safetensors_bytes(), tmp_path)) - alone).abs().max() < 1e-5
    src = load(one)
    for layer in range(2):
        for m in QV:
            delta = stacked.tensors[peft_key(layer, m, "B")] @ stacked.tensors[peft_key(layer, m, "A")]
            by_hand = 16 / math.sqrt(2) * src[peft_key(layer, m, "B")] @ src[peft_key(layer, m, "A")]
            torch.testing.assert_close(delta, by_hand, rtol=1e-5, atol=1e-6)


def test_output_dtype_is_the_sources_common_one_else_float32():
    bf16 = [lora_file(2, 4, False, seed=s, dtype=torch.bfloat16) for s in (5, 6)]
    assert {t.dtype for t in stack_adapters(bf16, [1, 1]).tensors.values()} == {torch.bfloat16}
    mixed = stack_adapters([bf16[0], lora_file(2, 4, False, seed=7)], [1, 1])
    assert {t.dtype for t in mixed.tensors.values()} == {torch.float32} and mixed.provenance["dtype"] == "float32"
    asked = stack_adapters(bf16, [1, 2], dtype="float16")
    assert {t.dtype for t in asked.tensors.values()} == {torch.float16}
    # A is copied as is; B is w * s * B rounded once from float64: in bfloat16 with w * s = 2, exact too
    stacked, src = stack_adapters(bf16, [1, 1]), load(bf16[0])
    key_a, key_b = peft_key(1, QV[1], "A"), peft_key(1, QV[1], "B")
    assert stacked.tensors[key_a][:2].equal(src[key_a]) and stacked.tensors[key_b][:, :2].equal(2 * src[key_b])


# ---------------------------------------------------------------------------------------------------- refusals


GOOD = lora_file(2, 4, False, seed=10)
REFUSED = {
    "base model": (lora_file(2, 4, False, seed=11, base="tiny-random/other"), "different base models"),
    "revision": (lora_file(2, 4, False, seed=11, revision="v2"), "different base model revisions"),
    "target modules": (lora_file(2, 4, False, seed=11, modules=QV[:1]), "different target_modules"),
    "key sets": (lora_file(2, 4, False, seed=11, n_layers=1), "adapt different layers or modules"),
    "shapes": (lora_file(2, 4, False, seed=11, modules=(ModuleSpec("q_proj", 64, 32), QV[1])), "differ in shape"),
    "rank_pattern": (lora_file(2, 4, False, seed=11, rank_pattern={"q_proj": 2}), "non-empty rank_pattern"),
    "alpha_pattern": (lora_file(2, 4, False, seed=11, alpha_pattern={"q_proj": 8}), "non-empty alpha_pattern"),
    "dora": (lora_file(2, 4, False, seed=11, use_dora=True), "DoRA"),
    "not safetensors": (b"not an adapter at all", "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_adapters_that_do_not_stack_are_refused_naming_what_differs(case):
    other, match = REFUSED[case]
    with pytest.raises(InputError, match=match) as e:
        stack_adapters([GOOD, other], [1.0, 1.0], ids=["a" * 64, "b" * 64])
    assert "adapters[1] (bbbbbbbbbbbb)" in str(e.value)


@pytest.mark.parametrize(("n", "weights", "match"), [
    (1, [1.0], "1 adapter to stack; give 2 to 32"),
    (MAX_STACK + 1, [1.0] * (MAX_STACK + 1), "33 adapters to stack; give 2 to 32"),
    (2, [1.0, math.nan], r"adapters\[1\]: the weight is nan"),
    (2, [math.inf, 1.0], r"adapters\[0\]: the weight is inf"),
    (3, [1.0, 1.0], "2 weights for 3 adapters"),
])
def test_counts_and_weights_are_checked(n, weights, match):
    with pytest.raises(InputError, match=match):
        stack_adapters([GOOD] * n, weights)


def test_a_weight_that_overflows_the_dtype_is_refused():
    half = lora_file(2, 4, False, seed=12, dtype=torch.float16)
    with pytest.raises(InputError, match="non-finite weights in float16"):
        stack_adapters([half, half], [1e6, 1.0])


# ---------------------------------------------------------------------------------------------------- HTTP


E = 16  # tiny_checkpoint's task embedding size: adapters from embeddings, no text encoder needed


@pytest.fixture(scope="module")
def server(redis_server, redis_prefix_module, tmp_path_factory):
    """`loragen serve` on Redis with two checkpoints: "qv" (q_proj, v_proj) and "q" (q_proj only), whose adapters
    do not stack with each other."""
    root = tmp_path_factory.mktemp("stack")
    checkpoints = {"qv": tiny_checkpoint("M", seed=1, e=E).save(root / "qv"),
                   "q": tiny_checkpoint("M", seed=2, e=E, modules=QV[:1]).save(root / "q")}
    env = {"LORAGEN_REDIS_URL": redis_server.url, "LORAGEN_CACHE_PREFIX": redis_prefix_module,
           "LORAGEN_DEFAULT_CHECKPOINT": "qv"}
    proc = ServiceProcess(checkpoints, root / "serve.log", env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def generate(http, seed: int, checkpoint: str = "qv") -> httpx.Response:
    emb = torch.randn(E, generator=torch.Generator().manual_seed(seed)).tolist()
    r = http.post("/v1/adapters", json={"embedding": emb, "checkpoint": checkpoint})
    assert r.status_code == 200, r.text
    return r


def test_combine_over_http_stacks_caches_and_answers_like_generate(http):
    one, two = generate(http, 1), generate(http, 2)
    ids = [one.headers["x-adapter-id"], two.headers["x-adapter-id"]]
    body = {"adapters": [{"id": ids[0], "weight": 1.0}, {"id": ids[1], "weight": 0.5}]}
    r = http.post("/v1/adapters/combine", json=body)
    assert r.status_code == 200, r.text
    stacked_id = r.headers["x-adapter-id"]
    assert ID.fullmatch(stacked_id) and stacked_id not in ids and r.headers["etag"] == f'"{stacked_id}"'
    assert r.headers["x-cache"] == "miss" and int(r.headers["content-length"]) == len(r.content)
    # the bytes stack_adapters makes from the sources, provenance naming them by id
    assert r.content == stack_adapters([one.content, two.content], [1.0, 0.5], ids).safetensors_bytes()

    again = http.post("/v1/adapters/combine", json=body)
    assert again.headers["x-cache"] == "hit" and again.content == r.content
    assert again.headers["x-adapter-id"] == stacked_id
    assert http.get(f"/v1/adapters/{stacked_id}").content == r.content  # cached under its own id
    stats = http.get(f"/v1/adapters/{stacked_id}/stats")  # and like any cached adapter, inspectable
    assert stats.status_code == 200 and stats.json()["rank"] == 8, stats.text
    tar = http.post("/v1/adapters/combine", json=body | {"format": "peft-tar"})
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
        assert json.load(t.extractfile(f"{stacked_id}/{ADAPTER_CONFIG}"))["r"] == 8  # 2 + 2, padded
    other = http.post("/v1/adapters/combine", json=body | {"dtype": "bfloat16"})
    assert other.headers["x-adapter-id"] != stacked_id and other.headers["x-cache"] == "miss"


def test_combine_refusals_over_http(http):
    one, q_only = generate(http, 3), generate(http, 4, checkpoint="q")
    good = {"id": one.headers["x-adapter-id"], "weight": 1.0}
    missing = "0123456789abcdef" * 4
    assert_error(http.post("/v1/adapters/combine", json={"adapters": [good, {"id": missing}]}), 404, "not_found", missing)
    mismatched = {"adapters": [good, {"id": q_only.headers["x-adapter-id"], "weight": 2}]}
    assert_error(http.post("/v1/adapters/combine", json=mismatched), 422, "invalid_input", "different target_modules")
    assert_error(http.post("/v1/adapters/combine", json={"adapters": [good]}), 422, "invalid_input", "give 2 to 32")
    nan = json.dumps({"adapters": [{"id": good["id"], "weight": "NAN"}, {"id": good["id"]}]}).replace('"NAN"', "NaN")
    r = http.post("/v1/adapters/combine", content=nan, headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_input", "the weight is nan")
    assert_error(http.post("/v1/adapters/combine", json={"adapters": [good, {"id": "not-an-id"}]}), 422,
                 "invalid_input", "adapters.1.id")
    assert_error(http.post("/v1/adapters/combine", json={"adapters": [good, good], "dtype": "int8"}), 422,
                 "invalid_input", "dtype")
    assert_error(http.post("/v1/adapters/combine", content=b"x", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")


# ---------------------------------------------------------------------------------------------------- the client


def test_client_combine(server, http):
    ids = [generate(http, s).headers["x-adapter-id"] for s in (5, 6)]
    with Client(server.url, max_retries=0) as client:
        first = client.combine(ids)  # weight 1 each
        assert ID.fullmatch(first.id) and first.cache == "miss" and first.peft_config["r"] == 8
        assert first.provenance["kind"] == "stack" and json.loads(first.provenance["sources"]) == ids
        weighted = client.combine([(ids[0], 1.0), (ids[1], 0.5)], dtype="float16", format="peft-tar")
        assert weighted.format == "peft-tar" and weighted.provenance["dtype"] == "float16"
        with pytest.raises(NotFound, match="f" * 64):
            client.combine([ids[0], "f" * 64])
        q_only = generate(http, 7, checkpoint="q").headers["x-adapter-id"]
        with pytest.raises(InvalidInput, match="different target_modules") as e:
            client.combine([ids[0], q_only])
        assert e.value.type == "invalid_input" and e.value.status == 422
        with pytest.raises(ValueError, match=r"adapters\[1\]: the weight is nan"):
            client.combine([ids[0], (ids[1], math.nan)])
        with pytest.raises(TypeError, match="list of adapter ids"):
            client.combine(ids[0])

    async def twice() -> list:
        async with AsyncClient(server.url, max_retries=0) as client:
            return [await client.combine(ids), await client.combine([(i, 1) for i in ids])]

    hit, same = asyncio.run(twice())
    assert hit.id == same.id == first.id and hit.cache == same.cache == "hit" and hit.data == first.data


# ---------------------------------------------------------------------------------------------------- the CLI


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_combine_writes_what_peft_loads(capsys, base, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one.write_bytes(lora_file(2, 4, False, seed=20))
    two.write_bytes(lora_file(3, 6, True, seed=21))
    code, out, err = run(capsys, "combine", str(one), str(two), "--weights", "1,0.5", "--out", str(tmp_path / "s.safetensors"))
    assert code == 0 and "wrote" in out and not err, (out, err)
    written = (tmp_path / "s.safetensors").read_bytes()
    assert written == stack_adapters([one.read_bytes(), two.read_bytes()], [1.0, 0.5]).safetensors_bytes()

    code, _, _ = run(capsys, "combine", str(one), str(two), "--weights", "1,0.5", "--out", str(tmp_path / "dir"))
    assert code == 0 and (tmp_path / "dir" / ADAPTER_WEIGHTS).read_bytes() == written
    with recorded_warnings() as warned:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "dir")).eval()
    assert not warned, warned
    expected = logits(merged_by_hand(base, [one.read_bytes(), two.read_bytes()], [1.0, 0.5]))
    assert (logits(model) - expected).abs().max() < 1e-5
    # a PEFT directory loragen wrote is an input too
    code, _, _ = run(capsys, "combine", str(tmp_path / "dir"), str(one), "--out", str(tmp_path / "again.safetensors"))
    assert code == 0


def test_cli_combine_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    good, other = tmp_path / "good.safetensors", tmp_path / "other.safetensors"
    good.write_bytes(GOOD)
    other.write_bytes(REFUSED["base model"][0])
    out = str(tmp_path / "out.safetensors")
    for argv, match in [
        ((str(good), str(other)), "different base models"),
        ((str(good), str(good), "--weights", "1"), "1 weights for 2 adapters"),
        ((str(good), str(good), "--weights", "1,nan"), "the weight is nan"),
        ((str(good),), "1 adapter to stack"),
        ((str(good), str(tmp_path / "missing.safetensors")), "not found"),
    ]:
        code, _, err = run(capsys, "combine", *argv, "--out", out)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("loragen: error: ") and match in lines[0], err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(SystemExit) as e:
        main(["combine", str(good), str(good), "--weights", "1,x", "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "comma-separated numbers" in err


# ---------------------------------------------------------------------------------------------------- last: Redis down


def test_combine_is_503_while_the_cache_is_unreachable(http, redis_server):
    """Last in the module: it stops the Redis every test shares (and starts it again, empty)."""
    redis_server.require_managed("stopping Redis")
    ids = ["1" * 64, "2" * 64]  # never fetched by this server, so not in its process memory either
    redis_server.stop()
    try:
        assert_error(http.post("/v1/adapters/combine", json={"adapters": [{"id": i} for i in ids]}), 503, "unavailable")
    finally:
        redis_server.start()
