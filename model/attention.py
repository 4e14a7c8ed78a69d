"""The attention layer of hybrid models (DESIGN.md §1, "Hybrid models"), over packed tokens like model/layers.py.

x_t+1 = x_t + W_O · Attn(RMSNorm(x_t)): causal multi-head or grouped-query self-attention over the last W positions
of the stream, no positional encoding unless the layer asks for rotary positions. Its stream state is the key/value
ring of the last W positions (`AttentionState`), so a stream's state stays fixed-size however long it runs.

Axis letters: T packed tokens, D d_model, H query heads, G key/value heads, Dh head width (D / H).
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import AttentionLayerConfig, InfoMambaConfig
from model.layers import Batch, RMSNorm
from model.state import AttentionState


class SelfAttention(nn.Module):
    """The projections, named as most checkpoints name them: q_proj (H Dh, D), k_proj and v_proj (G Dh, D),
    o_proj (D, H Dh), no biases."""

    def __init__(self, d_model: int, layer: AttentionLayerConfig):
        super().__init__()
        d_head = d_model // layer.n_heads
        self.q_proj = nn.Linear(d_model, layer.n_heads * d_head, bias=False)
        self.k_proj = nn.Linear(d_model, layer.n_kv_heads * d_head, bias=False)
        self.v_proj = nn.Linear(d_model, layer.n_kv_heads * d_head, bias=False)
        self.o_proj = nn.Linear(layer.n_heads * d_head, d_model, bias=False)


class AttentionLayer(nn.Module):
    def __init__(self, config: InfoMambaConfig, layer: AttentionLayerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = layer.n_heads, layer.n_kv_heads
        self.d_head = config.d_model // layer.n_heads
        self.scale = self.d_head ** -0.5
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = SelfAttention(config.d_model, layer)
        self.rope_theta = layer.rope_theta if layer.rope else None

    def forward(self, h: torch.Tensor, state: AttentionState, batch: Batch) -> torch.Tensor:
        """h: the normed hidden (T, D). Returns the residual branch (T, D); the rings of `state` take the keys."""
        T = h.shape[0]
        q = self.attention.q_proj(h).view(T, self.n_heads, self.d_head)
        k = self.attention.k_proj(h).view(T, self.n_kv_heads, self.d_head)
        v = self.attention.v_proj(h).view(T, self.n_kv_heads, self.d_head)
        if self.rope_theta is not None:
            positions = token_positions(state.steps, batch, T)  # (T,)
            q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        if batch.is_decode:
            o = batch.ops.window_attention_update(q, k, v, state.key, state.value, state.steps, batch.state_indices,
                                            self.scale)
        else:
            o = batch.ops.window_attention(q, k, v, state.key, state.value, state.steps, batch.cu_seqlens,
                                     batch.state_indices, self.scale, layout=batch.layout)
        return self.attention.o_proj(o.reshape(T, self.n_heads * self.d_head))


def token_positions(steps: torch.Tensor, batch: Batch, num_tokens: int) -> torch.Tensor:
    """Each packed token's absolute position in its stream (T,) int64, on the device without a host read:
    the slot's steps seen before this pass plus the token's offset in its sequence (padding rows: any value)."""
    slots = batch.state_indices.clamp(min=0).long()
    if batch.is_decode:
        return steps[slots]
    cu = batch.cu_seqlens.long()
    rows = torch.arange(num_tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], rows, right=True).clamp(max=cu.numel() - 2)  # (T,) each row's sequence
    return steps[slots[seq]] + rows - cu[seq]


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary positions, half-split pairs (feature i turns with feature i + Dh/2, as Llama-style checkpoints do):
    x (T, heads, Dh) at positions (T,). Angles are taken in fp64, so a position deep into an unbounded stream
    (10^9 steps) keeps its angle to about 1e-7 rad; fp32 would lose it past 10^5."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)  # (Dh/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # (T, Dh/2)
    cos, sin = torch.cos(angles).float()[:, None, :], torch.sin(angles).float()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
