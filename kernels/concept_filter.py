"""The concept bottleneck's causal linear attention with k-dimensional keys and per-concept decay (DESIGN.md §1).

The pool stores concept means `S / (m + eps)` (fp32, bounded by the values) and the mass m (fp64), not raw sums,
so a stream millions of steps long keeps full precision (DESIGN.md §2). With per-concept decay γ = exp(λ)
(`log_decay` λ <= 0, None for γ = 1):  S_t = γ S_{t-1} + a_t v_t,  m_t = γ m_{t-1} + a_t. Over a chunk entered
with (mean_prev, mass_prev), row t (0-based) and q_t = (a_t M) / (m_t + eps):
    read_t = (q_t γ^(t+1) (mass_prev + eps)) @ mean_prev + sum_{s<=t} (q_t γ^(t-s) . a_s) v_s
and the chunk leaves S_end = γ^L S_start + sum_s γ^(L-1-s) a_s v_s.
"""
from __future__ import annotations

import torch

from kernels.packing import PackedLayout, layout_of, seq_lengths

REF_CHUNK = 64  # the reference works chunk by chunk too, so a 10^5-step sequence costs no (L, L) matrix


def concept_filter_ref(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps, log_decay=None,
                       layout: PackedLayout | None = None, is_logits=False):
    """Chunk form.

    a: (total, k) routing weights (rows sum to 1); v: (total, d_c); mix: (k, k) the matrix M;
    concept_mean: (slots, k, d_c) fp32 and concept_mass: (slots, k) fp64, read and updated in place;
    state_indices: (batch,), -1 skips the sequence (output rows zero);
    log_decay: (k,) λ = log γ <= 0 per concept, or None (γ = 1, a running mean over the whole past);
    is_logits: `a` holds the routing logits W_a h + b_a, and their softmax (in fp32) is the routing weights.
    Returns read_t = a_t^T M (S_t / (m_t + eps)): (total, d_c) fp32.
    """
    if is_logits:
        a = torch.softmax(a.float(), dim=-1)
    out = a.new_zeros((a.shape[0], v.shape[1]), dtype=torch.float32)
    slots = state_indices.tolist()
    mix = mix.float()
    lam = _log_decay64(log_decay, a.shape[1], a.device)
    tables = {}  # chunk length -> its decay tables: every full chunk shares one
    for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), seq_lengths(cu_seqlens))):
        slot = slots[i]
        if slot < 0 or length == 0:
            continue
        mean, mass = concept_mean[slot].float(), concept_mass[slot]  # (k, d_c) fp32, (k,) fp64
        for lo in range(start, start + length, REF_CHUNK):
            hi = min(lo + REF_CHUNK, start + length)
            if hi - lo not in tables:
                tables[hi - lo] = _decay_tables(hi - lo, lam)
            out[lo:hi], mean, mass = _chunk_ref(a[lo:hi].float(), v[lo:hi].float(), mix, mean, mass, eps,
                                                tables[hi - lo])
        concept_mean[slot] = mean
        concept_mass[slot] = mass
    return out


def _log_decay64(log_decay, k, device):
    """λ as fp64 (k,): zeros for no decay, so γ^n is exactly 1 and the sums stay plain cumulative sums."""
    if log_decay is None:
        return torch.zeros(k, dtype=torch.float64, device=device)
    return log_decay.to(device=device, dtype=torch.float64)


def _decay_tables(length, lam):
    """For a chunk of `length` rows: within (L, L, k) fp64, γ^(t-s) for s <= t else 0, and growth (L, k) fp64,
    γ^(t+1), the entry state's weight at row t. The exponent is clamped first so no masked entry overflows."""
    t = torch.arange(length, device=lam.device)
    gap = (t[:, None] - t[None, :]).double()  # (L, L): t - s
    causal = gap >= 0
    within = torch.exp(torch.where(causal, gap, 0.0)[..., None] * lam) * causal[..., None]
    growth = torch.exp((t + 1).double()[:, None] * lam)
    return within, within.float(), growth


