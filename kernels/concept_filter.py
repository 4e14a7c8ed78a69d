"""The concept bottleneck's causal linear attention with k-dimensional keys (DESIGN.md §1).

The pool stores concept means `S / (m + eps)` (fp32, bounded by the values) and the mass m (fp64), not raw sums,
so a stream millions of steps long keeps full precision (DESIGN.md §2). Over a chunk, with
q_t = (a_t M) / (m_t + eps):  read_t = (q_t * (m_prev + eps)) @ mean_prev + sum_{s<=t} (q_t . a_s) v_s.
"""
from __future__ import annotations

import torch

from kernels.packing import host_bounds, seq_lengths


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


# ---------------------------------------------------------------------------------------------------------
# Triton kernels. Chunk form, chunk-parallel like the selective scan (chunks never span two sequences):
#   pass 1 (_concept_chunk_sums_kernel):    per chunk, its raw sums a^T v (k, d_c) and its mass sum(a) (fp64);
#   pass 2 (_concept_chunk_combine_kernel): per sequence, a loop over its chunks in the mean+mass form, giving
#                                           each chunk's entry (mean, mass) and the pool's final mean;
#   pass 3 (_concept_chunk_output_kernel):  per chunk, read_t = carried + causal local part (two dots), and the
#                                           pool's final mass (written here: pass 2's programs all read it).
# Raw sums live only within one chunk, so they stay bounded however long the stream is (DESIGN.md §2).

from kernels._triton import HAS_TRITON, check_indices, check_pool, tl, triton  # noqa: E402


