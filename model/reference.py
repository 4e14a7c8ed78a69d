"""A slow, readable, sequential causal InfoMamba: the test oracle, never used for serving.

It runs one sequence one step at a time, straight from DESIGN.md §1, with raw concept sums S and mass m in
fp64 (the fast paths store means instead). It reads the parameters of an `InfoMamba` module but shares no
code path with it.

Glossary (paper symbols): x_t hidden, h_t normed hidden, a_t concept routing (k), v_t concept value (d_c),
S/m concept sums/mass, γ concept decay, r_t global context, g_s/g_o IMF gates, u_t SSM input, s_t SSM state (E x N),
Δ step size, A/B/C/D the S6 parameters, K conv width. Attention layers (hybrids): q/k/v per head (H query heads,
G key/value heads, Dh wide), W the window; the oracle keeps every key and value in a list and attends to the last
W of them, where the fast paths keep a ring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.infomamba import InfoMamba
from model.state import StreamState


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean() + eps) * weight


class _LayerState:
    """A recurrent layer's state."""

    def __init__(self, E: int, K: int, N: int, k: int, C: int):
        self.window = torch.zeros(K - 1, E)  # last K-1 conv inputs, oldest first
        self.s = torch.zeros(E, N)  # SSM state
        self.S = torch.zeros(k, C, dtype=torch.float64)  # concept sums
        self.m = torch.zeros(k, dtype=torch.float64)  # concept mass


    @classmethod
    def from_stream(cls, state: StreamState, i: int, eps: float) -> "_LayerState":
        """Recurrent layer i of a one-stream StreamState, with its stored means turned back into raw sums S = (m + eps) mean."""
        st = cls.__new__(cls)
        st.window = state.conv[i, 0].float().t().clone()
        st.s = state.ssm[i, 0].float().clone()
        st.m = state.concept_mass[i, 0].double().clone()
        st.S = (st.m[:, None] + eps) * state.concept_mean[i, 0].double()
        return st

    def write_to(self, state: StreamState, i: int, eps: float) -> None:
        state.conv[i, 0] = self.window.t().to(state.conv.dtype)
        state.ssm[i, 0] = self.s
        state.concept_mass[i, 0] = self.m
        state.concept_mean[i, 0] = (self.S / (self.m[:, None] + eps)).float()


