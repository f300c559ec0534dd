"""The Text-to-LoRA hypernetwork (Charakorn et al., ICML 2025): task embeddings → LoRA A/B for every
layer and target module, in one forward pass for a whole batch.

Dimension names used throughout:
    B  batch of task embeddings          E  task embedding size (the encoder's output)
    M  number of target modules          N  decoder layers of the base model
    D  latent size of the trunk          H  head input size
    r  LoRA rank                         d_in, d_out  features of the adapted Linear (P = max of the two)
    S  S_m, width of module m's head output per row (see HyperConfig.head_out)
    T  tokens of a padded batch of texts     Q  latent queries of the token reader
    W  width of the token reader             nh, hs  attention heads and head size (W = nh * hs)

What the trunk starts from is a task code of width D/2 per input. A pooled checkpoint (config.reader None,
as every released T2L one) makes it from one sentence embedding with `TaskEncoderHead`: `net(task_emb)`.
A reader checkpoint makes it from the encoder's token states with `TokenReader`, Q learned latent queries
cross-attending to the tokens (Perceiver-style, as Doc-to-LoRA): `net.forward_tokens(states, mask)`. A
checkpoint has exactly one of the two, so each call names the input it takes and refuses the other.

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

Exact batching (`exact=True`, what float32 generation uses): matrix kernels choose their blocking, and so their
rounding, by the shapes they are given, so a batch's forward is not bit-identical to each input's forward alone
(a batch of one even takes another kernel for the task code: a matrix-vector product). In the exact forward
every input gets its own matrix products with fixed shapes: its task code and trunk run as a batch of one, and
each head multiplies that input's rows alone, column block by column block, so a block of head weights is
reused from cache by every input of the batch instead of being read from memory once per input. Each of these
units runs on one intra-op thread, spread over helper threads on a CPU (generator/exact.py). The calls an input
makes, their shapes, threads and the memory alignment of their operands are the same whatever it is batched
with, so its A and B are bit-identical to its forward alone: batch invariance by construction, not by a
kernel's accident.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from generator.config import HyperConfig, ModuleSpec, ReaderSpec
from generator.exact import EXACT_BLOCK_BYTES, exact_latents, exact_linears, own

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


def token_positions(t: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, W) sinusoidal codes of token positions 0..T-1 (sines then cosines). Each entry depends only on its own
    position, so right padding never changes a real token's code. The encoder's states already carry their
    order within a window; these also order the windows of a long document, whose positions restart."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, w, 2, device=device).float() / w))  # (W/2,)
    angles = torch.arange(t, device=device).float()[:, None] * inv_freq[None, :]  # (T, W/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (T, W)


class Attention(nn.Module):
    """Multi-head attention of queries x (B, Q, W) over a context (B, T, W); mask (B, T), True = attend."""

    def __init__(self, w: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)
        self.proj = nn.Linear(w, w)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, q_len, w = x.shape
        t = ctx.shape[1]
        nh, hs = self.n_head, w // self.n_head
        q = self.q(x).view(b, q_len, nh, hs).transpose(1, 2)  # (B, nh, Q, hs)
        k, v = self.kv(ctx).split(w, dim=-1)  # (B, T, W) each
        k = k.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T): a padded key gets weight exactly 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, nh, Q, hs)
        y = y.transpose(1, 2).reshape(b, q_len, w)  # (B, Q, W)
        return self.dropout(self.proj(y))


class ReaderBlock(nn.Module):
    """Pre-LayerNorm block on the latents: read the tokens (cross-attention), share (self-attention), MLP."""

    def __init__(self, w: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_read, self.ln_tokens = nn.LayerNorm(w), nn.LayerNorm(w)
        self.read = Attention(w, n_head, dropout)
        self.ln_share = nn.LayerNorm(w)
        self.share = Attention(w, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(w)
        self.mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, W) latents, tokens (B, T, W), mask (B, T) → (B, Q, W)."""
        x = x + self.read(self.ln_read(x), self.ln_tokens(tokens), mask)
        h = self.ln_share(x)
        x = x + self.share(h, h)
        return x + self.mlp(self.ln_mlp(x))


