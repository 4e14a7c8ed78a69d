"""The concept bottleneck's causal linear attention with k-dimensional keys (DESIGN.md §1).

The pool stores concept means `S / (m + eps)` (fp32, bounded by the values) and the mass m (fp64), not raw sums,
so a stream millions of steps long keeps full precision (DESIGN.md §2). Over a chunk, with
q_t = (a_t M) / (m_t + eps):  read_t = (q_t * (m_prev + eps)) @ mean_prev + sum_{s<=t} (q_t . a_s) v_s.
"""
from __future__ import annotations

import torch

from kernels.packing import seq_lengths


def concept_filter_ref(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps):
    """Chunk form.

    a: (total, k) routing weights (rows sum to 1); v: (total, d_c); mix: (k, k) the matrix M;
    concept_mean: (slots, k, d_c) fp32 and concept_mass: (slots, k) fp64, read and updated in place;
    state_indices: (batch,), -1 skips the sequence (output rows zero).
    Returns read_t = a_t^T M (S_t / (m_t + eps)): (total, d_c) fp32.
    """
    out = a.new_zeros((a.shape[0], v.shape[1]), dtype=torch.float32)
    slots = state_indices.tolist()
    mix = mix.float()
    for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), seq_lengths(cu_seqlens))):
        slot = slots[i]
        if slot < 0 or length == 0:
            continue
        ai, vi = a[start:start + length].float(), v[start:start + length].float()  # (L, k), (L, d_c)
        mass_prev, mean_prev = concept_mass[slot], concept_mean[slot].float()  # (k,) fp64, (k, d_c)
        mass = mass_prev + torch.cumsum(ai.double(), dim=0)  # (L, k)
        q = (ai @ mix) / (mass + eps).float()  # (L, k)
        carried = (q * (mass_prev + eps).float()) @ mean_prev  # (L, d_c)
        local = torch.tril(q @ ai.t()) @ vi  # (L, d_c)
        out[start:start + length] = carried + local
        final = mass[-1]
        keep = ((mass_prev + eps) / (final + eps)).float()  # (k,) <= 1
        concept_mean[slot] = mean_prev * keep[:, None] + (ai.t() @ vi) / (final + eps).float()[:, None]
        concept_mass[slot] = final
    return out


def concept_filter_update_ref(a, v, mix, concept_mean, concept_mass, state_indices, eps):
    """One step for a batch of slots: a (batch, k), v (batch, d_c); state updated in place; -1 rows skipped.
    Returns (batch, d_c) fp32."""
    out = a.new_zeros((a.shape[0], v.shape[1]), dtype=torch.float32)
    live = state_indices >= 0
    if not bool(live.any()):
        return out
    slots = state_indices[live].long()
    al, vl = a[live].float(), v[live].float()
    mass_prev = concept_mass[slots]
    mass = mass_prev + al.double()
    keep = ((mass_prev + eps) / (mass + eps)).float()
    mean = concept_mean[slots].float() * keep[..., None] + al[..., None] * vl[:, None, :] / (mass + eps).float()[..., None]
    concept_mean[slots] = mean
    concept_mass[slots] = mass
    out[live] = ((al @ mix.float()).unsqueeze(1) @ mean).squeeze(1)
    return out