class _AttentionHistory:
    """An attention layer's past: the (rotated) key and value of every position seen, oldest first."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []  # each (G, Dh)
        self.values: list[torch.Tensor] = []

    @classmethod
    def from_stream(cls, state: StreamState, i: int) -> "_AttentionHistory":
        """Attention layer i of a one-stream StreamState: the positions its ring holds, max(0, P - W) .. P - 1."""
        key, value = (t[0].float() for t in (state.rings[f"attention.{i}.key"], state.rings[f"attention.{i}.value"]))
        seen, window = int(state.steps[0]), key.shape[1]
        hist = cls()
        for position in range(max(0, seen - window), seen):
            hist.keys.append(key[:, position % window].clone())
            hist.values.append(value[:, position % window].clone())
        return hist

    def write_to(self, state: StreamState, i: int, seen: int) -> None:
        """Position p of the last W goes to ring entry p mod W; entries no position reached keep what they held."""
        key, value = state.rings[f"attention.{i}.key"], state.rings[f"attention.{i}.value"]
        window = key.shape[2]
        for back in range(1, min(window, len(self.keys)) + 1):
            key[0, :, (seen - back) % window] = self.keys[-back].to(key.dtype)
            value[0, :, (seen - back) % window] = self.values[-back].to(value.dtype)


@torch.no_grad()
def reference_forward(model: InfoMamba, inputs: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
    """inputs: (T,) token ids or (T, d_input) floats for ONE sequence, from a zero state, or from `state` (a
    StreamState of one stream on the CPU), which then receives the final state (steps included).
    Returns the head output per step (T, d_out), or (n_classes,) for a classify head. fp32 throughout."""
    cfg = model.config
    p = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    E, N, K = cfg.d_inner, cfg.d_state, cfg.d_conv
    recurrent = [i for i, kind in enumerate(cfg.layer_types) if kind == "infomamba"]
    states: list = [None] * cfg.n_layers  # per layer: _LayerState, _AttentionHistory, or None (an MLP)
    for i, kind in enumerate(cfg.layer_types):
        if kind == "infomamba":
            states[i] = (_LayerState(E, K, N, cfg.n_concepts, cfg.d_concept) if state is None
                         else _LayerState.from_stream(state, recurrent.index(i), cfg.concept_eps))
        elif kind == "attention":
            states[i] = _AttentionHistory() if state is None else _AttentionHistory.from_stream(state, i)
    first = 0 if state is None else int(state.steps[0])
    outputs = []
    for t in range(inputs.shape[0]):
        if cfg.vocab_size is not None:
            x = p["embedding.weight"][int(inputs[t])]
        else:
            x = p["input_proj.weight"] @ inputs[t].float() + p["input_proj.bias"]
        for i, (layer, st) in enumerate(zip(cfg.layer_configs, states)):
            pre = f"layers.{i}."
            if layer.type == "attention":
                x = x + _attention_step(p, pre, cfg, layer, st, x, first + t)
            elif layer.type == "mlp":
                x = x + _mlp_step(p, pre, cfg, x)
            else:
                x = x + _layer_step(p, pre, cfg, st, x)
        hidden = _rms(x, p["norm_f.weight"], cfg.norm_eps)
        weight = p["embedding.weight"] if cfg.is_tied else p["head.weight"]
        out = weight @ hidden
        if not cfg.is_tied and "head.bias" in p:
            out = out + p["head.bias"]
        outputs.append(out)
    if state is not None:
        for i, st in enumerate(states):
            if isinstance(st, _LayerState):
                st.write_to(state, recurrent.index(i), cfg.concept_eps)
            elif isinstance(st, _AttentionHistory):
                st.write_to(state, i, first + inputs.shape[0])
        state.steps += inputs.shape[0]
    out = torch.stack(outputs)
    return out[-1] if cfg.head == "classify" else out


def concept_step(S: torch.Tensor, m: torch.Tensor, a: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                 gamma: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the concept recurrence in raw fp64 sums: S (k, C), m (k,), a (k,), v (C,), gamma (k,) fp64.
    Returns a_t^T M c_t (C,) fp32 before the norm, and the new S and m."""
    S = gamma[:, None] * S + torch.outer(a, v).double()
    m = gamma * m + a.double()
    c = mix @ (S / (m[:, None] + eps)).float()  # (k, C)
    return a @ c, S, m


def _layer_step(p: dict, pre: str, cfg, st: _LayerState, x: torch.Tensor) -> torch.Tensor:
    h = _rms(x, p[pre + "norm.weight"], cfg.norm_eps)
    u, extra = h, 0.0
    if cfg.n_concepts > 0:
        a = torch.softmax(p[pre + "concept.route.weight"] @ h + p[pre + "concept.route.bias"], dim=0)  # (k,)
        v = p[pre + "concept.value.weight"] @ h  # (C,)
        gamma = _decay(p, pre, cfg)  # (k,) fp64, ones without decay
        read, st.S, st.m = concept_step(st.S, st.m, a, v, p[pre + "concept.mix"], gamma, cfg.concept_eps)
        r = F.gelu(_rms(read, p[pre + "concept.norm.weight"], cfg.norm_eps))
        gates = torch.sigmoid(p[pre + "fusion.gate.weight"] @ torch.cat([h, r]) + p[pre + "fusion.gate.bias"])
        g_s, g_o = gates[:cfg.d_concept], gates[cfg.d_concept:]
        u = h + p[pre + "fusion.to_input.weight"] @ (g_s * r)
        extra = p[pre + "fusion.to_output.weight"] @ (g_o * r)
    return _mamba_step(p, pre + "mixer.", cfg, st, u) + extra


