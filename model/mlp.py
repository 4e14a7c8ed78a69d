"""The optional MLP layer of hybrid models (DESIGN.md §1): pre-norm gated SiLU, no state.

x_t+1 = x_t + down(SiLU(gate h) ⊙ up h), h = RMSNorm(x_t). Axis letters: T packed tokens, D d_model, F d_mlp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import InfoMambaConfig, MlpLayerConfig
from model.layers import Batch, RMSNorm


class GatedMlp(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (T, D) -> (T, D)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class MlpLayer(nn.Module):
    def __init__(self, config: InfoMambaConfig, layer: MlpLayerConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = GatedMlp(config.d_model, layer.d_mlp)

    def forward(self, h: torch.Tensor, state: None, batch: Batch) -> torch.Tensor:
        """h: the normed hidden (T, D). Returns the residual branch (T, D); a token's output is its own."""
        return self.mlp(h)
