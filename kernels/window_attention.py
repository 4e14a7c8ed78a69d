"""Windowed causal attention over packed chunks, whose past lives in each slot's key/value ring (DESIGN.md §1,
"Hybrid models").

A stream's attention layer keeps the keys and values of its last W positions in a ring: position p sits at p mod W.
A chunk of L tokens continuing a stream that has seen P steps attends, at position P + t, to the positions
(P + t - W, P + t]: those before P come from the ring (with its wraparound), the rest from the chunk itself. Then
the chunk's last min(L, W) keys and values are written into the ring, so the next chunk (or decode step) finds
them. The step count P is read from the pool's `steps` and not advanced here (the model advances it once for all
layers).

Axis letters: T packed tokens, H query heads, G key/value heads (H / G query heads share one), Dh head width,
W window.
"""
from __future__ import annotations

import torch

from kernels._triton import cdiv, check_indices, check_pool, next_power_of_2
from kernels.packing import PackedLayout, layout_of

REF_BLOCK = 64  # the reference takes queries in blocks, so a long chunk costs no (L, L) matrix


def window_attention_ref(q, k, v, key_ring, value_ring, steps, cu_seqlens, state_indices, scale,
                         layout: PackedLayout | None = None):
    """Chunk form.

    q: (T, H, Dh); k, v: (T, G, Dh) with G dividing H; key_ring, value_ring: (slots, G, W, Dh), read and then
    written in place; steps: (slots,) int64, the positions each slot has seen before this chunk;
    cu_seqlens: (batch + 1,); state_indices: (batch,), -1 skips the sequence (output rows zero, ring untouched);
    scale: the softmax scale (Dh ** -0.5). Returns (T, H, Dh) in q.dtype.
    """
    check_window_attention_args(q, k, v, key_ring, value_ring, steps, state_indices, cu_seqlens.shape[0] - 1)
    out = torch.zeros_like(q)
    window = key_ring.shape[2]
    bounds = layout_of(cu_seqlens, layout).bounds
    for i, slot in enumerate(state_indices.tolist()):
        start, end = bounds[i], bounds[i + 1]
        if slot < 0 or end == start:
            continue
        length, seen = end - start, int(steps[slot])
        past = torch.arange(max(0, seen - window + 1), seen, device=q.device)  # positions the chunk may still see
        keys = torch.cat([key_ring[slot][:, past % window].transpose(0, 1).float(), k[start:end].float()])
        values = torch.cat([value_ring[slot][:, past % window].transpose(0, 1).float(), v[start:end].float()])
        key_pos = torch.arange(seen - past.numel(), seen + length, device=q.device)  # (n_past + L,)
        for lo in range(0, length, REF_BLOCK):
            hi = min(lo + REF_BLOCK, length)
            first = max(0, lo - window + 1 + past.numel())  # the oldest key any query of the block sees
            query_pos = torch.arange(seen + lo, seen + hi, device=q.device)
            kp = key_pos[first:hi + past.numel()]
            mask = (kp[None, :] <= query_pos[:, None]) & (kp[None, :] > query_pos[:, None] - window)
            out[start + lo:start + hi] = attend(q[start + lo:start + hi], keys[first:hi + past.numel()],
                                                values[first:hi + past.numel()], mask, scale).to(q.dtype)
        keep = min(length, window)
        ring_pos = torch.arange(seen + length - keep, seen + length, device=q.device) % window
        key_ring[slot][:, ring_pos] = k[end - keep:end].transpose(0, 1).to(key_ring.dtype)
        value_ring[slot][:, ring_pos] = v[end - keep:end].transpose(0, 1).to(value_ring.dtype)
    return out


