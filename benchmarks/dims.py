"""The three released T2L checkpoints' architectures (variant L, random weights here) and their FLOPs.

    mistral  Mistral-7B-Instruct-v0.2: 32 layers, q_proj 4096→4096, v_proj 4096→1024, D=128, H=512
    llama    Llama-3.1-8B-Instruct:   32 layers, q_proj 4096→4096, v_proj 4096→1024, D=512, H=2048
    gemma    gemma-2-2b-it:           26 layers, q_proj 2304→2048, v_proj 2304→1024, D=512, H=2048
All with r=8, alpha 16, rsLoRA and E=1024 (gte-large-en-v1.5 task embeddings).
"""

from __future__ import annotations

from collections import Counter

from generator.config import EncoderSpec, HyperConfig, ModuleSpec

T2L_ENCODER = EncoderSpec(name="Alibaba-NLP/gte-large-en-v1.5", dim=1024, requires_remote_code=True)


def _config(base: str, n_layers: int, d_in: int, q_out: int, v_out: int, latent: int, head_in: int,
            encoder: EncoderSpec = T2L_ENCODER) -> HyperConfig:
    return HyperConfig(variant="L", task_emb_dim=1024, latent=latent, head_in=head_in, n_layers=n_layers,
                       modules=(ModuleSpec("q_proj", d_in, q_out), ModuleSpec("v_proj", d_in, v_out)),
                       r=8, lora_alpha=16.0, use_rslora=True, encoder=encoder, base_model=base)


def t2l_config(name: str, encoder: EncoderSpec = T2L_ENCODER, n_layers: int | None = None) -> HyperConfig:
    """The architecture of the released T2L checkpoint `name` (mistral, llama, gemma); `n_layers` overrides the
    number of decoder layers (smoke runs only: the numbers then describe a smaller network)."""
    dims = {"mistral": ("mistralai/Mistral-7B-Instruct-v0.2", 32, 4096, 4096, 1024, 128, 512),
            "llama": ("meta-llama/Llama-3.1-8B-Instruct", 32, 4096, 4096, 1024, 512, 2048),
            "gemma": ("google/gemma-2-2b-it", 26, 2304, 2048, 1024, 512, 2048)}
    if name not in dims:
        raise ValueError(f"unknown T2L checkpoint {name!r}; choose mistral, llama or gemma")
    base, layers, *rest = dims[name]
    return _config(base, n_layers or layers, *rest, encoder=encoder)


CHECKPOINTS = ("mistral", "llama", "gemma")


def describe(c: HyperConfig) -> str:
    mods = ", ".join(f"{m.name} {m.d_in}→{m.d_out}" for m in c.modules)
    return f"{c.n_layers} layers, {mods}, r={c.r}, D={c.latent}, H={c.head_in}, E={c.task_emb_dim}"


def linear_shapes(c: HyperConfig, batch: int) -> Counter:
    """Every Linear of a variant-L forward for `batch` tasks, as {(rows, in, out): how many}. Elementwise
    work (LayerNorm, SiLU, the embedding LayerNorms, the concatenation) is not a matmul and not counted."""
    if c.variant != "L":
        raise ValueError("linear_shapes models variant L only")
    d, h, e = c.latent, c.head_in, c.task_emb_dim
    rows = batch * len(c.modules) * c.n_layers  # trunk rows: every (task, module, layer)
    shapes: Counter = Counter()
    shapes[(batch, e, d // 2)] += 1  # task encoder
    for _ in range(3):  # mixer, mlp1, mlp2: D → 4D → D
        shapes[(rows, d, 4 * d)] += 1
        shapes[(rows, 4 * d, d)] += 1
    shapes[(rows, d, 4 * d)] += 1  # mlp3: D → 4D → H
    shapes[(rows, 4 * d, h)] += 1
    for m in c.modules:  # one head per module over (task, layer) rows
        shapes[(batch * c.n_layers, h, c.head_out(m))] += 1
    return shapes


def forward_flops(c: HyperConfig, batch: int) -> int:
    """Multiply-add FLOPs (2·rows·in·out per Linear) of one forward for `batch` tasks."""
    return sum(2 * r * k * n * count for (r, k, n), count in linear_shapes(c, batch).items())


def adapter_bytes(c: HyperConfig, element_size: int = 4) -> int:
    """Tensor bytes of one adapter (A and B of every module and layer), without the file header."""
    return element_size * c.n_layers * c.r * sum(m.d_in + m.d_out for m in c.modules)
