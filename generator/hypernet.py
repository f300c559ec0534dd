"""The Text-to-LoRA hypernetwork (Charakorn et al., ICML 2025): task embeddings → LoRA A/B for every
layer and target module, in one forward pass for a whole batch.

Dimension names used throughout:
    B  batch of task embeddings          E  task embedding size (the encoder's output)
    M  number of target modules          N  decoder layers of the base model
    D  latent size of the trunk          H  head input size
    r  LoRA rank                         d_in, d_out  features of the adapted Linear (P = max of the two)
    S  S_m, width of module m's head output per row (see HyperConfig.head_out)

All three variants share a trunk: a (task, layer depth, module type) code of width D per (layer, module)
goes through a mixer and residual MLP blocks. Where the reference T2L code runs one module at a time with
the N layers as its batch, we stack (B, M, N) as leading dims and run the trunk once; only the per-module
heads loop over M (at most 7 modules, never over the batch).
    L  one head per module emits A and B together:              (B, N, r*(d_in + d_out))
    M  one head per module emits A and B in two passes, each pass marked by a learned output embedding
       added to the latent:                                      (B, 2, N, r*P)
    S  like M, but the latent is repeated r times and rotated by the rank index (rotary position), so
       the head emits one rank row at a time:                    (B, 2, N, r, P)
State-dict names follow the reference implementation, so a released checkpoint loads by name.
"""

from __future__ import annotations

import torch
from torch import nn

from generator.config import HyperConfig, ModuleSpec

ROPE_BASE = 10000.0  # the S variant's rotary frequencies, as transformers' LlamaRotaryEmbedding default


def _mlp(d_in: int, d_hidden: int, d_out: int, norm: bool, dropout: float) -> nn.Sequential:
    """[LayerNorm | Dropout], Linear, SiLU, Dropout, Linear, SiLU: indices 1 and 4 are the Linears, as in T2L."""
    first = nn.LayerNorm(d_in) if norm else nn.Dropout(dropout)
    return nn.Sequential(
        first, nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out), nn.SiLU()
    )


