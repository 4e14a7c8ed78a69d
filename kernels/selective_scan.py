"""Mamba-1 selective scan (S6) over packed sequences, D skip and SiLU(z) gate fused, state in the slot pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import pad_packed, unpad


def selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, state_indices, dt_softplus=True):
    """Chunk form.

    x, dt, z: (total, d_inner) (z may be None: no gate); A: (d_inner, d_state) fp32 (negative);
    B, C: (total, d_state); D, dt_bias: (d_inner,) or None; ssm_state: (slots, d_inner, d_state) fp32,
    read as the initial state and overwritten with the final one; cu_seqlens: (batch + 1,);
    state_indices: (batch,), -1 skips the sequence (output rows zero, no state touched).
    Returns y = (s_t C_t + D x_t) * silu(z_t): (total, d_inner) in x.dtype.
    """
    live = state_indices >= 0
    xs, mask = pad_packed(x.float(), cu_seqlens)  # (b, L, E)
    dts, _ = pad_packed(dt.float(), cu_seqlens)
    Bs, _ = pad_packed(B.float(), cu_seqlens)  # (b, L, N)
    Cs, _ = pad_packed(C.float(), cu_seqlens)
    if dt_bias is not None:
        dts = dts + dt_bias.float()
    if dt_softplus:
        dts = F.softplus(dts)
    slots = state_indices.clamp(min=0).long()
    s = ssm_state[slots].float()  # (b, E, N)
    ys = torch.zeros_like(xs)
    for t in range(xs.shape[1]):
        step = mask[:, t] & live
        decay = torch.exp(dts[:, t, :, None] * A)  # (b, E, N)
        s_next = decay * s + (dts[:, t] * xs[:, t])[..., None] * Bs[:, t, None, :]
        s = torch.where(step[:, None, None], s_next, s)
        ys[:, t] = (s @ Cs[:, t, :, None]).squeeze(-1)
    y = unpad(ys, mask)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    token_live = torch.repeat_interleave(live, (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    y = torch.where(token_live[:, None], y, torch.zeros_like(y))
    ssm_state[slots[live]] = s[live].to(ssm_state.dtype)
    return y.to(x.dtype)