def _chunk_ref(a, v, mix, mean_prev, mass_prev, eps, tables):
    """One chunk from (mean_prev (k, d_c) fp32, mass_prev (k,) fp64): returns read (L, d_c), mean, mass."""
    within, within32, growth = tables
    mass = growth * mass_prev + torch.einsum("tsj,sj->tj", within, a.double())  # (L, k) fp64
    q = (a @ mix) / (mass + eps).float()  # (L, k)
    carried = (q * (growth * (mass_prev + eps)).float()) @ mean_prev  # (L, d_c)
    scores = torch.einsum("tj,tsj->ts", q, within32 * a)  # (L, L): q_t γ^(t-s) . a_s
    final = mass[-1]
    keep = (growth[-1] * (mass_prev + eps) / (final + eps)).float()  # (k,) <= 1
    sums = (a * within32[-1]).t() @ v  # (k, d_c): sum_s γ^(L-1-s) a_s v_s
    mean = mean_prev * keep[:, None] + sums / (final + eps).float()[:, None]
    return carried + scores @ v, mean, final


def concept_filter_update_ref(a, v, mix, concept_mean, concept_mass, state_indices, eps, log_decay=None):
    """One step for a batch of slots: a (batch, k), v (batch, d_c); state updated in place; -1 rows skipped;
    log_decay: (k,) or None as in concept_filter. Returns (batch, d_c) fp32."""
    out = a.new_zeros((a.shape[0], v.shape[1]), dtype=torch.float32)
    live = state_indices >= 0
    if not bool(live.any()):
        return out
    slots = state_indices[live].long()
    al, vl = a[live].float(), v[live].float()
    gamma = torch.exp(_log_decay64(log_decay, a.shape[1], a.device))  # (k,) fp64
    mass_prev = concept_mass[slots]
    mass = gamma * mass_prev + al.double()
    keep = (gamma * (mass_prev + eps) / (mass + eps)).float()
    mean = concept_mean[slots].float() * keep[..., None] + al[..., None] * vl[:, None, :] / (mass + eps).float()[..., None]
    concept_mean[slots] = mean
    concept_mass[slots] = mass
    out[live] = ((al @ mix.float()).unsqueeze(1) @ mean).squeeze(1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels. Chunk form, chunk-parallel like the selective scan (chunks never span two sequences):
#   pass 1 (_concept_chunk_sums_kernel):    per chunk, its raw sums a^T v (k, d_c) and its mass sum(a) (fp64);
#   pass 2 (_concept_chunk_prefix_kernel):  per sequence and concept, prefix scans over its chunks in the
#                                           mean+mass form (parallel across chunks), giving each chunk's entry
#                                           (mean, mass) and the pool's final mean;
#   pass 3 (_concept_chunk_output_kernel):  per chunk, read_t = carried + causal local part (two dots), and the
#                                           pool's final mass (written here: pass 2's programs all read it).
# When every sequence is one chunk there is nothing to carry between chunks: pass 1 copies the pool's state in as
# each chunk's entry and pass 3 writes the final mean as well, so a batch of short sequences takes two launches.
# Raw sums live only within one chunk, so they stay bounded however long the stream is (DESIGN.md §2).
# With decay (HAS_DECAY) every power γ^n has n >= 0, so nothing overflows however small γ is: pass 1 weights row s
# by γ^(last-s), pass 2 decays the carried state by γ^(chunk length), and pass 3 runs the mass as a decayed scan and
# the local scores as one decayed outer product per concept (Mamba-2's per-head decay matrix, with k heads).

from kernels._triton import (HAS_TRITON, cdiv, check_indices, check_pool, next_power_of_2, rows, tl,  # noqa: E402
                             triton)


@triton.jit
def _load_routing(a_ptr, rows, row_mask, j, k, stride_a_token, IS_LOGITS: tl.constexpr):
    """(T, K) fp32 routing weights of `rows`, 0 on masked rows and past k; from logits: their softmax."""
    mask = row_mask[:, None] & (j < k)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_a_token + j[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_LOGITS:
        a = tl.where((j < k)[None, :], a, float("-inf"))
        a = tl.exp(a - tl.max(a, axis=1)[:, None])
        a = tl.where(mask, a / tl.sum(a, axis=1)[:, None], 0.0)
    return a


@triton.jit
def _concept_chunk_sums_kernel(
    # pointers
    a_ptr, v_ptr, log_decay_ptr, cu_seqlens_ptr, state_indices_ptr, chunk_seq_ptr, chunk_pos_ptr, chunk_sum_ptr,
    chunk_mass_ptr, concept_mean_ptr, concept_mass_ptr, entry_mean_ptr, entry_mass_ptr,
    # sizes
    k, d_c,
    # strides
    stride_a_token, stride_v_token, stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk,
    stride_mean_slot, stride_mean_k, stride_mass_slot,
    # meta-parameters
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # every sequence is one chunk: copy the pool's state in as each chunk's entry
    IS_LOGITS: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    pid_dc = tl.program_id(1)
    seq = tl.load(chunk_seq_ptr + chunk)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    live = slot >= 0
    seq_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + tl.load(chunk_pos_ptr + chunk).to(tl.int64) * CHUNK
    rows = first + tl.arange(0, CHUNK)  # (T,)
    row_mask = (rows < seq_end) & live
    j = tl.arange(0, BLOCK_K)  # (K,)
    e = pid_dc * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (E,) columns of v
    a = _load_routing(a_ptr, rows, row_mask, j, k, stride_a_token, IS_LOGITS)  # (T, K)
    v = tl.load(v_ptr + rows[:, None] * stride_v_token + e[None, :], mask=row_mask[:, None] & (e < d_c)[None, :],
                other=0.0).to(tl.float32)  # (T, E)
    a64 = a.to(tl.float64)
    if HAS_DECAY:  # row s counts γ^(last - s) times: the decay it meets before the chunk's end
        lam = tl.load(log_decay_ptr + j, mask=j < k, other=0.0).to(tl.float64)  # (K,)
        back = (tl.minimum(seq_end - first, CHUNK) - 1 - tl.arange(0, CHUNK)).to(tl.float64)  # (T,)
        a64 = a64 * tl.exp(tl.maximum(back, 0.0)[:, None] * lam[None, :])  # rows past the end have a = 0
        a = a64.to(tl.float32)
    sums = tl.dot(tl.trans(a), v, input_precision="ieee")  # (K, E)
    tl.store(chunk_sum_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k + e[None, :], sums,
             mask=(j < k)[:, None] & (e < d_c)[None, :])
    if pid_dc == 0:
        tl.store(chunk_mass_ptr + chunk * stride_chunk_mass_chunk + j, tl.sum(a64, axis=0), mask=j < k)
    if SINGLE_CHUNK:  # pass 3 then reads the entry state here, as the pool's mass is rewritten under it
        tile = (j < k)[:, None] & (e < d_c)[None, :] & live
        mean = tl.load(concept_mean_ptr + slot * stride_mean_slot + j[:, None] * stride_mean_k + e[None, :], mask=tile)
        tl.store(entry_mean_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k + e[None, :], mean,
                 mask=tile)
        if pid_dc == 0:
            mass = tl.load(concept_mass_ptr + slot * stride_mass_slot + j, mask=(j < k) & live)
            tl.store(entry_mass_ptr + chunk * stride_chunk_mass_chunk + j, mass, mask=(j < k) & live)


@triton.jit
def _concept_chunk_prefix_kernel(
    # pointers
    concept_mean_ptr, concept_mass_ptr, log_decay_ptr, cu_seqlens_ptr, state_indices_ptr, chunk_cu_ptr,
    chunk_sum_ptr, chunk_mass_ptr, entry_mean_ptr, entry_mass_ptr,
    # sizes
    d_c, eps,
    # strides
    stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk,
    # meta-parameters
    CHUNK: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
):
    """Per (sequence, concept, column block): prefix sums over the sequence's chunks, BLOCK_NC chunks at a time,
    in place of a loop over them. The mass is the linear recurrence m_c = g_c m_(c-1) + (chunk mass) with g_c =
    γ^(chunk length), in fp64. The mean follows mean_c = keep_c mean_(c-1) + add_c, keep_c = g_c (m_(c-1) + eps) /
    (m_c + eps) <= 1 and add_c = (chunk sums) / (m_c + eps): bounded numbers, so a stream of any length keeps its
    precision (DESIGN.md §2). Within a block, mean_c = sum_(c' <= c) (keep_(c'+1) ... keep_c) add_c' + (keep_1 ...
    keep_c) mean_carried: the products come from a prefix sum of log keep (fp64), the sum is one (chunks x chunks)
    by (chunks x columns) product."""
    seq = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)  # the concept
    pid_dc = tl.program_id(2)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    if slot >= 0:
        e = pid_dc * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (E,)
        e_mask = e < d_c
        mean_ptrs = concept_mean_ptr + slot * stride_mean_slot + j * stride_mean_k + e
        mean = tl.load(mean_ptrs, mask=e_mask, other=0.0)  # (E,) fp32, carried from block to block
        mass = tl.load(concept_mass_ptr + slot * stride_mass_slot + j)  # fp64
        c_first = tl.load(chunk_cu_ptr + seq).to(tl.int64)
        num_chunks = tl.load(chunk_cu_ptr + seq + 1).to(tl.int64) - c_first
        if HAS_DECAY:
            lam = tl.load(log_decay_ptr + j).to(tl.float64)
            seq_len = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        # the first chunk is entered with the pool's state, chunk c + 1 with chunk c's exit (stored below)
        tl.store(entry_mean_ptr + c_first * stride_chunk_sum_chunk + j * stride_chunk_sum_k + e, mean, mask=e_mask)
        if pid_dc == 0:
            tl.store(entry_mass_ptr + c_first * stride_chunk_mass_chunk + j, mass)
        i_local = tl.arange(0, BLOCK_NC)
        causal = i_local[:, None] >= i_local[None, :]  # (NC, NC): chunk c' feeds chunk c
        for b0 in range(0, num_chunks, BLOCK_NC):
            i = b0 + i_local  # (NC,) chunk index within the sequence
            i_mask = i < num_chunks
            c = c_first + i
            chunk_mass = tl.load(chunk_mass_ptr + c * stride_chunk_mass_chunk + j, mask=i_mask, other=0.0)  # fp64
            if HAS_DECAY:  # the carried state decays once per row of the chunk
                length = tl.maximum(tl.minimum(seq_len - i * CHUNK, CHUNK), 0).to(tl.float64)
                g = tl.where(i_mask, tl.exp(lam * length), 1.0)  # (NC,) fp64
                _, m = tl.associative_scan((g, chunk_mass + tl.where(i_local == 0, g * mass, 0.0)), 0, _scan_combine)
            else:
                g = tl.full((BLOCK_NC,), 1.0, tl.float64)
                m = mass + tl.cumsum(chunk_mass, axis=0)
            # m - chunk_mass = g_c m_(c-1), the mass carried into chunk c after its decay (>= 0 up to rounding)
            keep = tl.maximum((m - chunk_mass + g * eps) / (m + eps), 0.0)  # (NC,) fp64
            log_prod = tl.cumsum(tl.log(tl.maximum(keep, 1e-300)), axis=0)  # log (keep_1 ... keep_c)
            weights = tl.exp(tl.minimum(log_prod[:, None] - log_prod[None, :], 0.0).to(tl.float32))
            weights = tl.where(causal, weights, 0.0)  # (NC, NC): keep_(c'+1) ... keep_c
            sums = tl.load(chunk_sum_ptr + c[:, None] * stride_chunk_sum_chunk + j * stride_chunk_sum_k + e[None, :],
                           mask=i_mask[:, None] & e_mask[None, :], other=0.0)  # (NC, E)
            add = sums / (m + eps).to(tl.float32)[:, None]
            exits = tl.dot(weights, add, input_precision="ieee") + tl.exp(log_prod.to(tl.float32))[:, None] * mean[None, :]
            has_next = i + 1 < num_chunks
            tl.store(entry_mean_ptr + (c + 1)[:, None] * stride_chunk_sum_chunk + j * stride_chunk_sum_k + e[None, :],
                     exits, mask=has_next[:, None] & e_mask[None, :])
            if pid_dc == 0:
                tl.store(entry_mass_ptr + (c + 1) * stride_chunk_mass_chunk + j, m, mask=has_next)
            is_last = i == tl.minimum(b0 + BLOCK_NC, num_chunks) - 1
            mean = tl.sum(tl.where(is_last[:, None], exits, 0.0), axis=0)
            mass = tl.sum(tl.where(is_last, m, 0.0), axis=0)
        tl.store(mean_ptrs, mean, mask=e_mask)


@triton.jit
def _concept_chunk_output_kernel(
    # pointers
    a_ptr, v_ptr, mix_ptr, log_decay_ptr, concept_mean_ptr, concept_mass_ptr, cu_seqlens_ptr, state_indices_ptr,
    chunk_seq_ptr, chunk_pos_ptr, chunk_sum_ptr, entry_mean_ptr, entry_mass_ptr, out_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_a_token, stride_v_token, stride_mix_row, stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_chunk_sum_chunk, stride_chunk_sum_k, stride_chunk_mass_chunk, stride_out_token,
    # meta-parameters
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # every sequence is one chunk: this pass also writes the pool's final mean
    IS_LOGITS: tl.constexpr,
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
    a = _load_routing(a_ptr, rows, row_mask, j, k, stride_a_token, IS_LOGITS)  # (T, K)
    v = tl.load(v_ptr + rows[:, None] * stride_v_token + e[None, :], mask=row_mask[:, None] & e_mask[None, :],
                other=0.0).to(tl.float32)  # (T, E)
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    mass_prev = tl.load(entry_mass_ptr + chunk * stride_chunk_mass_chunk + j, mask=k_mask & live, other=0.0)
    mean_prev = tl.load(entry_mean_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k
                        + e[None, :], mask=(k_mask & live)[:, None] & e_mask[None, :], other=0.0)  # (K, E)
    if HAS_DECAY:
        lam = tl.load(log_decay_ptr + j, mask=k_mask, other=0.0).to(tl.float32)  # (K,)
        # per row: γ, or 1 past the sequence's end so that the last row's mass is the final mass
        gamma = tl.where(in_seq[:, None], tl.exp(lam.to(tl.float64))[None, :], 1.0)  # (T, K) fp64
        growth, local = tl.associative_scan((gamma, a.to(tl.float64)), 0, _scan_combine)  # γ^(t+1), decayed sums
        mass = growth * mass_prev[None, :] + local  # (T, K) fp64
        entry_weight = (growth * (mass_prev + eps)[None, :]).to(tl.float32)  # (T, K)
    else:
        mass = mass_prev[None, :] + tl.cumsum(a.to(tl.float64), axis=0)  # (T, K) fp64
        entry_weight = (mass_prev + eps).to(tl.float32)[None, :]
    q = tl.dot(a, mix, input_precision="ieee") / tl.where(k_mask[None, :], mass + eps, 1.0).to(tl.float32)
    carried = tl.dot(q * entry_weight, mean_prev, input_precision="ieee")  # (T, E)
    causal = t[:, None] >= t[None, :]
    if HAS_DECAY:
        scores = _decayed_scores(q, a, lam, t, j, k, CHUNK)
    else:
        scores = tl.dot(q, tl.trans(a), input_precision="ieee")  # (T, T): q_t . a_s
    scores = tl.where(causal, scores, 0.0)
    out = carried + tl.dot(scores, v, input_precision="ieee")
    out = tl.where(row_mask[:, None], out, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_out_token + e[None, :], out, mask=in_seq[:, None] & e_mask[None, :])
    last_row = t[:, None] == CHUNK - 1
    final = tl.sum(tl.where(last_row, mass, 0.0), axis=0)  # (K,) rows past the end add nothing
    if (pid_dc == 0) & live & (first + CHUNK >= seq_end):  # the sequence's last chunk writes the final mass
        tl.store(concept_mass_ptr + slot * stride_mass_slot + j, final, mask=k_mask)
    if SINGLE_CHUNK:  # pass 2's step, for this chunk's columns: the mean carried in, then its sums
        if live:
            if HAS_DECAY:
                carry = tl.sum(tl.where(last_row, growth, 0.0), axis=0)  # (K,) γ^(chunk length)
            else:
                carry = tl.full((BLOCK_K,), 1.0, tl.float64)
            denom = tl.where(k_mask, final + eps, 1.0)
            keep = (carry * (mass_prev + eps) / denom).to(tl.float32)  # (K,) <= 1
            tile = k_mask[:, None] & e_mask[None, :]
            sums = tl.load(chunk_sum_ptr + chunk * stride_chunk_sum_chunk + j[:, None] * stride_chunk_sum_k + e[None, :],
                           mask=tile, other=0.0)
            tl.store(concept_mean_ptr + slot * stride_mean_slot + j[:, None] * stride_mean_k + e[None, :],
                     mean_prev * keep[:, None] + sums / denom.to(tl.float32)[:, None], mask=tile)


@triton.jit
def _decayed_scores(q, a, lam, t, j, k, CHUNK: tl.constexpr):
    """(T, T): sum_c q[t, c] γ_c^(t-s) a[s, c], one outer product per concept (the decay differs per concept, so
    it is no single matrix product); the exponent is clamped at 0 above the diagonal, which the caller masks."""
    gap = tl.maximum(t[:, None] - t[None, :], 0).to(tl.float32)  # (T, T)
    scores = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    for c in range(0, k):
        pick = j == c
        q_c = tl.sum(tl.where(pick[None, :], q, 0.0), axis=1)  # (T,)
        a_c = tl.sum(tl.where(pick[None, :], a, 0.0), axis=1)  # (T,)
        lam_c = tl.sum(tl.where(pick, lam, 0.0), axis=0)
        scores += q_c[:, None] * a_c[None, :] * tl.exp(gap * lam_c)
    return scores


@triton.jit
def update_slot(
    a, v, mix, j, e, slot, live,
    log_decay_ptr, concept_mean_ptr, concept_mass_ptr,
    k, d_c, eps,
    stride_mean_slot, stride_mean_k, stride_mass_slot,
    HAS_DECAY: tl.constexpr,
):
    """One step of one stream: a (K,) routing weights and v (E,) values in fp32, mix (K, K); the slot's mean and
    mass are updated in place. Returns its read-back a^T M mean (E,), zero when not `live`. E spans all of d_c:
    the program that updates a slot owns its mass."""
    k_mask = (j < k) & live
    e_mask = e < d_c
    mask = k_mask[:, None] & e_mask[None, :]
    mean_ptrs = concept_mean_ptr + slot * stride_mean_slot + j[:, None] * stride_mean_k + e[None, :]
    mean = tl.load(mean_ptrs, mask=mask, other=0.0)  # (K, E) fp32
    mass_prev = tl.load(concept_mass_ptr + slot * stride_mass_slot + j, mask=k_mask, other=0.0)  # (K,) fp64
    if HAS_DECAY:
        gamma = tl.exp(tl.load(log_decay_ptr + j, mask=k_mask, other=0.0).to(tl.float64))  # (K,)
        mass = gamma * mass_prev + a.to(tl.float64)
        denom = tl.where(k_mask, mass + eps, 1.0)
        keep = (gamma * (mass_prev + eps) / denom).to(tl.float32)
    else:
        mass = mass_prev + a.to(tl.float64)
        denom = tl.where(k_mask, mass + eps, 1.0)
        keep = ((mass_prev + eps) / denom).to(tl.float32)
    mean = mean * keep[:, None] + a[:, None] * v[None, :] / denom.to(tl.float32)[:, None]
    tl.store(mean_ptrs, mean, mask=mask)
    tl.store(concept_mass_ptr + slot * stride_mass_slot + j, mass, mask=k_mask)
    am = tl.sum(a[:, None] * mix, axis=0)  # (K,) = a^T M
    return tl.sum(am[:, None] * mean, axis=0)  # (E,)


@triton.jit
def _concept_filter_update_kernel(
    # pointers
    a_ptr, v_ptr, mix_ptr, log_decay_ptr, concept_mean_ptr, concept_mass_ptr, state_indices_ptr, out_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_a_row, stride_v_row, stride_mix_row, stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_out_row,
    # meta-parameters
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    j = tl.arange(0, BLOCK_K)  # (K,)
    e = tl.arange(0, BLOCK_DC)  # (E,) all of d_c
    k_mask = j < k
    e_mask = e < d_c
    a = tl.load(a_ptr + row * stride_a_row + j, mask=k_mask & live, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_v_row + e, mask=e_mask & live, other=0.0).to(tl.float32)
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    out = update_slot(a, v, mix, j, e, slot, live, log_decay_ptr, concept_mean_ptr, concept_mass_ptr, k, d_c, eps,
                      stride_mean_slot, stride_mean_k, stride_mass_slot, HAS_DECAY)
    tl.store(out_ptr + row * stride_out_row + e, out, mask=e_mask)


def _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch, log_decay):
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
    if log_decay is not None and (log_decay.shape != (k,) or not log_decay.is_floating_point()):
        raise ValueError(f"concept_filter: log_decay must be a float ({k},), got {log_decay.dtype} "
                         f"{tuple(log_decay.shape)}")
    return k, d_c


def _decay_args(log_decay, placeholder):
    """(pointer, HAS_DECAY): fp32 λ, or any tensor as a placeholder the kernels never read."""
    if log_decay is None:
        return placeholder, False
    if log_decay.dtype != torch.float32:  # the model's cached λ is fp32 already: no conversion op per layer
        log_decay = log_decay.float()
    return log_decay.contiguous(), True


def _concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps, log_decay=None,
                    layout=None, is_logits=False, chunk_size=None, block_chunks=None):
    """concept_filter with the chunk length and the chunks per block of pass 2's scan exposed (tests)."""
    if a.dim() != 2 or v.dim() != 2:
        raise ValueError(f"concept_filter: a and v must be 2-D, got {tuple(a.shape)} and {tuple(v.shape)}")
    batch = cu_seqlens.shape[0] - 1
    k, d_c = _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch, log_decay)
    a, v, mix = rows(a), rows(v), mix.contiguous()  # v may be columns of the layer's one product of h
    cu_seqlens, state_indices = cu_seqlens.contiguous(), state_indices.contiguous()
    log_decay, has_decay = _decay_args(log_decay, mix)
    total = a.shape[0]
    out = torch.empty((total, d_c), device=a.device, dtype=torch.float32)  # (total, d_c)
    layout = layout_of(cu_seqlens, layout)
    bounds = layout.bounds
    if bounds[-1] > total:
        raise ValueError(f"concept_filter: cu_seqlens ends at {bounds[-1]}, past the {total} tokens")
    if bounds[-1] < total:
        out[bounds[-1]:].zero_()
    if batch == 0:
        return out
    max_len = layout.max_len
    chunk = chunk_size or (64 if max_len > 32 else max(next_power_of_2(max_len), 16))
    block_k = max(next_power_of_2(k), 16)  # tl.dot needs 16
    block_dc = max(min(next_power_of_2(d_c), 64), 16)
    chunk_seq, chunk_pos, chunk_cu = layout.chunk_tables(chunk)
    num_chunks = chunk_seq.shape[0]
    chunk_sum = torch.empty(num_chunks, k, d_c, device=a.device, dtype=torch.float32)  # raw sums a^T v
    chunk_mass = torch.empty(num_chunks, k, device=a.device, dtype=torch.float64)
    entry_mean = torch.empty_like(chunk_sum)
    entry_mass = torch.empty_like(chunk_mass)
    grid = (num_chunks, cdiv(d_c, block_dc))
    single = max_len <= chunk  # pass 2 has nothing to carry between chunks: passes 1 and 3 take its two jobs
    _concept_chunk_sums_kernel[grid](
        a, v, log_decay, cu_seqlens, state_indices, chunk_seq, chunk_pos, chunk_sum, chunk_mass, concept_mean,
        concept_mass, entry_mean, entry_mass,
        k, d_c,
        a.stride(0), v.stride(0), chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0),
        concept_mean.stride(0), concept_mean.stride(1), concept_mass.stride(0),
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_DC=block_dc, HAS_DECAY=has_decay, SINGLE_CHUNK=single,
        IS_LOGITS=is_logits, num_warps=4,
    )
    if not single:
        max_chunks = cdiv(max_len, chunk)
        block_nc = block_chunks or min(max(next_power_of_2(max_chunks), 16), 64)  # tl.dot needs 16
        block_dc_prefix = min(block_dc, 32)
        # sm_90 compile (ptxas -v): 64 chunks a block spill on 4 warps, not on 8; 32 fit on 4
        _concept_chunk_prefix_kernel[(batch, k, cdiv(d_c, block_dc_prefix))](
            concept_mean, concept_mass, log_decay, cu_seqlens, state_indices, chunk_cu, chunk_sum, chunk_mass,
            entry_mean, entry_mass,
            d_c, float(eps),
            concept_mean.stride(0), concept_mean.stride(1), concept_mass.stride(0),
            chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0),
            CHUNK=chunk, BLOCK_NC=block_nc, BLOCK_DC=block_dc_prefix, HAS_DECAY=has_decay,
            num_warps=8 if block_nc > 32 else 4,
        )
    _concept_chunk_output_kernel[grid](
        a, v, mix, log_decay, concept_mean, concept_mass, cu_seqlens, state_indices, chunk_seq, chunk_pos, chunk_sum,
        entry_mean, entry_mass, out,
        k, d_c, float(eps),
        a.stride(0), v.stride(0), mix.stride(0), concept_mean.stride(0), concept_mean.stride(1),
        concept_mass.stride(0), chunk_sum.stride(0), chunk_sum.stride(1), chunk_mass.stride(0), out.stride(0),
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_DC=block_dc, HAS_DECAY=has_decay, SINGLE_CHUNK=single,
        IS_LOGITS=is_logits, num_warps=4,
    )
    return out


def concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps, log_decay=None,
                   layout: PackedLayout | None = None, is_logits=False):
    """Chunk form.

    a: (total, k) routing weights (rows sum to 1); v: (total, d_c); mix: (k, k) the matrix M;
    concept_mean: (slots, k, d_c) fp32 and concept_mass: (slots, k) fp64, read and updated in place;
    state_indices: (batch,), -1 skips the sequence (output rows zero);
    log_decay: (k,) λ = log γ <= 0 per concept, or None (γ = 1, a running mean over the whole past);
    is_logits: `a` holds the routing logits W_a h + b_a, and their softmax (in fp32) is the routing weights.
    Returns read_t = a_t^T M (S_t / (m_t + eps)): (total, d_c) fp32.
    """
    return _concept_filter(a, v, mix, concept_mean, concept_mass, cu_seqlens, state_indices, eps, log_decay, layout,
                           is_logits)


def concept_filter_update(a, v, mix, concept_mean, concept_mass, state_indices, eps, log_decay=None):
    """One step for a batch of slots: a (batch, k), v (batch, d_c); state updated in place; -1 rows skipped;
    log_decay: (k,) or None as in concept_filter. Returns (batch, d_c) fp32."""
    if a.dim() != 2 or v.dim() != 2:
        raise ValueError(f"concept_filter_update: a and v must be 2-D, got {tuple(a.shape)} and {tuple(v.shape)}")
    batch = a.shape[0]
    k, d_c = _check_concept_args(a, v, mix, concept_mean, concept_mass, state_indices, batch, log_decay)
    a, v, mix, state_indices = a.contiguous(), v.contiguous(), mix.contiguous(), state_indices.contiguous()
    log_decay, has_decay = _decay_args(log_decay, mix)
    out = torch.empty((batch, d_c), device=a.device, dtype=torch.float32)  # (batch, d_c), -1 rows zero
    if batch == 0:
        return out
    block_k, block_dc = next_power_of_2(k), next_power_of_2(d_c)
    _concept_filter_update_kernel[(batch,)](
        a, v, mix, log_decay, concept_mean, concept_mass, state_indices, out,
        k, d_c, float(eps),
        a.stride(0), v.stride(0), mix.stride(0), concept_mean.stride(0), concept_mean.stride(1),
        concept_mass.stride(0), out.stride(0),
        BLOCK_K=block_k, BLOCK_DC=block_dc, HAS_DECAY=has_decay, num_warps=4 if block_k * block_dc <= 4096 else 8,
    )
    return out


if HAS_TRITON:
    from kernels.selective_scan import _scan_combine  # noqa: E402  (shared combine function)
else:  # pragma: no cover
    del concept_filter, concept_filter_update
