"""Causal depthwise conv1d over packed sequences, with the carried window kept in the slot pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import PackedLayout, layout_of, seq_lengths


def causal_conv1d_ref(x, weight, bias, conv_state, cu_seqlens, state_indices, silu=True,
                      layout: PackedLayout | None = None):
    """Chunk form.

    x: (total, d_inner) packed tokens; weight: (d_inner, d_conv); bias: (d_inner,) or None;
    conv_state: (slots, d_inner, d_conv - 1), the last d_conv - 1 inputs oldest first, updated in place;
    cu_seqlens: (batch + 1,) int32; state_indices: (batch,) int32, -1 skips the sequence (its rows stay zero).
    Returns (total, d_inner) in x.dtype.
    """
    out = torch.zeros_like(x)
    d_conv = weight.shape[1]
    w = weight.float()
    slots = state_indices.tolist()
    for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), seq_lengths(cu_seqlens))):
        slot = slots[i]
        if slot < 0 or length == 0:
            continue
        window = torch.cat([conv_state[slot].float().t(), x[start:start + length].float()], dim=0)  # (K-1+L, E)
        taps = window.unfold(0, d_conv, 1)  # (L, E, K)
        y = (taps * w).sum(-1)
        if bias is not None:
            y = y + bias.float()
        out[start:start + length] = (F.silu(y) if silu else y).to(x.dtype)
        conv_state[slot] = window[-(d_conv - 1):].t().to(conv_state.dtype)
    return out


def causal_conv1d_update_ref(x, weight, bias, conv_state, state_indices, silu=True):
    """One step for a batch of slots.

    x: (batch, d_inner); conv_state: (slots, d_inner, d_conv - 1) updated in place; -1 slots are skipped
    (their output rows are zero). Returns (batch, d_inner) in x.dtype.
    """
    out = torch.zeros_like(x)
    live = state_indices >= 0
    if not bool(live.any()):
        return out
    slots = state_indices[live].long()
    window = torch.cat([conv_state[slots].float(), x[live].float().unsqueeze(-1)], dim=-1)  # (b, E, K)
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    out[live] = (F.silu(y) if silu else y).to(x.dtype)
    conv_state[slots] = window[..., 1:].to(conv_state.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels. Chunk form: one launch computes the outputs over (token block, sequence, channel block); the
# program of a sequence's first token block, the only one that reads the carried window, then rewrites it (after
# a barrier: all of its threads have read the old window first).

from kernels._triton import (HAS_TRITON, cdiv, check_indices, check_pool, next_power_of_2, rows, tl,  # noqa: E402
                             triton)


@triton.jit
def _causal_conv1d_fwd_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, conv_state_ptr, cu_seqlens_ptr, state_indices_ptr, out_ptr,
    # sizes
    d_inner,
    # strides
    stride_x_token, stride_weight_d, stride_state_slot, stride_state_d, stride_out_token,
    # meta-parameters
    D_CONV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_l = tl.program_id(0)
    seq = tl.program_id(1)
    pid_d = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - start
    if pid_l * BLOCK_L < length:
        slot = tl.load(state_indices_ptr + seq).to(tl.int64)
        live = slot >= 0
        pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # (L,) position within the sequence
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
        d_mask = d < d_inner
        row_mask = pos < length
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(D_CONV):
            w = tl.load(weight_ptr + d * stride_weight_d + k, mask=d_mask, other=0.0).to(tl.float32)
            src = pos - (D_CONV - 1) + k  # tap position; < 0 reads the carried window
            in_x = (src >= 0) & row_mask
            xv = tl.load(
                x_ptr + (start + tl.where(in_x, src, 0))[:, None] * stride_x_token + d[None, :],
                mask=in_x[:, None] & d_mask[None, :], other=0.0,
            ).to(tl.float32)
            acc += xv * w[None, :]
        if pid_l == 0:  # only the first token block reaches back into the carried window
            for k in tl.static_range(D_CONV - 1):
                w = tl.load(weight_ptr + d * stride_weight_d + k, mask=d_mask, other=0.0).to(tl.float32)
                src = pos - (D_CONV - 1) + k
                in_state = (src < 0) & row_mask & live
                sv = tl.load(
                    conv_state_ptr + slot * stride_state_slot + d[None, :] * stride_state_d
                    + tl.where(in_state, src + D_CONV - 1, 0)[:, None],
                    mask=in_state[:, None] & d_mask[None, :], other=0.0,
                ).to(tl.float32)
                acc += sv * w[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        acc = tl.where(live, acc, 0.0)
        tl.store(
            out_ptr + (start + pos)[:, None] * stride_out_token + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )
        if pid_l == 0:
            tl.debug_barrier()  # the old window is read (above) before any of it is overwritten
            _write_window(x_ptr, conv_state_ptr, slot, live, start, length, d, d_inner, stride_x_token,
                          stride_state_slot, stride_state_d, D_CONV, BLOCK_W)


@triton.jit
def _write_window(x_ptr, conv_state_ptr, slot, live, start, length, d, d_inner, stride_x_token, stride_state_slot,
                  stride_state_d, D_CONV: tl.constexpr, BLOCK_W: tl.constexpr):
    """The sequence's new carried window: its last D_CONV - 1 inputs, oldest first (some from the old window when
    the sequence is shorter than that)."""
    j = tl.arange(0, BLOCK_W)  # (W,) new window slot, oldest first
    mask = (d < d_inner)[:, None] & (j < D_CONV - 1)[None, :] & live
    src = length - (D_CONV - 1) + j  # position in the sequence; < 0: still in the old window
    from_x = mask & (src >= 0)[None, :]
    from_state = mask & (src < 0)[None, :]
    state_base = conv_state_ptr + slot * stride_state_slot + d[:, None] * stride_state_d
    xv = tl.load(x_ptr + (start + tl.where(src >= 0, src, 0))[None, :] * stride_x_token + d[:, None],
                 mask=from_x, other=0.0)
    sv = tl.load(state_base + tl.where(src < 0, j + length, 0)[None, :], mask=from_state, other=0.0)
    window = tl.where(from_x, xv.to(conv_state_ptr.dtype.element_ty), sv.to(conv_state_ptr.dtype.element_ty))
    tl.debug_barrier()  # a short sequence's new window moves old entries: all are read before any is written
    tl.store(state_base + j[None, :], window, mask=mask)


@triton.jit
def _causal_conv1d_update_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, conv_state_ptr, state_indices_ptr, out_ptr,
    # sizes
    d_inner,
    # strides
    stride_x_row, stride_weight_d, stride_state_slot, stride_state_d, stride_out_row,
    # meta-parameters
    D_CONV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
    d_mask = d < d_inner
    j = tl.arange(0, BLOCK_W)  # (W,) window tap, oldest first; tap D_CONV - 1 is x
    tap_mask = d_mask[:, None] & (j < D_CONV)[None, :]
    state_base = conv_state_ptr + slot * stride_state_slot + d[:, None] * stride_state_d
    x = tl.load(x_ptr + row * stride_x_row + d, mask=d_mask & live, other=0.0)
    old = tl.load(state_base + tl.where(j < D_CONV - 1, j, 0)[None, :],
                  mask=tap_mask & (j < D_CONV - 1)[None, :] & live, other=0.0)
    window = tl.where((j == D_CONV - 1)[None, :], x.to(tl.float32)[:, None], old.to(tl.float32))  # (D, W)
    w = tl.load(weight_ptr + d[:, None] * stride_weight_d + j[None, :], mask=tap_mask, other=0.0)
    acc = tl.sum(window * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    acc = tl.where(live, acc, 0.0)
    tl.store(out_ptr + row * stride_out_row + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)
    # shift left by one: new[j] = old[j + 1], new[D_CONV - 2] = x
    shifted = tl.load(state_base + tl.where(j < D_CONV - 2, j + 1, 0)[None, :],
                      mask=tap_mask & (j < D_CONV - 2)[None, :] & live, other=0.0)
    new = tl.where((j == D_CONV - 2)[None, :], x.to(conv_state_ptr.dtype.element_ty)[:, None],
                   shifted.to(conv_state_ptr.dtype.element_ty))
    tl.store(state_base + j[None, :], new,
             mask=tap_mask & (j < D_CONV - 1)[None, :] & live)


def _check_conv_args(x, weight, bias, conv_state, state_indices, batch):
    d_inner = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != d_inner or weight.shape[1] < 2:
        raise ValueError(f"causal_conv1d: weight must be ({d_inner}, d_conv >= 2), got {tuple(weight.shape)}")
    d_conv = weight.shape[1]
    if bias is not None and bias.shape != (d_inner,):
        raise ValueError(f"causal_conv1d: bias must be ({d_inner},), got {tuple(bias.shape)}")
    check_pool("conv_state", conv_state, 3)
    if conv_state.shape[1:] != (d_inner, d_conv - 1):
        raise ValueError(f"causal_conv1d: conv_state must be (slots, {d_inner}, {d_conv - 1}), "
                         f"got {tuple(conv_state.shape)}")
    check_indices("state_indices", state_indices, batch, x.device)
    return d_inner, d_conv


def causal_conv1d(x, weight, bias, conv_state, cu_seqlens, state_indices, silu=True,
                  layout: PackedLayout | None = None):
    """Chunk form.

    x: (total, d_inner) packed tokens; weight: (d_inner, d_conv); bias: (d_inner,) or None;
    conv_state: (slots, d_inner, d_conv - 1), the last d_conv - 1 inputs oldest first, updated in place;
    cu_seqlens: (batch + 1,) int32; state_indices: (batch,) int32, -1 skips the sequence (its rows stay zero).
    Returns (total, d_inner) in x.dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d: x must be (total, d_inner), got {tuple(x.shape)}")
    batch = cu_seqlens.shape[0] - 1
    d_inner, d_conv = _check_conv_args(x, weight, bias, conv_state, state_indices, batch)
    x, weight = rows(x), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    cu_seqlens, state_indices = cu_seqlens.contiguous(), state_indices.contiguous()
    out = torch.empty_like(x)  # (total, d_inner); the kernel writes zeros on rows of -1 sequences
    layout = layout_of(cu_seqlens, layout)
    bounds = layout.bounds
    if bounds[-1] < x.shape[0]:
        out[bounds[-1]:].zero_()
    if batch == 0:
        return out
    max_len = layout.max_len
    block_d = min(next_power_of_2(d_inner), 64)
    if max_len > 0:  # else every sequence is empty and every window stays as it is
        block_l = min(next_power_of_2(max_len), 64)
        grid = (cdiv(max_len, block_l), batch, cdiv(d_inner, block_d))
        _causal_conv1d_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, conv_state, cu_seqlens, state_indices, out,
            d_inner,
            x.stride(0), weight.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
            D_CONV=d_conv, HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=block_l, BLOCK_D=block_d,
            BLOCK_W=next_power_of_2(d_conv), num_warps=4,
        )
    return out


def causal_conv1d_update(x, weight, bias, conv_state, state_indices, silu=True):
    """One step for a batch of slots.

    x: (batch, d_inner); conv_state: (slots, d_inner, d_conv - 1) updated in place; -1 slots are skipped
    (their output rows are zero). Returns (batch, d_inner) in x.dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_update: x must be (batch, d_inner), got {tuple(x.shape)}")
    batch = x.shape[0]
    d_inner, d_conv = _check_conv_args(x, weight, bias, conv_state, state_indices, batch)
    x, weight = rows(x), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    state_indices = state_indices.contiguous()
    out = torch.empty_like(x)  # (batch, d_inner); every row is written (zeros for -1 slots)
    if batch == 0:
        return out
    block_d = min(next_power_of_2(d_inner), 128 if batch <= 8 else 256)
    _causal_conv1d_update_kernel[(batch, cdiv(d_inner, block_d))](
        x, weight, bias if bias is not None else weight, conv_state, state_indices, out,
        d_inner,
        x.stride(0), weight.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
        D_CONV=d_conv, HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_W=next_power_of_2(d_conv), BLOCK_D=block_d,
        num_warps=4,
    )
    return out


if not HAS_TRITON:  # pragma: no cover
    del causal_conv1d, causal_conv1d_update
