"""Causal InfoMamba layers over packed tokens (DESIGN.md §1).

Every layer reads and writes its carried state through the pool views in `LayerState`, indexed by
`state_indices`, so the same code serves a whole sequence, a chunk continuing a state, and a single step.

Axis letters: T packed tokens, D d_model, E d_inner, N d_state, K d_conv, R dt_rank, k concepts, C d_concept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels.ops import OpSet
from kernels.packing import PackedLayout
from model.config import InfoMambaConfig
from model.state import LayerState


@dataclass
class Batch:
    """Where a step's tokens belong: packed sequences, or one token per stream when `is_decode`."""

    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    state_indices: torch.Tensor  # (batch,) int32, -1 = padding
    is_decode: bool
    layout: PackedLayout | None = None  # cu_seqlens's host values and chunk tables, built once per pass
    ops: OpSet = ops.ROUTED  # the kernels or the references, chosen once per pass (else per call)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(weight.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MambaMixer(nn.Module):
    """Mamba-1 (S6): in_proj -> causal conv -> selective scan gated by SiLU(z) -> out_proj."""

    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        D, E, N, K, R = config.d_model, config.d_inner, config.d_state, config.d_conv, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank = E, N, R
        self.in_proj = nn.Linear(D, 2 * E, bias=config.proj_bias)
        # Kept in Mamba's (E, 1, K) shape so checkpoints convert by renaming alone.
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=config.proj_bias)
        self._init_dt()
        self._split_xz, self._split_dbc = (E, E), (R, N, N)
        self._A: tuple[tuple, torch.Tensor] | None = None
        self._conv_w: tuple[tuple, torch.Tensor] | None = None

    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        # Mamba's init: dt log-uniform in [dt_min, dt_max], stored as softplus^-1 in the bias.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def neg_A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32 (E, N), computed once per weight update rather than at every step (the
        decode step is a few microseconds of work per layer; three extra kernels would be a third of it)."""
        A_log = self.A_log
        if torch.is_grad_enabled():
            return -torch.exp(A_log.float())
        key = (A_log.data_ptr(), A_log._version, A_log.dtype, A_log.device)
        if self._A is None or self._A[0] != key:
            self._A = (key, -torch.exp(A_log.float()))
        return self._A[1]

    def conv_weight(self) -> torch.Tensor:
        """The depthwise conv's (E, K) view of its (E, 1, K) weight, made once while the weight stays (a view
        follows in-place updates; a new tensor, another dtype or device, makes a new one)."""
        w = self.conv1d.weight
        if torch.is_grad_enabled():
            return w.squeeze(1)
        key = (w.data_ptr(), w.dtype, w.device, w.shape)
        if self._conv_w is None or self._conv_w[0] != key:
            self._conv_w = (key, w.squeeze(1))
        return self._conv_w[1]

    def forward(self, u: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        # u: (T, D) -> (T, D); the split pieces are views the kernels address by row stride
        # one split rather than a slice per piece: each is a trip through the dispatcher on the step's host time
        x_in, z = self.in_proj(u).split_with_sizes(self._split_xz, dim=1)  # (T, E) each
        conv = self.conv1d
        conv_w = self.conv_weight()  # (E, K)
        if batch.is_decode:
            xc = batch.ops.causal_conv1d_update(x_in, conv_w, conv.bias, state.conv, batch.state_indices)
        else:
            xc = batch.ops.causal_conv1d(x_in, conv_w, conv.bias, state.conv, batch.cu_seqlens, batch.state_indices,
                                         layout=batch.layout)
        dt_in, B, C = self.x_proj(xc).split_with_sizes(self._split_dbc, dim=1)  # (T, R), (T, N), (T, N)
        dt_proj = self.dt_proj
        dt = F.linear(dt_in, dt_proj.weight)  # (T, E); bias and softplus fused in the scan
        A = self.neg_A()  # (E, N)
        if batch.is_decode:
            y = batch.ops.selective_state_update(xc, dt, A, B, C, self.D, z, dt_proj.bias, state.ssm,
                                                 batch.state_indices)
        else:
            y = batch.ops.selective_scan(xc, dt, A, B, C, self.D, z, dt_proj.bias, state.ssm,
                                         batch.cu_seqlens, batch.state_indices, layout=batch.layout)
        return self.out_proj(y)


# Initial concept horizons 1 / (1 - γ), spread log-uniformly: short enough to track a function, long enough to
# hold a whole file (DESIGN.md §1); training moves them.
DECAY_HORIZONS = (1e2, 1e5)


def initial_decay_logits(k: int, horizons: tuple[float, float] = DECAY_HORIZONS) -> torch.Tensor:
    """θ (k,) with 1 / (1 - sigmoid(θ)) log-spaced over `horizons`: θ = logit(1 - 1/H) = log(H - 1)."""
    lo, hi = (math.log(h) for h in horizons)
    log_h = torch.linspace(lo, hi, k) if k > 1 else torch.tensor([(lo + hi) / 2])
    return torch.log(torch.exp(log_h) - 1)


class ConceptBottleneck(nn.Module):
    """k routing weights per token, a causal (decayed, with concept_decay "learned") mean of values per concept,
    read back through M."""

    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        k, C = config.n_concepts, config.d_concept
        self.eps, self.norm_eps = config.concept_eps, config.norm_eps
        self.route = nn.Linear(config.d_model, k)
        self.value = nn.Linear(config.d_model, C, bias=False)
        self.mix = nn.Parameter(torch.eye(k))
        self.norm = RMSNorm(C, config.norm_eps)
        # θ, γ = sigmoid(θ); absent for "none" so that model directories written without it still load
        self.decay_logit = nn.Parameter(initial_decay_logits(k)) if config.has_concept_decay else None
        self._log_decay: tuple[tuple, torch.Tensor] | None = None

    def log_decay(self) -> torch.Tensor | None:
        """λ = log γ = logsigmoid(θ) in fp32 (k,), or None with no decay. The kernels take λ rather than γ because
        fp32 keeps 1 - γ = 1e-5 to full precision in λ but to only about 0.6% in γ itself. Cached between weight
        updates, like neg_A."""
        theta = self.decay_logit
        if theta is None:
            return None
        if torch.is_grad_enabled():
            return F.logsigmoid(theta.float())
        key = (theta.data_ptr(), theta._version, theta.dtype, theta.device)
        if self._log_decay is None or self._log_decay[0] != key:
            self._log_decay = (key, F.logsigmoid(theta.float()))
        return self._log_decay[1]

    def forward(self, h: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        # h: (T, D) -> r: (T, C) global context for each token
        logits = self.route(h)
        a = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)  # (T, k)
        v = self.value(h)  # (T, C)
        log_decay = self.log_decay()  # (k,) or None
        if batch.is_decode:
            read = batch.ops.concept_filter_update(a, v, self.mix, state.concept_mean, state.concept_mass,
                                             batch.state_indices, self.eps, log_decay)
        else:
            read = batch.ops.concept_filter(a, v, self.mix, state.concept_mean, state.concept_mass,
                                      batch.cu_seqlens, batch.state_indices, self.eps, log_decay,
                                      layout=batch.layout)
        normed, _ = batch.ops.add_rms_norm(read, None, self.norm.weight, self.norm_eps)  # one kernel on a GPU
        return F.gelu(normed)


class InformationFusion(nn.Module):
    """IMF: sigmoid gates on [h; r] inject the global context into the SSM's input and its output."""

    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        D, C = config.d_model, config.d_concept
        self.d_concept = C
        self.gate = nn.Linear(D + C, 2 * C)
        nn.init.constant_(self.gate.bias, -2.0)
        self.to_input = nn.Linear(C, D, bias=False)
        self.to_output = nn.Linear(C, D, bias=False)

    def forward(self, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h: (T, D), r: (T, C) -> (u: SSM input, extra: added to the SSM output), both (T, D)
        if r.dtype != h.dtype:
            r = r.to(h.dtype)
        g_s, g_o = torch.sigmoid(self.gate(torch.cat([h, r], dim=-1))).chunk(2, dim=-1)  # (T, C) each
        return h + self.to_input(g_s * r), self.to_output(g_o * r)


class InfoMambaLayer(nn.Module):
    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.has_concepts = config.has_concepts
        if self.has_concepts:
            self.concept = ConceptBottleneck(config)
            self.fusion = InformationFusion(config)
        self.mixer = MambaMixer(config)

    def forward(self, h: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        """h: the normed hidden (T, D). Returns the residual branch y (T, D)."""
        if not self.has_concepts:
            return self.mixer(h, state, batch)
        r = self.concept(h, state, batch)
        u, extra = self.fusion(h, r)
        return self.mixer(u, state, batch) + extra
