"""The Doc-to-LoRA hypernetwork (Charakorn et al., 2026): the base model's per-layer activations of a
document → a LoRA for every layer and target module of that same base model.

Dimension names used throughout:
    n  chunks of a batch (every document's chunks, stacked)     S  tokens of the longest chunk (padded)
    L  decoder layers of the base model                         H  the base's hidden size
    D  latent size (the Perceiver's width)                      Q  the encoder's latent queries
    M  target modules (sorted by name)                          r  rank of one chunk's LoRA
    d_in, d_out  features of an adapted Linear                  P  head output: max over modules of d_in + d_out
    nh, nkv, hs  the Perceiver's query heads, key/value heads and head size (fixed 16, 4, 128 by the reference)

    activations (n, L, S, H) + mask (n, S)
      ─► Perceiver, one (chunk, layer) at a time with shared weights: (n, L, M, r, D)
      ─► per-layer residual MLP blocks ─► x / |x| ─► per-layer head: (n, L, M, r, P)
      ─► split into A (n, L, r, d_in) and B (n, L, r, d_out) per module, times the learned scalers
      ─► `combine`: a document's chunks stacked along the rank, then the bias LoRA: (L, (n + 1) r, d_in | d_out)

B is rank-major, (r, d_out), the transpose of PEFT's lora_B. The update of layer l is lora_alpha * x A^T B, with
lora_alpha used as is (see D2LConfig). State-dict names follow the reference implementation, so a released
checkpoint loads by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from generator.d2l.config import D2LConfig, PerceiverSpec

LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which the reference's per-layer blocks use
# the Perceiver's input projection is run over as many layers at once as keep its hidden state under this: at
# Qwen3-0.6B's size (H 1024) a 256-token document's layers go five at a time, a 1k-token one's one at a time
PERCEIVER_GROUP_BYTES = 64 << 20


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) over the last axis, in float32 (the weight multiplies directly: no 1 + w)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """Queries from the latents, keys and values from the context only (not from the latents as well), with
    grouped key/value heads: query head h reads key/value head h // (nh / nkv)."""

    def __init__(self, d: int, spec: PerceiverSpec):
        super().__init__()
        self.nh, self.nkv, self.hs = spec.heads, spec.kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, self.nh * self.hs, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hs, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """latents (b, q, D), context (b, S, D), mask (b, S) bool (True: a real token) or None → (b, q, D)."""
        b, q, _ = latents.shape
        s = context.shape[1]
        qh = self.q_proj(latents).view(b, q, self.nh, self.hs).transpose(1, 2)  # (b, nh, q, hs)
        kh = self.k_proj(context).view(b, s, self.nkv, self.hs).transpose(1, 2)  # (b, nkv, S, hs)
        vh = self.v_proj(context).view(b, s, self.nkv, self.hs).transpose(1, 2)  # (b, nkv, S, hs)
        group = self.nh // self.nkv
        kh = kh.repeat_interleave(group, dim=1)  # (b, nh, S, hs)
        vh = vh.repeat_interleave(group, dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (b, 1, 1, S)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask)  # (b, nh, q, hs)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.nh * self.hs))


class PerceiverLayer(nn.Module):
    """z + RMS(Attn(RMS(z), RMS(context))), then z + RMS(MLP(RMS(z)))."""

    def __init__(self, d: int, spec: PerceiverSpec):
        super().__init__()
        eps = spec.rms_eps
        self.input_latents_layernorm = RMSNorm(d, eps)
        self.input_context_layernorm = RMSNorm(d, eps)
        self.self_attn = CrossAttention(d, spec)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_ff_layernorm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, 4 * d, d)
        self.post_ff_layernorm = RMSNorm(d, eps)

    def forward(self, z: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.self_attn(self.input_latents_layernorm(z), self.input_context_layernorm(context), mask)
        z = z + self.post_attention_layernorm(attn)
        return z + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(z)))