def attend(q, keys, values, mask, scale):
    """Softmax attention in fp32. q: (n, H, Dh); keys, values: (m, G, Dh); mask: (n, m), True where query n may
    see key m (every query sees at least one). Returns (n, H, Dh) fp32."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)  # (m, H, Dh)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->nhm", q.float(), keys) * scale  # (n, H, m)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("nhm,mhd->nhd", torch.softmax(scores, dim=-1), values)


def check_window_attention_args(q, k, v, key_ring, value_ring, steps, state_indices, batch):
    """Shapes and dtypes shared by the chunk and the decode form; raises ValueError naming the argument."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"window_attention: q, k, v must be (tokens, heads, d_head), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    tokens, n_heads, d_head = q.shape
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != d_head or n_heads % k.shape[1]:
        raise ValueError(f"window_attention: k and v must be ({tokens}, G, {d_head}) with G dividing {n_heads}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    for name, ring in (("key_ring", key_ring), ("value_ring", value_ring)):
        check_pool(name, ring, 4)
        if ring.shape[1] != k.shape[1] or ring.shape[3] != d_head or ring.shape != key_ring.shape:
            raise ValueError(f"window_attention: {name} must be (slots, {k.shape[1]}, W, {d_head}), got "
                             f"{tuple(ring.shape)}")
    if steps.shape != (key_ring.shape[0],) or steps.dtype != torch.int64:
        raise ValueError(f"window_attention: steps must be int64 ({key_ring.shape[0]},), got {steps.dtype} "
                         f"{tuple(steps.shape)}")
    check_indices("state_indices", state_indices, batch, q.device)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels, flash-attention style: one program per (block of BLOCK_M queries of one sequence, query head)
# walks the keys its queries may see in blocks of BLOCK_N with an online softmax: the ring's (positions before
# the chunk, addressed mod W), then the chunk's own. A second kernel writes the chunk's last keys and values
# into the ring; it runs after the first on the same stream, so no program reads a ring entry already overwritten.
# Positions are kept relative to the chunk's start (rel = position - P), so the masks never see P itself.

from kernels._triton import HAS_TRITON, INTERPRETED, tl, triton  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _window_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, key_ring_ptr, value_ring_ptr, steps_ptr, cu_seqlens_ptr, state_indices_ptr, block_seq_ptr,
    block_pos_ptr, out_ptr,
    # sizes
    window, d_head, group, scale_log2,
    # strides
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_ring_slot, stride_ring_head, stride_ring_pos, stride_out_token, stride_out_head,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    seq = tl.load(block_seq_ptr + blk)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - seq_start
    t0 = tl.load(block_pos_ptr + blk).to(tl.int64) * BLOCK_M
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < d_head
    query_rel = t0 + m  # (M,) position - P
    row_mask = query_rel < length
    out_ptrs = out_ptr + (seq_start + query_rel)[:, None] * stride_out_token + head * stride_out_head + d[None, :]
    if slot < 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_D), dtype=out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])
    else:
        kv_head = head // group
        seen = tl.load(steps_ptr + slot)
        q = tl.load(q_ptr + (seq_start + query_rel)[:, None] * stride_q_token + head * stride_q_head + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (M, Dh)
        if not LOW_PRECISION:
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        ring = slot * stride_ring_slot + kv_head * stride_ring_head
        # keys at rel in [max(t0 - W + 1, -P), min(t0 + M, L)): rel < 0 from the ring at (P + rel) mod W, the
        # rest from the chunk; a block straddling rel = 0 takes each key from one of two masked loads
        chunk_end = tl.minimum(t0 + BLOCK_M, length)
        for start in range(tl.maximum(t0 - window + 1, -seen), chunk_end, BLOCK_N):
            rel = start + n  # (N,)
            in_ring = rel < 0
            in_chunk = (rel >= 0) & (rel < chunk_end)
            ring_ptrs = ring + ((seen + rel) % window)[:, None] * stride_ring_pos + d[None, :]
            ring_mask = in_ring[:, None] & d_mask[None, :]
            chunk_mask = in_chunk[:, None] & d_mask[None, :]
            kb = tl.where(ring_mask, tl.load(key_ring_ptr + ring_ptrs, mask=ring_mask, other=0.0),
                          tl.load(k_ptr + (seq_start + rel)[:, None] * stride_k_token + kv_head * stride_k_head
                                  + d[None, :], mask=chunk_mask, other=0.0))  # (N, Dh)
            vb = tl.where(ring_mask, tl.load(value_ring_ptr + ring_ptrs, mask=ring_mask, other=0.0),
                          tl.load(v_ptr + (seq_start + rel)[:, None] * stride_v_token + kv_head * stride_v_head
                                  + d[None, :], mask=chunk_mask, other=0.0))
            if LOW_PRECISION:
                s = tl.dot(q, tl.trans(kb)) * scale_log2  # (M, N)
            else:
                s = tl.dot(q, tl.trans(kb.to(tl.float32)), input_precision="ieee") * scale_log2
            allowed = ((in_ring | in_chunk)[None, :] & (rel[None, :] <= query_rel[:, None])
                       & (rel[None, :] > query_rel[:, None] - window))
            # online softmax; rows with nothing allowed yet keep max -inf and add nothing
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.where(allowed, tl.exp2(s - m_safe[:, None]), 0.0)
            alpha = tl.exp2(m_i - m_safe)
            if LOW_PRECISION:
                pv = tl.dot(p.to(vb.dtype), vb)
            else:
                pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every real row saw at least itself
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _ring_write_kernel(
    # pointers
    k_ptr, v_ptr, key_ring_ptr, value_ring_ptr, steps_ptr, cu_seqlens_ptr, state_indices_ptr,
    # sizes
    window, d_head,
    # strides
    stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_ring_slot, stride_ring_head,
    stride_ring_pos,
    # meta-parameters
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2).to(tl.int64)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    if slot >= 0:
        seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        length = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - seq_start
        seen = tl.load(steps_ptr + slot)
        rel = length - tl.minimum(length, window) + blk * BLOCK_T + tl.arange(0, BLOCK_T)  # the last min(L, W)
        d = tl.arange(0, BLOCK_D)
        mask = (rel < length)[:, None] & (d < d_head)[None, :]
        ring = ((seen + rel) % window)[:, None] * stride_ring_pos + slot * stride_ring_slot \
            + kv_head * stride_ring_head + d[None, :]
        kb = tl.load(k_ptr + (seq_start + rel)[:, None] * stride_k_token + kv_head * stride_k_head + d[None, :],
                     mask=mask, other=0.0)
        vb = tl.load(v_ptr + (seq_start + rel)[:, None] * stride_v_token + kv_head * stride_v_head + d[None, :],
                     mask=mask, other=0.0)
        tl.store(key_ring_ptr + ring, kb.to(key_ring_ptr.dtype.element_ty), mask=mask)
        tl.store(value_ring_ptr + ring, vb.to(value_ring_ptr.dtype.element_ty), mask=mask)


def is_low_precision(dtype) -> bool:
    """Tensor-core dots in the inputs' own dtype (fp32 accumulation) for bf16/fp16 on a GPU; the interpreter
    computes bf16 wrongly, so there everything is fp32."""
    return dtype in (torch.bfloat16, torch.float16) and not INTERPRETED


def _window_attention(q, k, v, key_ring, value_ring, steps, cu_seqlens, state_indices, scale, layout=None,
                      block_m=None, block_n=None):
    """window_attention with the block sizes exposed (tests)."""
    batch = cu_seqlens.shape[0] - 1
    check_window_attention_args(q, k, v, key_ring, value_ring, steps, state_indices, batch)
    total, n_heads, d_head = q.shape
    group, n_kv_heads, window = n_heads // k.shape[1], k.shape[1], key_ring.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_seqlens, state_indices, steps = cu_seqlens.contiguous(), state_indices.contiguous(), steps.contiguous()
    out = torch.empty_like(q)
    layout = layout_of(cu_seqlens, layout)
    bounds = layout.bounds
    if bounds[-1] != total:
        raise ValueError(f"window_attention: cu_seqlens ends at {bounds[-1]}, but there are {total} tokens")
    if batch == 0 or total == 0:
        return out
    max_len = layout.max_len
    on_cpu, low_precision = INTERPRETED, is_low_precision(q.dtype)
    # fp32 tiles take twice the registers of bf16 ones: half the query rows
    block_m = block_m or (16 if on_cpu or max_len <= 16 else 64 if low_precision else 32)
    block_n = block_n or (16 if on_cpu else 64)
    block_d = max(next_power_of_2(d_head), 16)  # tl.dot needs 16
    block_seq, block_pos, _ = layout.chunk_tables(block_m)
    _window_attention_kernel[(block_seq.shape[0], n_heads)](
        q, k, v, key_ring, value_ring, steps, cu_seqlens, state_indices, block_seq, block_pos, out,
        window, d_head, group, float(scale) * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_ring.stride(0), key_ring.stride(1), key_ring.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, LOW_PRECISION=low_precision,
        num_warps=4 if block_d <= 64 else 8,
    )
    block_t = 16 if on_cpu else 64
    _ring_write_kernel[(batch, cdiv(min(max_len, window), block_t), n_kv_heads)](
        k, v, key_ring, value_ring, steps, cu_seqlens, state_indices,
        window, d_head,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), key_ring.stride(0), key_ring.stride(1),
        key_ring.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


def window_attention(q, k, v, key_ring, value_ring, steps, cu_seqlens, state_indices, scale,
                     layout: PackedLayout | None = None):
    """Chunk form.

    q: (T, H, Dh); k, v: (T, G, Dh) with G dividing H; key_ring, value_ring: (slots, G, W, Dh), read and then
    written in place; steps: (slots,) int64, the positions each slot has seen before this chunk;
    cu_seqlens: (batch + 1,); state_indices: (batch,), -1 skips the sequence (output rows zero, ring untouched);
    scale: the softmax scale (Dh ** -0.5). Returns (T, H, Dh) in q.dtype.
    """
    return _window_attention(q, k, v, key_ring, value_ring, steps, cu_seqlens, state_indices, scale, layout)


if not HAS_TRITON:  # pragma: no cover
    del window_attention