class TokenReader(nn.Module):
    """Token states (B, T, E) + mask (B, T) → task code (B, D/2): Q learned latents read the tokens through
    `layers` blocks, and the Q latents, flattened, are projected to the code (Linear then LayerNorm, as
    TaskEncoderHead ends). Flattening keeps what each latent specialised in apart; a mean would blur it."""

    def __init__(self, spec: ReaderSpec, e: int, d: int, dropout: float = 0.0):
        super().__init__()
        w = spec.width
        self.token_proj = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, w))
        # unit scale, not nanoGPT's 0.02: the first block's update would otherwise make all latents alike
        self.latents = nn.Parameter(torch.randn(spec.latents, w))  # (Q, W)
        self.blocks = nn.ModuleList([ReaderBlock(w, spec.heads, dropout) for _ in range(spec.layers)])
        self.ln_f = nn.LayerNorm(w)
        self.out = nn.Sequential(nn.Linear(spec.latents * w, d), nn.LayerNorm(d))
        # with pooled_skip the first token's state feeds the code directly and the reader's part starts at zero
        self.first = TaskEncoderHead(e, d) if spec.pooled_skip else None
        if self.first is not None:
            nn.init.zeros_(self.out[1].weight)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = states.shape
        w = self.latents.shape[1]
        pos = token_positions(t, w, states.device).to(states.dtype)  # (T, W)
        tokens = self.token_proj(states) + pos[None]  # (B, T, W)
        x = self.latents[None].expand(b, -1, -1)  # (B, Q, W)
        for block in self.blocks:
            x = block(x, tokens, mask)  # (B, Q, W)
        code = self.out(self.ln_f(x).flatten(1))  # (B, Q*W) → (B, D/2)
        return code if self.first is None else code + self.first(states[:, 0])


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
        self.exact_block_bytes = EXACT_BLOCK_BYTES  # the column blocks of the exact forward's head products
        d = c.latent
        if c.reader is None:
            self.task_encoder = TaskEncoderHead(c.task_emb_dim, d // 2)  # (B, E) → (B, D/2)
        else:
            self.task_reader = TokenReader(c.reader, c.task_emb_dim, d // 2, dropout)  # (B, T, E), (B, T) → (B, D/2)
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

    def trunk(self, task: torch.Tensor) -> torch.Tensor:
        """Task code (B, D/2) → h1 (B, M, N, D): code every (module, layer) pair for every task, mix, one residual block."""
        c = self.config
        b, m, n = task.shape[0], len(c.modules), c.n_layers
        depth = self.layer_depth_encoder[1](self.layer_depth_encoder[0].weight)  # (N, D/4)
        kind = self.layer_type_encoder[1](self.layer_type_encoder[0].weight)  # (M, D/4)
        x = torch.cat([
            task[:, None, None, :].expand(b, m, n, -1),
            depth[None, None, :, :].expand(b, m, n, -1),
            kind[None, :, None, :].expand(b, m, n, -1),
        ], dim=-1)  # (B, M, N, D) in the order task, depth, module
        return self.mlp1(self.mixer(x))

    def forward(self, task_emb: torch.Tensor, exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pooled checkpoints: (B, E) → {module: (A (B, N, r, d_in), B (B, N, d_out, r))}, offsets added.
        `exact`: each input's A and B bit-identical to its forward alone (see the module docstring)."""
        if self.config.reader is not None:
            raise ValueError("this hypernetwork reads token states (config.reader is set), not a pooled embedding: "
                             "call forward_tokens(states, mask)")
        if task_emb.dim() != 2 or task_emb.shape[1] != self.config.task_emb_dim:
            raise ValueError(f"task_emb must be (B, {self.config.task_emb_dim}), got {tuple(task_emb.shape)}")
        if exact:  # each task code from its embedding alone: a batch of one is a matrix-vector product
            return self.exact_adapters(lambda i: self.task_encoder(own(task_emb[i : i + 1])), task_emb.shape[0])
        return self.adapters(self.task_encoder(task_emb))  # (B, D/2) task code

    def forward_tokens(self, states: torch.Tensor, mask: torch.Tensor,
                       exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reader checkpoints: token states (B, T, E) and mask (B, T) (True = a real token, at least one per row)
        → {module: (A (B, N, r, d_in), B (B, N, d_out, r))}, offsets added. `exact`: each input is read alone, its
        states cut to its own length (right padding: the mask's True entries come first), so its A and B are
        bit-identical to its forward alone with unpadded states."""
        e = self.config.task_emb_dim
        if self.config.reader is None:
            raise ValueError("this hypernetwork takes one pooled embedding per input (config.reader is null): call "
                             "net(task_emb) with (B, E) embeddings")
        if states.dim() != 3 or states.shape[2] != e:
            raise ValueError(f"token states must be (B, T, {e}), got {tuple(states.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(states.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not mask.any(dim=1).all():
            raise ValueError("every input needs at least one unmasked token")
        if exact:
            lengths = mask.sum(dim=1).tolist()
            if any(not bool(mask[i, :n].all()) for i, n in enumerate(lengths)):
                raise ValueError("exact reading needs right-padded masks (each row's real tokens first)")
            return self.exact_adapters(lambda i: self.task_reader(own(states[i : i + 1, : lengths[i]]),
                                                                  own(mask[i : i + 1, : lengths[i]])), len(lengths))
        return self.adapters(self.task_reader(states, mask))  # (B, D/2) task code

    def adapters(self, task: torch.Tensor, exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Task code (B, D/2) → {module: (A (B, N, r, d_in), B (B, N, d_out, r))}, offsets added; `exact`: see
        `exact_adapters`."""
        if exact:
            return self.exact_adapters(lambda i: task[i : i + 1], task.shape[0])
        h = self.latent(task)  # (B, M, *lead, H)
        return self._offsets([self.heads[m.name](h[:, i]) for i, m in enumerate(self.config.modules)])

    def exact_adapters(self, code: Callable[[int], torch.Tensor], n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`adapters` of n inputs, each bit-identical to its own forward alone: input i's task code (`code(i)`,
        (1, D/2)) and latents computed as a batch of one, then every head product of one input and one column
        block on its own (generator/exact.py). Inference only (no autograd through the products)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise ValueError("the exact forward is for inference: run it under torch.inference_mode() or no_grad()")
        device = next(self.parameters()).device
        latents = exact_latents(lambda i: self.latent(own(code(i))), n, device)  # (1, M, *lead, H) each
        lead = latents[0].shape[2:-1]
        ys = exact_linears([(self.heads[m.name], [x[0, i].reshape(-1, self.config.head_in) for x in latents])
                            for i, m in enumerate(self.config.modules)], self.exact_block_bytes)
        return self._offsets([y.view(n, *lead, -1) for y in ys])

    def _offsets(self, ys: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every module's head output (B, *lead, S_m) → (A, B), offsets added."""
        out = {}
        for m, y in zip(self.config.modules, ys, strict=True):
            a, b_t = self.emit(y, m)
            off_a, off_b = self.AB_offset["A"][m.name], self.AB_offset["B"][m.name]
            b_ = b_t.transpose(-1, -2)  # (B, N, d_out, r)
            # offsets are zero in every released checkpoint: skip adding a batch-sized tensor of zeros
            out[m.name] = (a + off_a if off_a.any() else a, b_ + off_b if off_b.any() else b_)
        return out

    def latent(self, task: torch.Tensor) -> torch.Tensor:
        """Task code (B, D/2) → what the heads read: (B, M, *lead, H), `lead` the rows per module and input."""
        raise NotImplementedError

    def emit(self, y: torch.Tensor, m: ModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Module m's head output (B, *lead, S_m) → A (B, N, r, d_in) and B transposed (B, N, r, d_out)."""
        raise NotImplementedError


def _frozen(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class HyperLoRAL(HyperLoRA):
    """Variant L: each module's head emits A and B at once, r*(d_in + d_out) numbers per layer."""

    variant = "L"

    def latent(self, task):
        return self.mlp3(self.mlp2(self.trunk(task)))  # (B, M, N, H)

    def emit(self, y, m):
        r = self.config.r  # y (B, N, r*(d_in + d_out))
        a = y[..., : r * m.d_in].unflatten(-1, (r, m.d_in))  # (B, N, r, d_in)
        b_t = y[..., r * m.d_in :].unflatten(-1, (r, m.d_out))  # (B, N, r, d_out): read as [r, d_out]
        return a, b_t


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

    def marked_latent(self, task: torch.Tensor) -> torch.Tensor:
        """Task code (B, D/2) → (B, M, 2, N, D): h1 plus the normalised A (index 0) or B (index 1) output embedding."""
        h1 = self.trunk(task)  # (B, M, N, D)
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

    def latent(self, task):
        return self.mlp3(self.mlp2(self.marked_latent(task)))  # (B, M, 2, N, H)

    def emit(self, y, m):
        return self.split(y.unflatten(-1, (self.config.r, -1)), m)  # y (B, 2, N, r*P) → (B, 2, N, r, P)


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

    def latent(self, task):
        c = self.config
        x = self.mlp2(self.marked_latent(task))  # (B, M, 2, N, D)
        x = self.rotate(x[..., None, :].expand(*x.shape[:-1], c.r, c.latent))  # (B, M, 2, N, r, D)
        return self.mlp3(self.mlp2(x))  # (B, M, 2, N, r, H): the second block runs a second time

    def emit(self, y, m):
        return self.split(y, m)  # y (B, 2, N, r, P)


VARIANT_CLASSES: dict[str, type[HyperLoRA]] = {"L": HyperLoRAL, "M": HyperLoRAM, "S": HyperLoRAS}


def build_hypernet(config: HyperConfig, dropout: float = 0.0) -> HyperLoRA:
    """The hypernetwork class for `config.variant`, freshly initialised (PyTorch defaults)."""
    return VARIANT_CLASSES[config.variant](config, dropout)