class LatentStack(nn.Module):
    """Learned latent queries read a context through `n` PerceiverLayers, then a final RMSNorm."""

    def __init__(self, n_queries: int, d: int, n: int, spec: PerceiverSpec):
        super().__init__()
        self.latents_q = nn.Parameter(torch.zeros(n_queries, d))
        self.layers = nn.ModuleList(PerceiverLayer(d, spec) for _ in range(n))
        self.layernorm = RMSNorm(d, spec.rms_eps)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        z = self.latents_q.expand(context.shape[0], -1, -1)  # (b, queries, D)
        for layer in self.layers:
            z = layer(z, context, mask)
        return self.layernorm(z)


class Perceiver(nn.Module):
    """(b, S, H) activations of one layer of one chunk each → (b, M*r, D): project H → D, encode into Q latents,
    decode into one row per (module, rank)."""

    def __init__(self, config: D2LConfig):
        super().__init__()
        h, d, spec = config.hidden, config.latent, config.perceiver
        self.modality_projection = SwiGLU(h, 4 * h, d)
        self.encoder = LatentStack(spec.latent_queries, d, spec.blocks, spec)
        self.decoder = LatentStack(len(config.modules) * config.r, d, 1, spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        z = self.encoder(self.modality_projection(x), mask)  # (b, Q, D)
        return self.decoder(z, None)  # (b, M*r, D)


class Aggregator(nn.Module):
    """Holds the Perceiver under the reference's name (aggregator.perceiver.*)."""

    def __init__(self, config: D2LConfig):
        super().__init__()
        self.perceiver = Perceiver(config)


class PerLayerLinear(nn.Module):
    """x W[l] + b[l] for the rows of layer l: weight (L, d_in, d_out) used as is (no transpose)."""

    def __init__(self, n_layers: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(1, n_layers, 1, 1, d_out))  # the reference's broadcast shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nlmri,lio->nlmro", x, self.weight) + self.bias  # (n, L, M, r, d_out)


class PerLayerBlock(nn.Module):
    """x + LayerNorm(W2[l] silu(W1[l] LayerNorm(x) + b1[l]) + b2[l]): indices 0, 1, 3, 4 as in the reference."""

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.LayerNorm(d, eps=LAYER_NORM_EPS), PerLayerLinear(n_layers, d, 4 * d), nn.SiLU(),
                                     PerLayerLinear(n_layers, 4 * d, d), nn.LayerNorm(d, eps=LAYER_NORM_EPS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        return x + h


class Head(nn.Module):
    """u (n, L, M, r, D) → (n, L, M, r, P): weight (L, D, P) for one module, (L, M, D, P) for several."""

    def __init__(self, config: D2LConfig):
        super().__init__()
        n_l, m, d, p = config.n_layers, len(config.modules), config.latent, config.head_out
        self.weight = nn.Parameter(torch.zeros(n_l, d, p) if m == 1 else torch.zeros(n_l, m, d, p))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 3:
            return torch.einsum("nlmrd,ldp->nlmrp", u, self.weight)
        return torch.einsum("nlmrd,lmdp->nlmrp", u, self.weight)


class D2LHypernet(nn.Module):
    """Activations of a batch of chunks → each chunk's LoRA A/B per module (`forward`), and a document's chunks
    combined into its adapter (`combine`)."""

    def __init__(self, config: D2LConfig):
        super().__init__()
        self.config = config
        n_l, r = config.n_layers, config.r
        self.aggregator = Aggregator(config)
        self.layers = nn.Sequential(*(PerLayerBlock(n_l, config.latent) for _ in range(config.pre_head_layers)))
        self.head = Head(config)
        if config.use_bias:
            self.bias_A = nn.ParameterDict({m.name: nn.Parameter(torch.zeros(n_l, r, m.d_in)) for m in config.modules})
            self.bias_B = nn.ParameterDict({m.name: nn.Parameter(torch.zeros(n_l, r, m.d_out)) for m in config.modules})
        self.scaler_A = nn.ParameterDict({m.name: nn.Parameter(torch.ones(1, n_l, r, 1)) for m in config.modules})
        self.scaler_B = nn.ParameterDict({m.name: nn.Parameter(torch.zeros(1, n_l, r, 1)) for m in config.modules})

    def perceiver(self, activations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """activations (n, L, S, H), mask (n, S) → (n, L, M, r, D): every (chunk, layer) read alone, padding unread.

        Layers go through in groups whose input projection fits PERCEIVER_GROUP_BYTES: its hidden state is 4H wide
        for every token of every layer, 12 times the activations with the gate and the product, so all layers at
        once would hold 5.6 GiB more for a 4k-token document at Qwen3-0.6B's size. A small document still runs
        all its layers in one pass."""
        n, n_l, s, h = activations.shape
        c = self.config
        per_layer = 3 * n * s * 4 * h * activations.element_size()  # gate, up and their product
        group = max(1, min(n_l, PERCEIVER_GROUP_BYTES // max(1, per_layer)))
        out = torch.empty(n, n_l, len(c.modules) * c.r, c.latent, dtype=activations.dtype, device=activations.device)
        for start in range(0, n_l, group):
            g = min(group, n_l - start)
            x = activations[:, start : start + g].reshape(n * g, s, h)  # (n*g, S, H): chunk-major, then layer
            keep = mask.bool()[:, None, :].expand(n, g, s).reshape(n * g, s)  # (n*g, S)
            out[:, start : start + g] = self.aggregator.perceiver(x, keep).view(n, g, -1, c.latent)
        return out.view(n, n_l, len(c.modules), c.r, c.latent)

    def heads(self, latents: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(n, L, M, r, D) → {module: (A (n, L, r, d_in), B (n, L, r, d_out))}."""
        x = self.layers(latents)
        u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # no epsilon, as the reference
        flat = self.head(u)  # (n, L, M, r, P)
        out = {}
        for i, m in enumerate(self.config.modules):
            row = flat[:, :, i]  # (n, L, r, P)
            a = row[..., : m.d_in] * self.scaler_A[m.name]
            b = row[..., m.d_in : m.d_in + m.d_out] * self.scaler_B[m.name]
            out[m.name] = (a, b)
        return out

    def forward(self, activations: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each chunk's LoRA: {module: (A (n, L, r, d_in), B (n, L, r, d_out))}."""
        return self.heads(self.perceiver(activations, mask))

    def combine_each(self, chunks: dict[str, tuple[torch.Tensor, torch.Tensor]], counts: Sequence[int]
                     ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """A batch of several texts' chunks, `counts[i]` consecutive chunks for text i → each text's `combine`."""
        out, start = [], 0
        for n in counts:
            out.append(self.combine({m: (a[start : start + n], b[start : start + n]) for m, (a, b) in chunks.items()}))
            start += n
        return out

    def combine(self, chunks: dict[str, tuple[torch.Tensor, torch.Tensor]], scalers: Sequence[float] | None = None,
                bias_scaler: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One document's chunks {module: (A (n, L, r, d_in), B (n, L, r, d_out))} → {module: (A (L, R, d_in),
        B (L, R, d_out))} with R = (n + 1) r: the chunks stacked along the rank in order, then the bias LoRA.
        `scalers` (one per chunk) multiply the chunks' A; `bias_scaler` multiplies both bias A and bias B."""
        out = {}
        for m in self.config.modules:
            a, b = chunks[m.name]
            n, n_l, r, _ = a.shape
            if scalers is not None:
                if len(scalers) != n:
                    raise ValueError(f"{len(scalers)} scalers for {n} chunks")
                a = a * torch.tensor(list(scalers), dtype=a.dtype, device=a.device).view(n, 1, 1, 1)
            a = a.transpose(0, 1).reshape(n_l, n * r, -1)  # (L, n*r, d_in): chunk-major along the rank
            b = b.transpose(0, 1).reshape(n_l, n * r, -1)  # (L, n*r, d_out)
            if self.config.use_bias:
                s = 1.0 if bias_scaler is None else bias_scaler
                a = torch.cat([a, self.bias_A[m.name] * s], dim=1)  # (L, R, d_in)
                b = torch.cat([b, self.bias_B[m.name] * s], dim=1)  # (L, R, d_out)
            out[m.name] = (a, b)
        return out
