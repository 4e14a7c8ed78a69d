"""A differentiable, full-sequence forward for training: the same function as `InfoMamba.forward`, over (batch, L)
windows, with parallel scans instead of the inference ops' per-step loops.

The inference ops (kernels/*_ref) loop over time in Python and write the state pool in place; that is right
for serving and far too slow for training. Here each window starts from a zero state, or from a carried
`StreamState` (truncated backpropagation through time: the carried state is a constant, and the state after the
window is returned detached), so:

- the causal conv is a depthwise `F.conv1d` over the carried window followed by the inputs;
- the selective scan s_t = a_t s_{t-1} + b_t (a = exp(Δ A), b = Δ x B) is `linear_scan`, a custom autograd
  function whose forward and backward are both chunked parallel scans in linear space (a in (0, 1], so
  nothing overflows, unlike a log-space cumsum of decays), saving only a and s for the backward;
- the concept filter is the decayed linear attention read_t = Σ_{s<=t} (q_t γ^(t-s) · a_s) v_s plus the carried
  state's share, q_t = (a_t M) / (m_t + eps), computed chunk by chunk (DESIGN.md §1): within a chunk a masked
  product, across chunks a `linear_scan` of the chunks' decayed sums;
- a hybrid's attention layer is dense attention under a causal mask as wide as its window (from a zero state only:
  a window carried into the next one would need the rings), its MLP layer the module itself.

Axis letters as in model/layers.py: B batch, L length, D d_model, E d_inner, N d_state, k concepts, C d_concept;
n chunks of Q rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention import AttentionLayer, rotate
from model.infomamba import InfoMamba
from model.layers import ConceptBottleneck, InformationFusion, MambaMixer, rms_norm
from model.mlp import MlpLayer
from model.state import LayerState, StreamState

SCAN_CHUNK = 8
CONCEPT_CHUNK = 64  # Q: the concept term's (Q, Q) blocks; with decay a (Q, Q, k) table


@dataclass
class TrainOutput:
    logits: torch.Tensor  # (B, L, vocab) for the lm head; (B, L, d_output) per_step; (B, n_classes) classify
    # Per layer with concepts: (mixer output, W_o (g_o ⊙ r)), both (B, L, D): the IMF redundancy term's inputs.
    branches: list[tuple[torch.Tensor, torch.Tensor]]
    state: StreamState | None = None  # after the window, detached; only when a state was passed in


def train_forward(model: InfoMamba, inputs: torch.Tensor, state: StreamState | None = None) -> TrainOutput:
    """inputs: token ids (B, L) or float vectors (B, L, d_input). Every sequence starts from a zero state, or from
    `state` (a StreamState of B streams, read only), and then the output carries the state after the window."""
    cfg = model.config
    if cfg.is_hybrid and state is not None:
        raise NotImplementedError("train_forward: a carried state through attention layers (stateful training of a "
                                  "hybrid) is not implemented; hybrids train on windows from an empty state")
    x = model.embedding(inputs.long()) if cfg.vocab_size is not None else model.input_proj(inputs.to(model.dtype))
    branches, ends = [], []
    y, residual = x, None
    for i, layer in enumerate(model.layers):
        carried = state.layer(i) if state is not None else None
        residual = y.float() if residual is None else residual + y.float()
        h = rms_norm(residual, layer.norm.weight, layer.norm.eps)
        if isinstance(layer, AttentionLayer):
            y = attention_forward(layer, h, cfg.layer_configs[i].attention_window)
            continue
        if isinstance(layer, MlpLayer):
            y = layer.mlp(h)
            continue
        concept_end = None
        if layer.has_concepts:
            r, concept_end = concept_read(layer.concept, h, carried)
            u, extra = _fuse(layer.fusion, h, r)
            mixed, mixer_end = mixer_forward(layer.mixer, u, carried)
            branches.append((mixed, extra))
            y = mixed + extra
        else:
            y, mixer_end = mixer_forward(layer.mixer, h, carried)
        ends.append((mixer_end, concept_end))
    hidden = rms_norm(residual + y.float(), model.norm_f.weight, model.norm_f.eps)
    if cfg.head == "classify":
        hidden = hidden[:, -1]
    weight = model.embedding.weight if cfg.is_tied else model.head.weight
    bias = None if cfg.is_tied else model.head.bias
    new_state = _stack_state(state, ends, inputs.shape[1]) if state is not None else None
    return TrainOutput(logits=F.linear(hidden, weight, bias), branches=branches, state=new_state)


def attention_forward(layer: AttentionLayer, h: torch.Tensor, window: int) -> torch.Tensor:
    """(B, L, D) -> (B, L, D): every position attends to itself and the window - 1 before it, from position 0."""
    batch, length, _ = h.shape
    proj = layer.attention
    q = proj.q_proj(h).view(batch * length, layer.n_heads, layer.d_head)
    k = proj.k_proj(h).view(batch * length, layer.n_kv_heads, layer.d_head)
    v = proj.v_proj(h).view(batch, length, layer.n_kv_heads, layer.d_head)
    if layer.rope_theta is not None:
        positions = torch.arange(length, device=h.device).repeat(batch)
        q, k = rotate(q, positions, layer.rope_theta), rotate(k, positions, layer.rope_theta)
    group = layer.n_heads // layer.n_kv_heads
    q = q.view(batch, length, layer.n_heads, layer.d_head).transpose(1, 2)  # (B, H, L, Dh)
    k = k.view(batch, length, layer.n_kv_heads, layer.d_head).repeat_interleave(group, dim=2).transpose(1, 2)
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    t = torch.arange(length, device=h.device)
    gap = t[:, None] - t[None, :]
    visible = (gap >= 0) & (gap < window)  # (L, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=layer.scale)  # (B, H, L, Dh)
    return proj.o_proj(out.transpose(1, 2).reshape(batch, length, layer.n_heads * layer.d_head))


def _stack_state(state: StreamState, ends: list, length: int) -> StreamState:
    """The per-layer end states as one StreamState (k = 0 layers keep their empty concept tensors)."""
    conv = torch.stack([mixer[0] for mixer, _ in ends]).to(state.conv.dtype)
    ssm = torch.stack([mixer[1] for mixer, _ in ends])
    if ends[0][1] is None:
        mean, mass = state.concept_mean.clone(), state.concept_mass.clone()
    else:
        mean = torch.stack([concept[0] for _, concept in ends])
        mass = torch.stack([concept[1] for _, concept in ends])
    return StreamState(conv=conv, ssm=ssm, concept_mean=mean, concept_mass=mass, steps=state.steps + length)


def _fuse(fusion: InformationFusion, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = r.to(h.dtype)
    gates = torch.sigmoid(fusion.gate(torch.cat([h, r], dim=-1)))
    g_s, g_o = gates[..., :fusion.d_concept], gates[..., fusion.d_concept:]
    return h + fusion.to_input(g_s * r), fusion.to_output(g_o * r)


def concept_read(concept: ConceptBottleneck, h: torch.Tensor, state: LayerState | None = None,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """h: (B, L, D) -> r: (B, L, C), the layer's global context, from a zero concept state or from `state`; and,
    with a state, the concept state after the window: (mean (B, k, C) fp32, mass (B, k) fp64), detached."""
    a = torch.softmax(concept.route(h).float(), dim=-1)  # (B, L, k)
    v = concept.value(h)  # (B, L, C)
    log_decay = concept.log_decay()  # (k,) or None
    end = None
    with torch.autocast(h.device.type, enabled=False):
        v = v.float()
        batch, k, C = a.shape[0], a.shape[2], v.shape[2]
        if state is None:
            mean0, mass0 = a.new_zeros(batch, k, C), a.new_zeros(batch, k, dtype=torch.float64)
        else:
            mean0, mass0 = state.concept_mean.float(), state.concept_mass.double()
        read = _decayed_linear_attention(a, v, concept.mix.float(), log_decay, concept.eps, mean0, mass0)
        if state is not None:
            end = _concept_end_state(a, v, log_decay, concept.eps, mean0, mass0)
    return F.gelu(rms_norm(read, concept.norm.weight, concept.norm_eps)), end


def _decayed_linear_attention(a, v, mix, log_decay, eps, mean0, mass0):
    """read_t = q_t · S_t with S_t = γ^(t+1) S_0 + Σ_{s<=t} γ^(t-s) a_s ⊗ v_s, q_t = (a_t M) / (m_t + eps).

    a: (B, L, k), v: (B, L, C) fp32; log_decay: (k,) λ or None; mean0 (B, k, C), mass0 (B, k): the carried
    state (zeros for none). Returns (B, L, C) fp32. Differentiable in a, v, M and λ; the carried state is a constant.
    """
    batch, length, k = a.shape
    Q = min(CONCEPT_CHUNK, length)
    n = -(-length // Q)
    pad = n * Q - length  # padded rows come after every real row, so no real row reads them
    a_c = F.pad(a, (0, 0, 0, pad)).view(batch, n, Q, k)
    v_c = F.pad(v, (0, 0, 0, pad)).view(batch, n, Q, -1)
    lam = log_decay.float() if log_decay is not None else a.new_zeros(k)  # (k,)
    t = torch.arange(Q, device=a.device)
    gap = t[:, None] - t[None, :]
    causal = gap >= 0
    within = torch.exp(torch.where(causal, gap, 0)[..., None] * lam) * causal[..., None]  # (Q, Q, k): γ^(t-s)
    growth = torch.exp((t + 1)[:, None] * lam)  # (Q, k): γ^(t+1)
    # each chunk's decayed sums at its end, then every chunk's entry sums (the window's share only)
    tail = within[-1]  # (Q, k): γ^(Q-1-s)
    chunk_S = (a_c * tail).transpose(-1, -2) @ v_c  # (B, n, k, C)
    chunk_m = (a_c * tail).sum(2)  # (B, n, k)
    chunk_decay = torch.exp(Q * lam)  # (k,)
    entry_S = _exclusive_scan(chunk_decay[:, None].expand_as(chunk_S[0, 0]), chunk_S)  # (B, n, k, C)
    entry_m = _exclusive_scan(chunk_decay, chunk_m)  # (B, n, k)
    # the carried state decays from the window's start: γ^(τ+1) at absolute row τ
    position = torch.arange(n * Q, device=a.device).view(n, Q)
    from_start = torch.exp((position + 1)[..., None] * lam)  # (n, Q, k)
    mass = (from_start * mass0.float()[:, None, None, :] + growth * entry_m[:, :, None, :]
            + torch.einsum("tsk,bnsk->bntk", within, a_c))  # (B, n, Q, k)
    q = (a_c @ mix) / (mass + eps)  # (B, n, Q, k)
    carried = (q * from_start * (mass0.float() + eps)[:, None, None, :]) @ mean0[:, None]  # (B, n, Q, C)
    carried = carried + (q * growth) @ entry_S
    if log_decay is None:
        scores = torch.tril(q @ a_c.transpose(-1, -2))  # (B, n, Q, Q): q_t · a_s
    else:
        scores = torch.einsum("bntk,bnsk,tsk->bnts", q, a_c, within)  # q_t γ^(t-s) · a_s
    read = carried + scores @ v_c
    return read.reshape(batch, n * Q, -1)[:, :length]


def _exclusive_scan(decay: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """E_0 = 0, E_{c+1} = decay ⊙ E_c + sums_c over dim 1 of sums (B, n, ...); decay broadcasts to sums[0, 0]."""
    scanned = linear_scan(decay.expand_as(sums).contiguous(), sums)
    return torch.cat([torch.zeros_like(scanned[:, :1]), scanned[:, :-1]], dim=1)


@torch.no_grad()
def _concept_end_state(a, v, log_decay, eps, mean0, mass0):
    """The concept state after the window in the pool's form, summed in fp64: (mean (B, k, C) fp32, mass (B, k))."""
    length = a.shape[1]
    lam = log_decay.double() if log_decay is not None else a.new_zeros(a.shape[2], dtype=torch.float64)
    back = torch.arange(length - 1, -1, -1, device=a.device, dtype=torch.float64)  # L-1-s
    weights = a.double() * torch.exp(back[:, None] * lam)  # (B, L, k): γ^(L-1-s) a_s
    carry = torch.exp(length * lam)  # (k,): γ^L
    mass = carry * mass0 + weights.sum(1)
    sums = carry[:, None] * (mass0 + eps)[..., None] * mean0.double() + weights.transpose(1, 2) @ v.double()
    return (sums / (mass + eps)[..., None]).float(), mass