def _decay(p: dict, pre: str, cfg) -> torch.Tensor:
    """γ = sigmoid(θ) per concept, in fp64 from the stored θ; ones for concept_decay "none"."""
    if cfg.concept_decay == "none":
        return torch.ones(cfg.n_concepts, dtype=torch.float64)
    return torch.sigmoid(p[pre + "concept.decay_logit"].double())


def _mamba_step(p: dict, pre: str, cfg, st: _LayerState, u: torch.Tensor) -> torch.Tensor:
    E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
    xz = p[pre + "in_proj.weight"] @ u + p.get(pre + "in_proj.bias", 0.0)
    x_in, z = xz[:E], xz[E:]
    window = torch.cat([st.window, x_in[None]], dim=0)  # (K, E)
    st.window = window[1:]
    conv = (window.t() * p[pre + "conv1d.weight"][:, 0, :]).sum(-1) + p.get(pre + "conv1d.bias", 0.0)
    xc = F.silu(conv)
    dbc = p[pre + "x_proj.weight"] @ xc
    delta, B, C = dbc[:R], dbc[R:R + N], dbc[R + N:]
    dt = F.softplus(p[pre + "dt_proj.weight"] @ delta + p[pre + "dt_proj.bias"])  # (E,)
    A = -torch.exp(p[pre + "A_log"])  # (E, N)
    st.s = torch.exp(dt[:, None] * A) * st.s + (dt * xc)[:, None] * B[None, :]
    y = st.s @ C + p[pre + "D"] * xc
    y = y * F.silu(z)
    return p[pre + "out_proj.weight"] @ y + p.get(pre + "out_proj.bias", 0.0)


def _attention_step(p: dict, pre: str, cfg, layer, hist: _AttentionHistory, x: torch.Tensor,
                    position: int) -> torch.Tensor:
    """x_t -> W_O Attn(RMSNorm(x_t)) at absolute `position`, appending this step's key and value to `hist`."""
    H, G = layer.n_heads, layer.n_kv_heads
    Dh = cfg.d_model // H
    h = _rms(x, p[pre + "norm.weight"], cfg.norm_eps)
    q = (p[pre + "attention.q_proj.weight"] @ h).view(H, Dh)
    k = (p[pre + "attention.k_proj.weight"] @ h).view(G, Dh)
    v = (p[pre + "attention.v_proj.weight"] @ h).view(G, Dh)
    if layer.rope:
        q, k = _rotary(q, position, layer.rope_theta), _rotary(k, position, layer.rope_theta)
    hist.keys.append(k)
    hist.values.append(v)
    keys = torch.stack(hist.keys[-layer.attention_window:])  # (n, G, Dh): the last W positions, this one included
    values = torch.stack(hist.values[-layer.attention_window:])
    heads = []
    for head in range(H):
        group = head // (H // G)  # the key/value head this query head reads
        weights = torch.softmax(keys[:, group] @ q[head] / math.sqrt(Dh), dim=0)  # (n,)
        heads.append(weights @ values[:, group])
    return p[pre + "attention.o_proj.weight"] @ torch.cat(heads)


def _rotary(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate feature pairs (i, i + Dh/2) of each head row of x by position * theta^(-i / (Dh/2)), in fp64."""
    half = x.shape[1] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-i / half)
        c, s = math.cos(angle), math.sin(angle)
        out[:, i] = x[:, i] * c - x[:, i + half] * s
        out[:, i + half] = x[:, i + half] * c + x[:, i] * s
    return out


def _mlp_step(p: dict, pre: str, cfg, x: torch.Tensor) -> torch.Tensor:
    h = _rms(x, p[pre + "norm.weight"], cfg.norm_eps)
    gate = p[pre + "mlp.gate_proj.weight"] @ h
    return p[pre + "mlp.down_proj.weight"] @ (F.silu(gate) * (p[pre + "mlp.up_proj.weight"] @ h))
