"""One decode step of windowed attention for a batch of slots: each row writes its key and value into its slot's
ring at position P mod W (P: the steps its stream has seen) and attends to the positions (P - W, P], all in the
ring. Nothing is gathered: rows address their slot's ring by index (DESIGN.md §1, "Hybrid models").

Axis letters as in kernels/window_attention.py: H query heads, G key/value heads, Dh head width, W window.
"""
from __future__ import annotations

import torch

from kernels.window_attention import check_window_attention_args


def window_attention_update_ref(q, k, v, key_ring, value_ring, steps, state_indices, scale):
    """q: (batch, H, Dh); k, v: (batch, G, Dh) with G dividing H; key_ring, value_ring: (slots, G, W, Dh) updated
    in place; steps: (slots,) int64, positions seen before this step (not advanced here); state_indices: (batch,),
    -1 skips the row (output zero, no write); scale: the softmax scale. Returns (batch, H, Dh) in q.dtype.
    """
    check_window_attention_args(q, k, v, key_ring, value_ring, steps, state_indices, q.shape[0])
    out = torch.zeros_like(q)
    live = state_indices >= 0
    if not bool(live.any()):
        return out
    slots = state_indices[live].long()
    window, group = key_ring.shape[2], q.shape[1] // k.shape[1]
    seen = steps[slots]  # (n,)
    key_ring[slots, :, seen % window] = k[live].to(key_ring.dtype)  # (n, G, Dh)
    value_ring[slots, :, seen % window] = v[live].to(value_ring.dtype)
    keys = key_ring[slots].float().repeat_interleave(group, dim=1)  # (n, H, W, Dh)
    values = value_ring[slots].float().repeat_interleave(group, dim=1)
    # ring entry w holds the latest position p <= P with p = w mod W; it is in the window once written (p >= 0)
    held = seen[:, None] - (seen[:, None] - torch.arange(window, device=q.device)) % window  # (n, W)
    scores = torch.einsum("nhd,nhwd->nhw", q[live].float(), keys) * scale
    scores = scores.masked_fill(~(held >= 0)[:, None, :], float("-inf"))
    out[live] = torch.einsum("nhw,nhwd->nhd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (flash-decoding): the window is split among NUM_SPLITS programs per (row, key/value head), so a
# small batch with a long window still fills the chip. A program holds the whole group of query heads sharing the
# key/value head (padded to 16 rows for tl.dot), so each key is loaded once for the group. It walks the ages
# a = 1 .. min(P, W - 1) of its split (position P - a, at (P - a) mod W in the ring) with an online softmax; split
# 0 adds the step's own key and value from the inputs and writes them into the ring at P mod W, a ring entry that
# no program reads (it held position P - W, outside the window), so no program races the write. With one split
# the program writes the output; with more, each writes its (max, sum, weighted values) and a second kernel merges
# them. Memory-bound: every ring entry in the window is read once.

from kernels._triton import HAS_TRITON, INTERPRETED, next_power_of_2, tl, triton  # noqa: E402
from kernels.window_attention import LOG2E  # noqa: E402


@triton.jit
def _window_attention_update_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, key_ring_ptr, value_ring_ptr, steps_ptr, state_indices_ptr, out_ptr, part_max_ptr,
    part_sum_ptr, part_acc_ptr,
    # sizes
    window, d_head, group, scale_log2, ages_per_split,
    # strides
    stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_ring_slot, stride_ring_head, stride_ring_pos, stride_out_row, stride_out_head,
    stride_part_row, stride_part_head, stride_part_acc_row, stride_part_acc_head, stride_part_acc_split,
    # meta-parameters
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * group + g  # (G,) the query heads of this key/value head
    g_mask = (g < group) & live
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < d_head
    q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # (G, Dh)
    seen = tl.load(steps_ptr + tl.maximum(slot, 0))
    num_past = tl.where(live, tl.minimum(seen, window - 1), 0)
    ring = slot * stride_ring_slot + kv_head * stride_ring_head
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    first_age = split * ages_per_split + 1
    last_age = tl.minimum(first_age + ages_per_split - 1, num_past)
    for start in range(first_age, last_age + 1, BLOCK_N):
        age = start + n  # (N,)
        key_mask = age <= last_age
        kv_ptrs = ring + ((seen - age) % window)[:, None] * stride_ring_pos + d[None, :]
        kv_mask = key_mask[:, None] & d_mask[None, :]
        kb = tl.load(key_ring_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # (N, Dh)
        vb = tl.load(value_ring_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale_log2  # (G, N)
        s = tl.where(key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(key_mask[None, :], tl.exp2(s - m_safe[:, None]), 0.0)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
        m_i = m_new
    if split == 0:  # the step's own key and value (age 0), straight from the inputs, then into the ring
        k_now = tl.load(k_ptr + row * stride_k_row + kv_head * stride_k_head + d, mask=d_mask & live, other=0.0)
        v_now = tl.load(v_ptr + row * stride_v_row + kv_head * stride_v_head + d, mask=d_mask & live, other=0.0)
        s_now = tl.sum(q * k_now.to(tl.float32)[None, :], axis=1) * scale_log2  # (G,)
        m_new = tl.maximum(m_i, s_now)
        alpha = tl.exp2(m_i - m_new)
        p_now = tl.exp2(s_now - m_new)
        l_i = l_i * alpha + p_now
        acc = acc * alpha[:, None] + p_now[:, None] * v_now.to(tl.float32)[None, :]
        m_i = m_new
        now = ring + (seen % window) * stride_ring_pos + d
        tl.store(key_ring_ptr + now, k_now.to(key_ring_ptr.dtype.element_ty), mask=d_mask & live)
        tl.store(value_ring_ptr + now, v_now.to(value_ring_ptr.dtype.element_ty), mask=d_mask & live)
    if NUM_SPLITS == 1:
        out = tl.where(g_mask[:, None], acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(out_ptr + row * stride_out_row + heads[:, None] * stride_out_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < group)[:, None] & d_mask[None, :])
    else:
        part = row * stride_part_row + heads * stride_part_head + split
        tl.store(part_max_ptr + part, m_i, mask=g < group)
        tl.store(part_sum_ptr + part, l_i, mask=g < group)
        tl.store(part_acc_ptr + row * stride_part_acc_row + heads[:, None] * stride_part_acc_head
                 + split * stride_part_acc_split + d[None, :], acc, mask=(g < group)[:, None] & d_mask[None, :])


@triton.jit
def _window_attention_combine_kernel(
    # pointers
    state_indices_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
    # sizes
    d_head,
    # strides
    stride_part_row, stride_part_head, stride_part_acc_row, stride_part_acc_head, stride_part_acc_split,
    stride_out_row, stride_out_head,
    # meta-parameters
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    live = tl.load(state_indices_ptr + row) >= 0
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < d_head
    part = row * stride_part_row + head * stride_part_head + s
    m = tl.load(part_max_ptr + part)  # (S,); split 0 always holds the step's own key, so the max is finite
    weight = tl.exp2(m - tl.max(m, axis=0))  # 0 for splits with nothing in the window
    total = tl.sum(weight * tl.load(part_sum_ptr + part), axis=0)
    acc = tl.load(part_acc_ptr + row * stride_part_acc_row + head * stride_part_acc_head
                  + s[:, None] * stride_part_acc_split + d[None, :], mask=d_mask[None, :], other=0.0)  # (S, Dh)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    out = tl.where(live, out, 0.0)
    tl.store(out_ptr + row * stride_out_row + head * stride_out_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def _num_splits(batch: int, n_kv_heads: int, window: int) -> int:
    """Enough programs to cover the chip at small batches (about 256 in flight), but at least 512 keys a split;
    a power of two (the combine kernel's arange). A function of shapes alone, so CUDA graphs capture it."""
    if INTERPRETED:
        return 1
    splits = min(max(256 // max(batch * n_kv_heads, 1), 1), max(-(-(window - 1) // 512), 1))
    return 1 << (splits.bit_length() - 1)


def _window_attention_update(q, k, v, key_ring, value_ring, steps, state_indices, scale, num_splits=None):
    """window_attention_update with the number of window splits exposed (tests)."""
    check_window_attention_args(q, k, v, key_ring, value_ring, steps, state_indices, q.shape[0])
    batch, n_heads, d_head = q.shape
    n_kv_heads, window = k.shape[1], key_ring.shape[2]
    group = n_heads // n_kv_heads
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    state_indices, steps = state_indices.contiguous(), steps.contiguous()
    out = torch.empty_like(q)  # every row is written (zeros for -1 slots)
    if batch == 0:
        return out
    num_splits = num_splits or _num_splits(batch, n_kv_heads, window)
    ages_per_split = max(-(-(window - 1) // num_splits), 1)
    block_d = max(next_power_of_2(d_head), 16)
    block_g = max(next_power_of_2(group), 16)  # tl.dot needs 16 rows
    block_n = 16 if INTERPRETED else 64
    if num_splits > 1:
        part_max = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(batch, n_heads, num_splits, d_head, device=q.device, dtype=torch.float32)
    else:  # never read: the one split writes the output itself
        part_max = part_sum = part_acc = out
    _window_attention_update_kernel[(batch, n_kv_heads, num_splits)](
        q, k, v, key_ring, value_ring, steps, state_indices, out, part_max, part_sum, part_acc,
        window, d_head, group, float(scale) * LOG2E, ages_per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_ring.stride(0), key_ring.stride(1), key_ring.stride(2), out.stride(0), out.stride(1),
        *_part_strides(part_max, part_acc, num_splits),
        NUM_SPLITS=num_splits, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    if num_splits > 1:
        _window_attention_combine_kernel[(batch, n_heads)](
            state_indices, part_max, part_sum, part_acc, out,
            d_head,
            *_part_strides(part_max, part_acc, num_splits), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_D=block_d, num_warps=1,
        )
    return out


def _part_strides(part_max, part_acc, num_splits):
    if num_splits == 1:
        return 0, 0, 0, 0, 0
    return part_max.stride(0), part_max.stride(1), part_acc.stride(0), part_acc.stride(1), part_acc.stride(2)


def window_attention_update(q, k, v, key_ring, value_ring, steps, state_indices, scale):
    """q: (batch, H, Dh); k, v: (batch, G, Dh) with G dividing H; key_ring, value_ring: (slots, G, W, Dh) updated
    in place; steps: (slots,) int64, positions seen before this step (not advanced here); state_indices: (batch,),
    -1 skips the row (output zero, no write); scale: the softmax scale. Returns (batch, H, Dh) in q.dtype.
    """
    return _window_attention_update(q, k, v, key_ring, value_ring, steps, state_indices, scale)


if not HAS_TRITON:  # pragma: no cover
    del window_attention_update