def mixer_forward(mixer: MambaMixer, u: torch.Tensor, state: LayerState | None = None,
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mamba-1 over (B, L, D) from a zero conv window and SSM state, or from `state`'s -> (B, L, D), and the
    (conv window (B, E, K-1), SSM state (B, E, N)) after the window, detached."""
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    batch, length = u.shape[:2]
    K = mixer.conv1d.kernel_size[0]
    xz = mixer.in_proj(u)  # (B, L, 2E)
    x_in, z = xz[..., :E], xz[..., E:]
    window = (state.conv.to(x_in.dtype) if state is not None
              else x_in.new_zeros(batch, E, K - 1))  # (B, E, K-1): the last inputs before the window
    taps = torch.cat([window, x_in.transpose(1, 2)], dim=2)  # (B, E, K-1+L)
    conv = F.conv1d(taps, mixer.conv1d.weight, mixer.conv1d.bias, groups=E)  # (B, E, L)
    xc = F.silu(conv.transpose(1, 2))  # (B, L, E)
    dbc = mixer.x_proj(xc)  # (B, L, R + 2N)
    dt = F.linear(dbc[..., :R], mixer.dt_proj.weight)  # (B, L, E)
    with torch.autocast(u.device.type, enabled=False):
        B_, C_ = dbc[..., R:R + N].float(), dbc[..., R + N:].float()  # (B, L, N)
        delta = F.softplus(dt.float() + mixer.dt_proj.bias.float())  # (B, L, E)
        A = -torch.exp(mixer.A_log.float())  # (E, N)
        decay = torch.exp(delta[..., None] * A)  # (B, L, E, N)
        drive = (delta * xc.float())[..., None] * B_[:, :, None, :]  # (B, L, E, N)
        if state is not None:  # fold the carried state into the first step: b_0 += a_0 s_{-1}
            drive = torch.cat([drive[:, :1] + decay[:, :1] * state.ssm.float()[:, None], drive[:, 1:]], dim=1)
        s = linear_scan(decay, drive)  # (B, L, E, N)
        y = torch.einsum("blen,bln->ble", s, C_) + mixer.D.float() * xc.float()
        y = y * F.silu(z.float())
    end = (taps[..., -(K - 1):].detach(), s[:, -1].detach())
    return mixer.out_proj(y.to(xc.dtype)), end


# -- the linear recurrence --------------------------------------------------------------------------------


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s_t = a_t * s_{t-1} + b_t along dim 1 from s_{-1} = 0. a, b: (B, L, ...) fp32, a in [0, 1]."""
    return _LinearScan.apply(a, b)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        s = _scan(a, b)
        ctx.save_for_backward(a, s)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        a, s = ctx.saved_tensors
        # The adjoint runs the same recurrence backwards: g_t = grad_s_t + a_{t+1} g_{t+1}.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        grad_b = _scan(a_next.flip(1), grad_s.flip(1)).flip(1)
        s_prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)
        return grad_b * s_prev, grad_b