class ResBlock(nn.Module):
    """x + SiLU(Linear(SiLU(Linear(LayerNorm(x))))): note the SiLU inside the branch, after the second Linear."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.mlp = _mlp(d, 4 * d, d, norm=True, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TaskEncoderHead(nn.Module):
    """Projects a task embedding E to D/2: Linear then LayerNorm."""

    def __init__(self, e: int, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(e, d), nn.LayerNorm(d))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(emb)


def _embedding(n: int, d: int) -> nn.Sequential:
    """An embedding table followed by a LayerNorm over its rows (T2L's depth and module-type codes)."""
    return nn.Sequential(nn.Embedding(n, d), nn.LayerNorm(d))


class HyperLoRA(nn.Module):
    """Common trunk. Subclasses (one per variant) add heads and turn trunk latents into A and B."""

    variant: str = ""

    def __init__(self, config: HyperConfig, dropout: float = 0.0):
        super().__init__()
        if config.variant != self.variant:
            raise ValueError(f"{type(self).__name__} builds variant {self.variant}, config says {config.variant}")
        c = config
        self.config = c
        d = c.latent
        self.task_encoder = TaskEncoderHead(c.task_emb_dim, d // 2)
        self.layer_depth_encoder = _embedding(c.n_layers, d // 4)
        self.layer_type_encoder = _embedding(len(c.modules), d // 4)
        self.mixer = _mlp(d, 4 * d, d, norm=False, dropout=dropout)
        self.mlp1 = ResBlock(d, dropout)
        self.mlp2 = ResBlock(d, dropout)
        self.mlp3 = _mlp(d, 4 * d, c.head_in, norm=True, dropout=dropout)
        self.heads = nn.ModuleDict({m.name: nn.Linear(c.head_in, c.head_out(m)) for m in c.modules})
        # Offsets added to every generated A/B: zero unless trained from a multi-task LoRA. Not trained here.
        self.AB_offset = nn.ModuleDict({
            "A": nn.ParameterDict({m.name: _frozen(c.n_layers, c.r, m.d_in) for m in c.modules}),
            "B": nn.ParameterDict({m.name: _frozen(c.n_layers, m.d_out, c.r) for m in c.modules}),
        })

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device and loading weights)."""

    def trunk(self, task_emb: torch.Tensor) -> torch.Tensor:
        """(B, E) → h1 (B, M, N, D): code every (module, layer) pair for every task, mix, one residual block."""
        c = self.config
        b, m, n = task_emb.shape[0], len(c.modules), c.n_layers
        task = self.task_encoder(task_emb)  # (B, D/2)
        depth = self.layer_depth_encoder[1](self.layer_depth_encoder[0].weight)  # (N, D/4)
        kind = self.layer_type_encoder[1](self.layer_type_encoder[0].weight)  # (M, D/4)
        x = torch.cat([
            task[:, None, None, :].expand(b, m, n, -1),
            depth[None, None, :, :].expand(b, m, n, -1),
            kind[None, :, None, :].expand(b, m, n, -1),
        ], dim=-1)  # (B, M, N, D) in the order task, depth, module
        return self.mlp1(self.mixer(x))

    def forward(self, task_emb: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(B, E) → {module: (A (B, N, r, d_in), B (B, N, d_out, r))}, offsets added."""
        if task_emb.dim() != 2 or task_emb.shape[1] != self.config.task_emb_dim:
            raise ValueError(f"task_emb must be (B, {self.config.task_emb_dim}), got {tuple(task_emb.shape)}")
        out = {}
        for m, (a, b_t) in zip(self.config.modules, self.generate(task_emb), strict=True):
            off_a, off_b = self.AB_offset["A"][m.name], self.AB_offset["B"][m.name]
            b_ = b_t.transpose(-1, -2)  # (B, N, d_out, r)
            # offsets are zero in every released checkpoint: skip adding a batch-sized tensor of zeros
            out[m.name] = (a + off_a if off_a.any() else a, b_ + off_b if off_b.any() else b_)
        return out

    def generate(self, task_emb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per module, A (B, N, r, d_in) and B transposed (B, N, r, d_out), without offsets."""
        raise NotImplementedError


def _frozen(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class HyperLoRAL(HyperLoRA):
    """Variant L: each module's head emits A and B at once, r*(d_in + d_out) numbers per layer."""

    variant = "L"

    def generate(self, task_emb):
        c = self.config
        h = self.mlp3(self.mlp2(self.trunk(task_emb)))  # (B, M, N, H)
        out = []
        for i, m in enumerate(c.modules):
            y = self.heads[m.name](h[:, i])  # (B, N, r*(d_in + d_out))
            a = y[..., : c.r * m.d_in].unflatten(-1, (c.r, m.d_in))  # (B, N, r, d_in)
            b_t = y[..., c.r * m.d_in :].unflatten(-1, (c.r, m.d_out))  # (B, N, r, d_out): read as [r, d_out]
            out.append((a, b_t))
        return out


class _SharedHead(HyperLoRA):
    """M and S: a learned output embedding per (module, A|B) marks which matrix a pass generates."""

    def __init__(self, config: HyperConfig, dropout: float = 0.0):
        super().__init__(config, dropout)
        self.out_emb = nn.ModuleDict({
            # random, not zero: equal marks would make the A and B passes see the same latent
            m.name: nn.ParameterDict({"A": nn.Parameter(torch.randn(config.latent)),
                                      "B": nn.Parameter(torch.randn(config.latent))})
            for m in config.modules
        })
        self.out_emb_norm = nn.LayerNorm(config.latent)

    def marked_latent(self, task_emb: torch.Tensor) -> torch.Tensor:
        """(B, E) → (B, M, 2, N, D): h1 plus the normalised A (index 0) or B (index 1) output embedding."""
        h1 = self.trunk(task_emb)  # (B, M, N, D)
        marks = torch.stack([torch.stack([self.out_emb[m.name]["A"], self.out_emb[m.name]["B"]])
                             for m in self.config.modules])  # (M, 2, D)
        marks = self.out_emb_norm(marks)
        return h1[:, :, None] + marks[None, :, :, None, :]  # (B, M, 2, N, D)

    def split(self, y: torch.Tensor, m: ModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, 2, N, r, P) → A (B, N, r, d_in), B transposed (B, N, r, d_out): the first columns are kept."""
        return y[:, 0, ..., : m.d_in], y[:, 1, ..., : m.d_out]


class HyperLoRAM(_SharedHead):
    """Variant M: the head emits a whole [r, P] matrix per pass; A keeps d_in columns, B d_out."""

    variant = "M"

    def generate(self, task_emb):
        c = self.config
        h = self.mlp3(self.mlp2(self.marked_latent(task_emb)))  # (B, M, 2, N, H)
        out = []
        for i, m in enumerate(c.modules):
            y = self.heads[m.name](h[:, i])  # (B, 2, N, r*P)
            out.append(self.split(y.unflatten(-1, (c.r, -1)), m))  # (B, 2, N, r, P)
        return out


class HyperLoRAS(_SharedHead):
    """Variant S: the head emits one rank row per position; rank index p is a rotary position."""

    variant = "S"

    def __init__(self, config: HyperConfig, dropout: float = 0.0):
        super().__init__(config, dropout)
        self.register_buffer("rope_cos", torch.empty(config.r, config.latent), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.r, config.latent), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        d = self.config.latent
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (D/2,)
        freqs = torch.arange(self.config.r).float()[:, None] * inv_freq[None, :]  # (r, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (r, D): halves, not interleaved
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding along D with the rank index as position; x (..., r, D)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.rope_cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * self.rope_sin.to(x.dtype)

    def generate(self, task_emb):
        c = self.config
        x = self.mlp2(self.marked_latent(task_emb))  # (B, M, 2, N, D)
        x = self.rotate(x[..., None, :].expand(*x.shape[:-1], c.r, c.latent))  # (B, M, 2, N, r, D)
        h = self.mlp3(self.mlp2(x))  # (B, M, 2, N, r, H): the second block runs a second time
        return [self.split(self.heads[m.name](h[:, i]), m) for i, m in enumerate(c.modules)]  # y (B, 2, N, r, P)


VARIANT_CLASSES: dict[str, type[HyperLoRA]] = {"L": HyperLoRAL, "M": HyperLoRAM, "S": HyperLoRAS}


def build_hypernet(config: HyperConfig, dropout: float = 0.0) -> HyperLoRA:
    """The hypernetwork class for `config.variant`, freshly initialised (PyTorch defaults)."""
    return VARIANT_CLASSES[config.variant](config, dropout)

