"""The CUDA paths, on a real GPU (skipped without one): generation, bfloat16, batching, PEFT, CLI and HTTP.

The same hypernetwork weights generate on the CPU and on the GPU. float32 is the exact mode: GPU adapters
agree with the CPU's to float32 rounding (TF32 or reduced-precision matmuls would show as ~1e-3) and their
bytes do not depend on the batch. bfloat16 compute batches on the GPU and stays within bfloat16 rounding
of the float32 reference. The adapters load into PEFT on the GPU, and `loragen serve` / `loragen generate`
use the GPU when told to (or, for serve, by default).

    pytest -m gpu          # on a machine with CUDA
"""

import re
import threading

import httpx
import pytest
import torch
from safetensors.torch import load, load_file

from generator.adapter import ADAPTER_WEIGHTS, LoraAdapter
from generator.pipeline import LoraGenerator, TaskInput
from service.cli import main
from tests.service_server import ServiceProcess
from tests.test_peft_roundtrip import (
    ALL7,
    ALPHA,
    QV,
    R,
    base_model,
    checkpoint_for,
    embedding,
    hyper_config,
    input_ids,
    load_into_peft,
    merged_by_hand,
)
from tests.test_service import ckpt_dir  # noqa: F401  (the tiny text checkpoint `loragen serve` loads)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = "cuda:0"
FLOAT32_REL = 1e-5  # float32 vs float32 on another device: accumulation order only
BF16_REL = 2e-2  # bfloat16 keeps 8 bits of mantissa (~4e-3 per rounding), over a few layers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor, in float64 on the CPU."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def series(text: str, name: str, device: str) -> float:
    """One labelled sample of a Prometheus text page; 0 when the series is absent."""
    m = re.search(rf'^{name}{{device="{re.escape(device)}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_same_layout(a: LoraAdapter, b: LoraAdapter) -> None:
    """Same keys, shapes and dtypes, same PEFT config and provenance: the header decides all of these."""
    assert a.safetensors_header() == b.safetensors_header()
    assert a.data.device.type == b.data.device.type == "cpu"  # adapters always come back to host memory


@pytest.fixture(scope="module")
def ckpt():
    return checkpoint_for(hyper_config("llama", ALL7, "L"))


@pytest.fixture(scope="module")
def inputs():
    return [embedding(seed) for seed in range(4)]


@pytest.fixture(scope="module")
def reference(ckpt, inputs):
    """float32 adapters generated on the CPU."""
    return LoraGenerator(ckpt, device="cpu").generate(inputs)


def test_float32_on_the_gpu_matches_the_cpu_and_ignores_the_batch(ckpt, inputs, reference):
    gen = LoraGenerator(ckpt, device=GPU)
    assert next(gen.net.parameters()).device.type == torch.device(GPU).type
    batch = gen.generate(inputs)
    for got, want in zip(batch, reference, strict=True):
        assert_same_layout(got, want)
        assert rel_err(got.data, want.data) < FLOAT32_REL
        assert not torch.equal(got.data, torch.zeros_like(got.data))
    alone = gen.generate([inputs[2]])[0]
    assert alone.safetensors_bytes() == batch[2].safetensors_bytes()  # the exact mode's promise, on the GPU too


def test_bfloat16_batches_on_the_gpu_within_bfloat16_rounding(ckpt, inputs, reference):
    gen = LoraGenerator(ckpt, device=GPU, compute_dtype=torch.bfloat16)
    assert next(gen.net.parameters()).dtype == torch.bfloat16
    batch = gen.generate(inputs)  # one forward pass for all four
    for got, want in zip(batch, reference, strict=True):
        assert got.provenance["compute_dtype"] == "bfloat16" and got.data.dtype == torch.float32
        assert rel_err(got.data, want.data) < BF16_REL
    alone = gen.generate([inputs[1]])[0]
    assert rel_err(alone.data, batch[1].data) < BF16_REL
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        out = gen.generate(inputs[:2], name)
        assert all(a.data.dtype == dtype and a.all_finite() for a in out)
        assert rel_err(out[0].data, reference[0].data) < BF16_REL


def test_the_batch_comes_off_the_gpu_as_each_adapter_alone(ckpt, inputs):
    """On a GPU the batch is laid out on the device at once, then copied to the host adapter by adapter: the
    same bytes as filling each adapter alone, each in host memory of its own."""
    gen = LoraGenerator(ckpt, device=GPU, compute_dtype=torch.bfloat16)
    with torch.inference_mode():
        ab = gen.net(gen.embed(inputs).to(GPU, torch.bfloat16))
        provs = [{"row": str(i)} for i in range(len(inputs))]
        for dtype in ("float32", "float16"):
            batch, finite = LoraAdapter.batch_from_generated(gen.config, ab, dtype, provs)
            assert finite == [True] * len(inputs)
            for i, got in enumerate(batch):
                alone = LoraAdapter.from_generated(gen.config, {m: (a[i], b[i]) for m, (a, b) in ab.items()},
                                                   dtype, provs[i])
                assert got.data.device.type == "cpu"
                assert got.data.untyped_storage().nbytes() == got.data.numel() * got.data.element_size()
                assert got.safetensors_bytes() == alone.safetensors_bytes()


def test_gpu_adapter_loads_into_peft_on_the_gpu(tmp_path):
    gen = LoraGenerator(checkpoint_for(hyper_config("llama", QV, "M")), device=GPU)
    adapter = gen.generate([embedding(7)])[0]
    out = adapter.save_pretrained(tmp_path / "adapter")
    base = base_model("llama")
    model = load_into_peft(base.to(GPU), out)
    file = load_file(str(out / ADAPTER_WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(params) == len(file)
    for key, t in file.items():
        p = params[key.removesuffix(".weight") + ".default.weight"]
        assert p.device.type == torch.device(GPU).type and torch.equal(p.cpu(), t)
    with torch.no_grad():
        got = model(input_ids=input_ids().to(GPU)).logits.float().cpu()
        base.cpu()
        want = merged_by_hand(base, out / ADAPTER_WEIGHTS, ALPHA / R**0.5).eval()(input_ids=input_ids()).logits
        plain = base(input_ids=input_ids()).logits
    assert rel_err(got, want) < 1e-4
    assert rel_err(plain, want) > 1e-3  # the adapter changed the model by far more than the tolerance


def test_cli_generates_on_the_gpu(ckpt_dir, tmp_path, capsys):  # noqa: F811
    args = ["generate", "--checkpoint", str(ckpt_dir), "--task", "add two numbers"]
    assert main([*args, "--device", GPU, "--out", str(tmp_path / "gpu")]) == 0
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    capsys.readouterr()
    gpu, cpu = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("gpu", "cpu"))
    assert gpu.keys() == cpu.keys()
    for key in cpu:  # the encoder ran on the GPU too: float32 rounding apart, the same adapter
        assert rel_err(gpu[key], cpu[key]) < 1e-4, key


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_serve_uses_the_gpu_by_default_and_batches(ckpt_dir, tmp_path, compute):  # noqa: F811
    # LORAGEN_DEVICE left at auto; a bfloat16 worker waits up to 1 s for 8 jobs, so 16 concurrent misses batch
    env = {"LORAGEN_COMPUTE_DTYPE": compute, "LORAGEN_MAX_BATCH_SIZE": "8", "LORAGEN_MAX_WAIT_MS": "1000"}
    server = ServiceProcess({"tiny": ckpt_dir}, tmp_path / "serve.log", env)
    try:
        tasks = [f"gpu task number {i}" for i in range(16)]
        answers: dict[str, httpx.Response] = {}

        def post(task: str) -> None:
            answers[task] = httpx.post(f"{server.url}/generate", json={"task": task}, timeout=120)

        threads = [threading.Thread(target=post, args=(t,)) for t in tasks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 and r.headers["x-cache"] == "miss" for r in answers.values()), \
            [r.text[:200] for r in answers.values() if r.status_code != 200]
        cpu = LoraGenerator.load(ckpt_dir, device="cpu")
        want = cpu.generate([TaskInput.task(tasks[0])])[0]
        got = load(answers[tasks[0]].content)
        tol = 1e-4 if compute == "float32" else BF16_REL
        for key, t in want.tensors.items():
            assert rel_err(got[key], t) < tol, key
        page = httpx.get(f"{server.url}/metrics", timeout=30).text
        count = series(page, "loragen_generation_batch_size_count", GPU)
        assert series(page, "loragen_generation_batch_size_sum", GPU) == 16
        assert series(page, "loragen_generation_batch_size_count", "cpu") == 0
        if compute == "bfloat16":
            assert count <= 4  # batches of up to 8, not 16 jobs run alone
    finally:
        server.stop()