@torch.no_grad()
def _scan(a: torch.Tensor, b: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """Within chunks: a Hillis-Steele scan (log2(chunk) doubling steps) of the pairs (a, b) under
    (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2); across chunks: a short loop carrying each chunk's last state."""
    batch, length = a.shape[:2]
    rest = a.shape[2:]
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        a = torch.cat([a, a.new_ones((batch, pad) + rest)], dim=1)
        b = torch.cat([b, b.new_zeros((batch, pad) + rest)], dim=1)
    acc_a = a.reshape(batch, num_chunks, chunk, *rest)
    acc_b = b.reshape(batch, num_chunks, chunk, *rest)
    step = 1
    while step < chunk:  # each step writes fresh tensors: the inputs are never modified
        head_b = acc_b.new_zeros(acc_b[:, :, :step].shape)
        head_a = acc_a.new_ones(acc_a[:, :, :step].shape)
        acc_b = torch.addcmul(acc_b, acc_a, torch.cat([head_b, acc_b[:, :, :-step]], dim=2))
        acc_a = acc_a * torch.cat([head_a, acc_a[:, :, :-step]], dim=2)
        step *= 2
    if acc_b.data_ptr() == b.data_ptr():
        acc_b = acc_b.clone()
    for c in range(1, num_chunks):
        acc_b[:, c].addcmul_(acc_a[:, c], acc_b[:, c - 1, -1:])
    return acc_b.reshape(batch, num_chunks * chunk, *rest)[:, :length]
