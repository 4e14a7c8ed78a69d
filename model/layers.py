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

from kernels import mamba_step as mamba_step_kernels
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
        # u: (T, D) -> (T, D): a plain Mamba block (k = 0)
        return self.from_projection(self.in_proj(u), state, batch)

    def from_projection(self, xz: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        """The block from in_proj's output xz (T, 2E) on: (T, D)."""
        out_proj = self.out_proj
        return batch.ops.linear(self.mix(xz, state, batch), out_proj.weight, out_proj.bias)

    def mix(self, xz: torch.Tensor, state: LayerState, batch: Batch, inject: torch.Tensor | None = None,
            inject_weight: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Everything between in_proj and out_proj: xz (T, 2E) -> the gated SSM output y (T, E), written into `out`
        (a (T, E) view, e.g. columns of a wider buffer) when given. With `inject` (T, C) and `inject_weight`
        (2E, C), xz + inject @ inject_weight^T stands for xz (the concepts' input injection, see InfoMambaLayer).
        The split pieces of xz are views the kernels address by row stride.

        A decode step (INFOMAMBA_FUSED_STEP `1`, the default) takes the fused step, three launches for the whole of
        it (kernels/mamba_step.py), up to mamba_step.FUSED_MAMBA_MAX_BATCH rows, and main's unfused step above
        (`_unfused_step`, the faster there on the H200); `concept` and `0` take main's step at every batch. Under
        CUDA graphs the rows are the captured padded batch, so the choice is made once, at capture."""
        conv = self.conv1d
        conv_w = self.conv_weight()  # (E, K)
        A = self.neg_A()  # (E, N)
        ops_ = batch.ops
        if (batch.is_decode and ops_.step_path() == "1"
                and xz.shape[0] <= mamba_step_kernels.FUSED_MAMBA_MAX_BATCH):  # read per call: tests and bench set it
            dt_proj = self.dt_proj
            return ops_.mamba_step(xz, conv_w, conv.bias, self.x_proj.weight, dt_proj.weight, dt_proj.bias, A,
                                   self.D, state.conv, state.ssm, batch.state_indices, inject, inject_weight,
                                   out=out)
        if inject is not None:
            xz = torch.addmm(xz, inject, inject_weight.t())
        if batch.is_decode:
            return self._unfused_step(xz, conv_w, A, state, batch, out)
        # one split rather than a slice per piece: each is a trip through the dispatcher on the step's host time
        x_in, z = xz.split_with_sizes(self._split_xz, dim=1)  # (T, E) each
        xc = ops_.causal_conv1d(x_in, conv_w, conv.bias, state.conv, batch.cu_seqlens, batch.state_indices,
                                layout=batch.layout)
        dt_in, B, C = self.x_proj(xc).split_with_sizes(self._split_dbc, dim=1)  # (T, R), (T, N), (T, N)
        dt_proj = self.dt_proj
        dt = F.linear(dt_in, dt_proj.weight)  # (T, E); bias and softplus fused in the scan
        return ops_.selective_scan(xc, dt, A, B, C, self.D, z, dt_proj.bias, state.ssm, batch.cu_seqlens,
                                   batch.state_indices, layout=batch.layout, out=out)

    def _unfused_step(self, xz, conv_w, A, state: LayerState, batch: Batch, out: torch.Tensor | None):
        """main's decode step, one op a kernel (conv update, x_proj, dt_proj, state update): the decode step above
        mamba_step.FUSED_MAMBA_MAX_BATCH rows, and at every batch under INFOMAMBA_FUSED_STEP `0` or `concept`. Its
        intermediates are stored in the model dtype, the fused step's in fp32. A concept layer's injection comes
        in already added to xz (one addmm, in `mix`)."""
        ops_ = batch.ops
        x_in, z = xz.split_with_sizes(self._split_xz, dim=1)  # (T, E) each
        xc = ops_.causal_conv1d_update(x_in, conv_w, self.conv1d.bias, state.conv, batch.state_indices)
        dt_in, B, C = self.x_proj(xc).split_with_sizes(self._split_dbc, dim=1)  # (T, R), (T, N), (T, N)
        dt_proj = self.dt_proj
        dt = F.linear(dt_in, dt_proj.weight)  # (T, E); bias and softplus fused in the update
        y = ops_.selective_state_update(xc, dt, A, B, C, self.D, z, dt_proj.bias, state.ssm,
                                        batch.state_indices)  # (T, E)
        return y if out is None else out.copy_(y)


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

    def forward(self, logits: torch.Tensor, v: torch.Tensor, gate_h: torch.Tensor, gate_weight: torch.Tensor,
                state: LayerState, batch: Batch, out_output: torch.Tensor) -> torch.Tensor:
        """The concept term, its read-back r and the IMF gates, from the layer's projections of h: logits (T, k)
        W_a h + b_a, v (T, C) W_v h, gate_h (T, 2C) W_g[:, :D] h + b_g; gate_weight (2C, C) is W_g[:, D:].
        Writes g_o ⊙ r into out_output (T, C); returns g_s ⊙ r (T, C)."""
        log_decay = self.log_decay()  # (k,) or None
        ops_ = batch.ops
        if batch.is_decode:  # two launches for the whole step, one over 256 rows (kernels/concept_step.py)
            to_input, _ = ops_.concept_step(logits, v, gate_h, self.mix, self.norm.weight, gate_weight,
                                            state.concept_mean, state.concept_mass, batch.state_indices, self.eps,
                                            self.norm_eps, log_decay, out_output=out_output)
            return to_input
        read = ops_.concept_filter(logits, v, self.mix, state.concept_mean, state.concept_mass, batch.cu_seqlens,
                                   batch.state_indices, self.eps, log_decay, layout=batch.layout, is_logits=True)
        to_input, _ = ops_.concept_readout(read, gate_h, self.norm.weight, gate_weight, self.norm_eps,
                                           out_output=out_output)
        return to_input


class InformationFusion(nn.Module):
    """IMF's weights: sigmoid gates on [h; r] inject the global context into the SSM's input and its output. The
    layer computes them (InfoMambaLayer.forward), through products shared with its other projections."""

    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        D, C = config.d_model, config.d_concept
        self.d_concept = C
        self.gate = nn.Linear(D + C, 2 * C)
        nn.init.constant_(self.gate.bias, -2.0)
        self.to_input = nn.Linear(C, D, bias=False)
        self.to_output = nn.Linear(C, D, bias=False)


@dataclass(frozen=True)
class FusedWeights:
    """A concept layer's weights laid side by side so that one product serves several projections (DESIGN.md §1):

    pre_weight (k + 3C + 2E, D), pre_bias: [W_a; W_v; W_g[:, :D]; W_in] and their biases: everything computed
        from h, in one product (the routing logits, the values, the h half of the gates, in_proj(h));
    inject_weight (2E, C) = W_in W_s: u = h + W_s (g_s ⊙ r) only feeds in_proj, so in_proj(u) = in_proj(h) +
        (W_in W_s)(g_s ⊙ r), and u itself is never formed;
    out_weight (D, E + C) = [W_out, W_o]: out_proj(y) + W_o (g_o ⊙ r) as one product over [y; g_o ⊙ r].

    Built from the parameters, which stay the only thing saved, loaded and hashed. The cost is memory: in_proj's
    and out_proj's weights are held twice, and W_in W_s is new: about as many numbers again as the layer's own
    parameters (a plain Mamba layer builds none).
    """

    pre_weight: torch.Tensor
    pre_bias: torch.Tensor
    inject_weight: torch.Tensor
    out_weight: torch.Tensor


# The parameters FusedWeights is built from, as (module path, parameter name).
_FUSED_SOURCES = tuple((tuple(path.split(".")[:-1]), path.split(".")[-1]) for path in (
    "concept.route.weight", "concept.route.bias", "concept.value.weight", "fusion.gate.weight", "fusion.gate.bias",
    "fusion.to_input.weight", "fusion.to_output.weight", "mixer.in_proj.weight", "mixer.in_proj.bias",
    "mixer.out_proj.weight"))


class InfoMambaLayer(nn.Module):
    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.has_concepts = config.has_concepts
        if self.has_concepts:
            self.concept = ConceptBottleneck(config)
            self.fusion = InformationFusion(config)
        self.mixer = MambaMixer(config)
        self._fused: tuple[tuple, FusedWeights] | None = None
        if self.has_concepts:  # the pieces of the one product of h (FusedWeights.pre_weight), split once per pass
            k, C, E = config.n_concepts, config.d_concept, config.d_inner
            self._split_pre = (k, C, 2 * C, 2 * E)

    def forward(self, h: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        """h: the normed hidden (T, D). Returns the residual branch y (T, D)."""
        projection = self.input_projection(batch)
        if projection is None:
            return self._unfused_step(h, state, batch)
        return self.from_projection(F.linear(h, *projection), state, batch)

    def input_projection(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W, b) of the one product the layer takes of its normed input h, so that the model can fuse it with the
        norm before it (ops.add_rms_norm_linear): in_proj for k = 0, FusedWeights.pre_weight for k > 0. None where
        the layer needs h itself (the concept layer's decode step under INFOMAMBA_FUSED_STEP=0)."""
        if not self.has_concepts:
            in_proj = self.mixer.in_proj
            return in_proj.weight, in_proj.bias
        if batch.is_decode and batch.ops.step_path() == "0":
            return None
        fused = self.fused_weights()
        return fused.pre_weight, fused.pre_bias

    def from_projection(self, pre: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        """The layer from input_projection's product `pre` (T, ...) on: the residual branch y (T, D)."""
        if not self.has_concepts:
            return self.mixer.from_projection(pre, state, batch)
        E = self.mixer.d_inner
        # input_projection has just checked the cache this pass (its key costs ~10 µs a look: not twice a layer)
        fused = self._fused[1] if self._fused is not None and not torch.is_grad_enabled() else self.fused_weights()
        logits, v, gate_h, xz = pre.split_with_sizes(self._split_pre, dim=1)
        C = self._split_pre[1]
        mixed = pre.new_empty(pre.shape[0], E + C)  # [SSM output, g_o ⊙ r]: the two halves of one last product
        gate_weight = self.fusion.gate.weight[:, self.norm.weight.shape[0]:]  # (2C, C) the gates' weights on r
        to_input = self.concept(logits, v, gate_h, gate_weight, state, batch, out_output=mixed[:, E:])
        self.mixer.mix(xz, state, batch, inject=to_input, inject_weight=fused.inject_weight, out=mixed[:, :E])
        return batch.ops.linear(mixed, fused.out_weight, self.mixer.out_proj.bias)

    def _unfused_step(self, h: torch.Tensor, state: LayerState, batch: Batch) -> torch.Tensor:
        """main's decode step for a concept layer (INFOMAMBA_FUSED_STEP=0), one op a kernel: each projection of h
        on its own, the concept filter's update, RMSNorm, GELU, the gates on [h; r], u = h + W_s (g_s ⊙ r) through
        the whole Mamba block, plus W_o (g_o ⊙ r). Kept so that a GPU run times it beside the fused step."""
        c, f, ops_ = self.concept, self.fusion, batch.ops
        logits = c.route(h)
        a = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)  # (T, k)
        read = ops_.concept_filter_update(a, c.value(h), c.mix, state.concept_mean, state.concept_mass,
                                          batch.state_indices, c.eps, c.log_decay())  # (T, C) fp32
        normed, _ = ops_.add_rms_norm(read, None, c.norm.weight, c.norm_eps)
        r = F.gelu(normed)  # (T, C)
        if r.dtype != h.dtype:
            r = r.to(h.dtype)
        g_s, g_o = torch.sigmoid(f.gate(torch.cat([h, r], dim=-1))).chunk(2, dim=-1)  # (T, C) each
        return self.mixer(h + f.to_input(g_s * r), state, batch) + f.to_output(g_o * r)

    def fused_weights(self) -> FusedWeights:
        """The FusedWeights of the current parameters: cached between weight updates like MambaMixer.neg_A, and
        rebuilt (differentiably) on every call while gradients are on."""
        if torch.is_grad_enabled():
            return self._build_fused()
        key = tuple((p.data_ptr(), p._version) for p in self._fused_sources())
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, self._build_fused())
        return self._fused[1]

    def _fused_sources(self) -> list[torch.Tensor]:
        # Through the module dictionaries: nn.Module.__getattr__ costs microseconds a hop, and this runs every pass.
        sources = []
        for module_path, name in _FUSED_SOURCES:
            module = self
            for part in module_path:
                module = module._modules[part]
            if module._parameters[name] is not None:
                sources.append(module._parameters[name])
        return sources

    def _build_fused(self) -> FusedWeights:
        c, f, m = self.concept, self.fusion, self.mixer
        D = m.in_proj.weight.shape[1]
        in_bias = m.in_proj.bias if m.in_proj.bias is not None else m.in_proj.weight.new_zeros(2 * m.d_inner)
        gate_weight = f.gate.weight  # (2C, D + C)
        return FusedWeights(
            pre_weight=torch.cat([c.route.weight, c.value.weight, gate_weight[:, :D], m.in_proj.weight]),
            pre_bias=torch.cat([c.route.bias, c.value.weight.new_zeros(f.d_concept), f.gate.bias, in_bias]),
            inject_weight=(m.in_proj.weight.float() @ f.to_input.weight.float()).to(m.in_proj.weight.dtype),
            out_weight=torch.cat([m.out_proj.weight, f.to_output.weight], dim=1),
        )
