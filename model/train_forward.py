"""A differentiable, full-sequence forward for training: the same function as `InfoMamba.forward` from a zero
state, over (batch, L) windows, with parallel scans instead of the inference ops' per-step loops.

The inference ops (kernels/*_ref) loop over time in Python and write the state pool in place; that is right
for serving and far too slow for training. Here every sequence starts from a zero state and no state is
carried out, so:

- the causal conv is a padded depthwise `F.conv1d`;
- the selective scan s_t = a_t s_{t-1} + b_t (a = exp(Δ A), b = Δ x B) is `linear_scan`, a custom autograd
  function whose forward and backward are both chunked parallel scans in linear space (a in (0, 1], so
  nothing overflows, unlike a log-space cumsum of decays), saving only a and s for the backward;
- the concept filter is the masked linear attention read_t = Σ_{s<=t} (q_t · a_s) v_s, q_t = (a_t M) / (m_t + eps).

Axis letters as in model/layers.py: B batch, L length, D d_model, E d_inner, N d_state, k concepts, C d_concept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.infomamba import InfoMamba
from model.layers import ConceptBottleneck, InformationFusion, MambaMixer, rms_norm

SCAN_CHUNK = 8


@dataclass
class TrainOutput:
    logits: torch.Tensor  # (B, L, vocab) for the lm head; (B, L, d_output) per_step; (B, n_classes) classify
    # Per layer with concepts: (mixer output, W_o (g_o ⊙ r)), both (B, L, D): the IMF redundancy term's inputs.
    branches: list[tuple[torch.Tensor, torch.Tensor]]


def train_forward(model: InfoMamba, inputs: torch.Tensor) -> TrainOutput:
    """inputs: token ids (B, L) or float vectors (B, L, d_input); every sequence starts from a zero state."""
    cfg = model.config
    x = model.embedding(inputs.long()) if cfg.vocab_size is not None else model.input_proj(inputs.to(model.dtype))
    branches = []
    y, residual = x, None
    for layer in model.layers:
        residual = y.float() if residual is None else residual + y.float()
        h = rms_norm(residual, layer.norm.weight, layer.norm.eps)
        if layer.has_concepts:
            r = concept_read(layer.concept, h)
            u, extra = _fuse(layer.fusion, h, r)
            mixed = mixer_forward(layer.mixer, u)
            branches.append((mixed, extra))
            y = mixed + extra
        else:
            y = mixer_forward(layer.mixer, h)
    hidden = rms_norm(residual + y.float(), model.norm_f.weight, model.norm_f.eps)
    if cfg.head == "classify":
        hidden = hidden[:, -1]
    weight = model.embedding.weight if cfg.is_tied else model.head.weight
    bias = None if cfg.is_tied else model.head.bias
    return TrainOutput(logits=F.linear(hidden, weight, bias), branches=branches)


def _fuse(fusion: InformationFusion, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = r.to(h.dtype)
    gates = torch.sigmoid(fusion.gate(torch.cat([h, r], dim=-1)))
    g_s, g_o = gates[..., :fusion.d_concept], gates[..., fusion.d_concept:]
    return h + fusion.to_input(g_s * r), fusion.to_output(g_o * r)


def concept_read(concept: ConceptBottleneck, h: torch.Tensor) -> torch.Tensor:
    """h: (B, L, D) -> r: (B, L, C), the layer's global context, from a zero concept state."""
    a = torch.softmax(concept.route(h).float(), dim=-1)  # (B, L, k)
    v = concept.value(h)  # (B, L, C)
    with torch.autocast(h.device.type, enabled=False):
        v = v.float()
        mass = torch.cumsum(a, dim=1)  # (B, L, k)
        q = (a @ concept.mix.float()) / (mass + concept.eps)  # (B, L, k)
        scores = torch.tril(q @ a.transpose(1, 2))  # (B, L, L): q_t · a_s for s <= t
        read = scores @ v  # (B, L, C)
    return F.gelu(rms_norm(read, concept.norm.weight, concept.norm_eps))


def mixer_forward(mixer: MambaMixer, u: torch.Tensor) -> torch.Tensor:
    """Mamba-1 over (B, L, D) from a zero conv window and SSM state -> (B, L, D)."""
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    length = u.shape[1]
    xz = mixer.in_proj(u)  # (B, L, 2E)
    x_in, z = xz[..., :E], xz[..., E:]
    conv = F.conv1d(x_in.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias,
                    padding=mixer.conv1d.padding[0], groups=E)[..., :length]
    xc = F.silu(conv.transpose(1, 2))  # (B, L, E)
    dbc = mixer.x_proj(xc)  # (B, L, R + 2N)
    dt = F.linear(dbc[..., :R], mixer.dt_proj.weight)  # (B, L, E)
    with torch.autocast(u.device.type, enabled=False):
        B_, C_ = dbc[..., R:R + N].float(), dbc[..., R + N:].float()  # (B, L, N)
        delta = F.softplus(dt.float() + mixer.dt_proj.bias.float())  # (B, L, E)
        A = -torch.exp(mixer.A_log.float())  # (E, N)
        decay = torch.exp(delta[..., None] * A)  # (B, L, E, N)
        drive = (delta * xc.float())[..., None] * B_[:, :, None, :]  # (B, L, E, N)
        s = linear_scan(decay, drive)  # (B, L, E, N)
        y = torch.einsum("blen,bln->ble", s, C_) + mixer.D.float() * xc.float()
        y = y * F.silu(z.float())
    return mixer.out_proj(y.to(xc.dtype))


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