@triton.jit
def _concept_chunk_sums_kernel(
    # pointers
    a_ptr, v_ptr, cu_seqlens_ptr, state_indices_ptr, chunk_seq_ptr, chunk_pos_ptr, chunk_sum_ptr, chunk_mass_ptr,
    # sizes
    k, d_c,
    # strides
    stride_a_token, stride_v_token, stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk,
    # meta-parameters
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    pid_dc = tl.program_id(1)
    seq = tl.load(chunk_seq_ptr + chunk)
    live = tl.load(state_indices_ptr + seq) >= 0
    seq_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + tl.load(chunk_pos_ptr + chunk).to(tl.int64) * CHUNK
    rows = first + tl.arange(0, CHUNK)  # (T,)
    row_mask = (rows < seq_end) & live
    j = tl.arange(0, BLOCK_K)  # (K,)
    e = pid_dc * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (E,) columns of v
    a = tl.load(a_ptr + rows[:, None] * stride_a_token + j[None, :], mask=row_mask[:, None] & (j < k)[None, :],
                other=0.0).to(tl.float32)  # (T, K)
    v = tl.load(v_ptr + rows[:, None] * stride_v_token + e[None, :], mask=row_mask[:, None] & (e < d_c)[None, :],
                other=0.0).to(tl.float32)  # (T, E)
    sums = tl.dot(tl.trans(a), v, input_precision="ieee")  # (K, E)
    tl.store(chunk_sum_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k + e[None, :], sums,
             mask=(j < k)[:, None] & (e < d_c)[None, :])
    if pid_dc == 0:
        tl.store(chunk_mass_ptr + chunk * stride_chunk_mass_chunk + j, tl.sum(a.to(tl.float64), axis=0), mask=j < k)


@triton.jit
def _concept_chunk_combine_kernel(
    # pointers
    concept_mean_ptr, concept_mass_ptr, state_indices_ptr, chunk_cu_ptr, chunk_sum_ptr, chunk_mass_ptr,
    entry_mean_ptr, entry_mass_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk,
    # meta-parameters
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    seq = tl.program_id(0)
    pid_dc = tl.program_id(1)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    if slot >= 0:
        j = tl.arange(0, BLOCK_K)  # (K,)
        e = pid_dc * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (E,)
        k_mask = j < k
        mask = k_mask[:, None] & (e < d_c)[None, :]
        tile = j[:, None] * stride_chunk_sum_k + e[None, :]
        mean_ptrs = concept_mean_ptr + slot * stride_mean_slot + j[:, None] * stride_mean_k + e[None, :]
        mean = tl.load(mean_ptrs, mask=mask, other=0.0)  # (K, E) fp32
        mass = tl.load(concept_mass_ptr + slot * stride_mass_slot + j, mask=k_mask, other=0.0)  # (K,) fp64
        c_first = tl.load(chunk_cu_ptr + seq).to(tl.int64)
        num_chunks = tl.load(chunk_cu_ptr + seq + 1).to(tl.int64) - c_first
        for i in tl.range(0, num_chunks):
            c = c_first + i
            tl.store(entry_mean_ptr + c * stride_chunk_sum_chunk + tile, mean, mask=mask)
            if pid_dc == 0:
                tl.store(entry_mass_ptr + c * stride_chunk_mass_chunk + j, mass, mask=k_mask)
            sums = tl.load(chunk_sum_ptr + c * stride_chunk_sum_chunk + tile, mask=mask, other=0.0)
            new_mass = mass + tl.load(chunk_mass_ptr + c * stride_chunk_mass_chunk + j, mask=k_mask, other=0.0)
            denom = tl.where(k_mask, new_mass + eps, 1.0)
            keep = ((mass + eps) / denom).to(tl.float32)  # <= 1
            mean = mean * keep[:, None] + sums / denom.to(tl.float32)[:, None]
            mass = new_mass
        tl.store(mean_ptrs, mean, mask=mask)


@triton.jit
def _concept_chunk_output_kernel(
    # pointers
    a_ptr, v_ptr, mix_ptr, concept_mass_ptr, cu_seqlens_ptr, state_indices_ptr, chunk_seq_ptr, chunk_pos_ptr,
    entry_mean_ptr, entry_mass_ptr, out_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_a_token, stride_v_token, stride_mix_row, stride_mass_slot,
    stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk, stride_out_token,
    # meta-parameters
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    pid_dc = tl.program_id(1)
    seq = tl.load(chunk_seq_ptr + chunk)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    live = slot >= 0
    seq_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + tl.load(chunk_pos_ptr + chunk).to(tl.int64) * CHUNK
    t = tl.arange(0, CHUNK)  # (T,)
    rows = first + t
    in_seq = rows < seq_end
    row_mask = in_seq & live
    j = tl.arange(0, BLOCK_K)  # (K,)
    k_mask = j < k
    e = pid_dc * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (E,)
    e_mask = e < d_c
    a = tl.load(a_ptr + rows[:, None] * stride_a_token + j[None, :], mask=row_mask[:, None] & k_mask[None, :],
                other=0.0).to(tl.float32)  # (T, K)
    v = tl.load(v_ptr + rows[:, None] * stride_v_token + e[None, :], mask=row_mask[:, None] & e_mask[None, :],
                other=0.0).to(tl.float32)  # (T, E)
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    mass_prev = tl.load(entry_mass_ptr + chunk * stride_chunk_mass_chunk + j, mask=k_mask & live, other=0.0)
    mean_prev = tl.load(entry_mean_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k
                        + e[None, :], mask=(k_mask & live)[:, None] & e_mask[None, :], other=0.0)  # (K, E)
    mass = mass_prev[None, :] + tl.cumsum(a.to(tl.float64), axis=0)  # (T, K) fp64
    q = tl.dot(a, mix, input_precision="ieee") / tl.where(k_mask[None, :], mass + eps, 1.0).to(tl.float32)
    carried = tl.dot(q * (mass_prev + eps).to(tl.float32)[None, :], mean_prev, input_precision="ieee")  # (T, E)
    scores = tl.dot(q, tl.trans(a), input_precision="ieee")  # (T, T): q_t . a_s
    scores = tl.where(t[:, None] >= t[None, :], scores, 0.0)
    out = carried + tl.dot(scores, v, input_precision="ieee")
    out = tl.where(row_mask[:, None], out, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_out_token + e[None, :], out, mask=in_seq[:, None] & e_mask[None, :])
    if (pid_dc == 0) & live & (first + CHUNK >= seq_end):  # the sequence's last chunk writes the final mass
        final = tl.sum(tl.where(t[:, None] == CHUNK - 1, mass, 0.0), axis=0)  # rows past the end add nothing
        tl.store(concept_mass_ptr + slot * stride_mass_slot + j, final, mask=k_mask)


@triton.jit
def _concept_filter_update_kernel(
    # pointers
    a_ptr, v_ptr, mix_ptr, concept_mean_ptr, concept_mass_ptr, state_indices_ptr, out_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_a_row, stride_v_row, stride_mix_row, stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_out_row,
    # meta-parameters
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    j = tl.arange(0, BLOCK_K)  # (K,)
    e = tl.arange(0, BLOCK_DC)  # (E,) all of d_c: one program owns the slot's mass
    k_mask = (j < k) & live
    e_mask = e < d_c
    mask = k_mask[:, None] & e_mask[None, :]
    mean_ptrs = concept_mean_ptr + slot * stride_mean_slot + j[:, None] * stride_mean_k + e[None, :]
    mean = tl.load(mean_ptrs, mask=mask, other=0.0)  # (K, E) fp32
    mass_prev = tl.load(concept_mass_ptr + slot * stride_mass_slot + j, mask=k_mask, other=0.0)  # (K,) fp64
    a = tl.load(a_ptr + row * stride_a_row + j, mask=k_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_v_row + e, mask=e_mask & live, other=0.0).to(tl.float32)
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    mass = mass_prev + a.to(tl.float64)
    denom = tl.where(k_mask, mass + eps, 1.0)
    keep = ((mass_prev + eps) / denom).to(tl.float32)
    mean = mean * keep[:, None] + a[:, None] * v[None, :] / denom.to(tl.float32)[:, None]
    tl.store(mean_ptrs, mean, mask=mask)
    tl.store(concept_mass_ptr + slot * stride_mass_slot + j, mass, mask=k_mask)
    am = tl.sum(a[:, None] * mix, axis=0)  # (K,) = a^T M
    out = tl.sum(am[:, None] * mean, axis=0)  # (E,)
    tl.store(out_ptr + row * stride_out_row + e, out, mask=e_mask)


def _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch):
    tokens, k = a.shape
    d_c = v.shape[1]
    if v.shape[0] != tokens:
        raise ValueError(f"concept_filter: v has {v.shape[0]} rows, a has {tokens}")
    if mix.shape != (k, k):
        raise ValueError(f"concept_filter: mix must be ({k}, {k}), got {tuple(mix.shape)}")
    check_pool("concept_mean", concept_mean, 3)
    check_pool("concept_mass", concept_mass, 2)
    if concept_mean.shape[1:] != (k, d_c) or concept_mean.dtype != torch.float32:
        raise ValueError(f"concept_filter: concept_mean must be fp32 (slots, {k}, {d_c}), "
                         f"got {concept_mean.dtype} {tuple(concept_mean.shape)}")
    if concept_mass.shape != (concept_mean.shape[0], k) or concept_mass.dtype != torch.float64:
        raise ValueError(f"concept_filter: concept_mass must be fp64 ({concept_mean.shape[0]}, {k}), "
                         f"got {concept_mass.dtype} {tuple(concept_mass.shape)}")
    check_indices("state_indices", state_indices, batch, a.device)
    return k, d_c


def _concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps, chunk_size=None):
    """concept_filter with the chunk length exposed (tests)."""
    if a.dim() != 2 or v.dim() != 2:
        raise ValueError(f"concept_filter: a and v must be 2-D, got {tuple(a.shape)} and {tuple(v.shape)}")
    batch = cu_seqlens.shape[0] - 1
    k, d_c = _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch)
    a, v, mix = a.contiguous(), v.contiguous(), mix.contiguous()
    cu_seqlens, state_indices = cu_seqlens.contiguous(), state_indices.contiguous()
    total = a.shape[0]
    out = torch.empty((total, d_c), device=a.device, dtype=torch.float32)  # (total, d_c)
    bounds = host_bounds(cu_seqlens)
    if bounds[-1] > total:
        raise ValueError(f"concept_filter: cu_seqlens ends at {bounds[-1]}, past the {total} tokens")
    if bounds[-1] < total:
        out[bounds[-1]:].zero_()
    if batch == 0:
        return out
    max_len = max(b - a_ for a_, b in zip(bounds[:-1], bounds[1:]))
    chunk = chunk_size or (64 if max_len > 32 else max(triton.next_power_of_2(max_len), 16))
    block_k = max(triton.next_power_of_2(k), 16)  # tl.dot needs 16
    block_dc = max(min(triton.next_power_of_2(d_c), 64), 16)
    chunk_seq, chunk_pos, chunk_cu = _chunk_tables(bounds, chunk, a.device)
    num_chunks = chunk_seq.shape[0]
    chunk_sum = torch.empty(num_chunks, k, d_c, device=a.device, dtype=torch.float32)  # raw sums a^T v
    chunk_mass = torch.empty(num_chunks, k, device=a.device, dtype=torch.float64)
    entry_mean = torch.empty_like(chunk_sum)
    entry_mass = torch.empty_like(chunk_mass)
    grid = (num_chunks, triton.cdiv(d_c, block_dc))
    _concept_chunk_sums_kernel[grid](
        a, v, cu_seqlens, state_indices, chunk_seq, chunk_pos, chunk_sum, chunk_mass,
        k, d_c,
        a.stride(0), v.stride(0), chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0),
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_DC=block_dc, num_warps=4,
    )
    _concept_chunk_combine_kernel[(batch, triton.cdiv(d_c, block_dc))](
        concept_mean, concept_mass, state_indices, chunk_cu, chunk_sum, chunk_mass, entry_mean, entry_mass,
        k, d_c, float(eps),
        concept_mean.stride(0), concept_mean.stride(1), concept_mass.stride(0),
        chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0),
        BLOCK_K=block_k, BLOCK_DC=block_dc, num_warps=4,
    )
    _concept_chunk_output_kernel[grid](
        a, v, mix, concept_mass, cu_seqlens, state_indices, chunk_seq, chunk_pos, entry_mean, entry_mass, out,
        k, d_c, float(eps),
        a.stride(0), v.stride(0), mix.stride(0), concept_mass.stride(0),
        chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0), out.stride(0),
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_DC=block_dc, num_warps=4,
    )
    return out


def concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps):
    """Chunk form.

    a: (total, k) routing weights (rows sum to 1); v: (total, d_c); mix: (k, k) the matrix M;
    concept_mean: (slots, k, d_c) fp32 and concept_mass: (slots, k) fp64, read and updated in place;
    state_indices: (batch,), -1 skips the sequence (output rows zero).
    Returns read_t = a_t^T M (S_t / (m_t + eps)): (total, d_c) fp32.
    """
    return _concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps)


def concept_filter_update(a, v, mix, concept_mean, concept_mass, state_indices, eps):
    """One step for a batch of slots: a (batch, k), v (batch, d_c); state updated in place; -1 rows skipped.
    Returns (batch, d_c) fp32."""
    if a.dim() != 2 or v.dim() != 2:
        raise ValueError(f"concept_filter_update: a and v must be 2-D, got {tuple(a.shape)} and {tuple(v.shape)}")
    batch = a.shape[0]
    k, d_c = _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch)
    a, v, mix, state_indices = a.contiguous(), v.contiguous(), mix.contiguous(), state_indices.contiguous()
    out = torch.empty((batch, d_c), device=a.device, dtype=torch.float32)  # (batch, d_c), -1 rows zero
    if batch == 0:
        return out
    block_k, block_dc = triton.next_power_of_2(k), triton.next_power_of_2(d_c)
    _concept_filter_update_kernel[(batch,)](
        a, v, mix, concept_mean, concept_mass, state_indices, out,
        k, d_c, float(eps),
        a.stride(0), v.stride(0), mix.stride(0), concept_mean.stride(0), concept_mean.stride(1),
        concept_mass.stride(0), out.stride(0),
        BLOCK_K=block_k, BLOCK_DC=block_dc, num_warps=4 if block_k * block_dc <= 4096 else 8,
    )
    return out


if HAS_TRITON:
    from kernels.selective_scan import _chunk_tables  # noqa: E402  (shared chunk bookkeeping)
else:  # pragma: no cover
    del concept_filter, concept_filter_update
