"""Mamba-1 selective scan (S6) over packed sequences, D skip and SiLU(z) gate fused, state in the slot pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packing import PackedLayout, layout_of, pad_packed, unpad


def selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, state_indices, dt_softplus=True,
                       layout: PackedLayout | None = None, out=None):
    """Chunk form.

    x, dt, z: (total, d_inner) (z may be None: no gate); A: (d_inner, d_state) fp32 (negative);
    B, C: (total, d_state); D, dt_bias: (d_inner,) or None; ssm_state: (slots, d_inner, d_state) fp32,
    read as the initial state and overwritten with the final one; cu_seqlens: (batch + 1,);
    state_indices: (batch,), -1 skips the sequence (output rows zero, no state touched).
    out: optional (total, d_inner) destination in x.dtype with unit column stride (e.g. columns of a wider buffer).
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
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels: chunk-parallel scan.
#
# Tokens are cut into chunks of CHUNK tokens (per sequence; a chunk never spans two sequences). Within a
# chunk the recurrence s_t = a_t s_{t-1} + b_t (a = exp(dt A), b = dt x B) runs either as a loop over the
# chunk's tokens with a (BLOCK_D, d_state) state tile in registers (TOKEN_LOOP), or, for each state column n,
# as a tl.associative_scan over a (CHUNK, BLOCK_D) tile. Across chunks:
#   pass 1 (_scan_chunk_state_kernel):   each chunk's final state from a zero start, and its sum of dt
#                                        (a token loop, or a weighted sum over the chunk per state column);
#   pass 2 (_scan_chunk_combine_kernel): per sequence, a short sequential loop over its chunks that turns
#                                        those into each chunk's initial state, and writes the final state;
#   pass 3 (_scan_chunk_output_kernel):  each chunk again, started from its initial state: y, D skip, gate.
# When every sequence fits in one chunk, pass 3 alone reads and writes the pool (one launch).

from kernels._triton import (HAS_TRITON, INTERPRETED, cdiv, check_indices, check_pool, next_power_of_2,  # noqa: E402
                             rows, tl, triton)

TOKEN_LOOP_DEFAULT = True  # bench/RESULTS.md: the token loop beat tl.associative_scan on H200 (issue 3)


@triton.jit
def _scan_combine(a_left, b_left, a_right, b_right):
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _load_chunk_dt(
    dt_ptr, dt_bias_ptr, rows, row_mask, d, d_mask, stride_dt_token,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):
    """(CHUNK, BLOCK_D) fp32 step sizes; 0 outside the sequence, so a = 1 and b = 0 there."""
    mask = row_mask[:, None] & d_mask[None, :]
    dt = tl.load(dt_ptr + rows[:, None] * stride_dt_token + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _scan_chunk_state_kernel(
    # pointers
    x_ptr, dt_ptr, A_ptr, B_ptr, dt_bias_ptr, cu_seqlens_ptr, state_indices_ptr, chunk_seq_ptr, chunk_pos_ptr,
    chunk_state_ptr, chunk_dt_ptr,
    # sizes
    d_inner, d_state,
    # strides
    stride_x_token, stride_dt_token, stride_A_d, stride_B_token,
    stride_chunk_state_chunk, stride_chunk_state_d, stride_chunk_dt_chunk,
    # meta-parameters
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    TOKEN_LOOP: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seq = tl.load(chunk_seq_ptr + chunk)
    live = tl.load(state_indices_ptr + seq) >= 0
    seq_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + tl.load(chunk_pos_ptr + chunk).to(tl.int64) * CHUNK
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
    d_mask = d < d_inner
    if TOKEN_LOOP:
        n = tl.arange(0, BLOCK_N)  # (N,)
        n_mask = n < d_state
        tile_mask = d_mask[:, None] & n_mask[None, :]
        A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        A = A * 1.4426950408889634
        if HAS_DT_BIAS:
            dt_bias = tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        s = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        total = tl.zeros((BLOCK_D,), dtype=tl.float32)
        num_rows = tl.where(live, tl.minimum(seq_end - first, CHUNK), 0)
        # loads run one token ahead of the arithmetic (the loop is otherwise bound by load latency)
        x_next = tl.load(x_ptr + first * stride_x_token + d, mask=d_mask & (num_rows > 0), other=0.0)
        dt_next = tl.load(dt_ptr + first * stride_dt_token + d, mask=d_mask & (num_rows > 0), other=0.0)
        B_next = tl.load(B_ptr + first * stride_B_token + n, mask=n_mask & (num_rows > 0), other=0.0)
        for i in tl.range(0, num_rows):
            x, dt, B = x_next.to(tl.float32), dt_next.to(tl.float32), B_next.to(tl.float32)
            row = first + i + 1
            ahead = i + 1 < num_rows
            x_next = tl.load(x_ptr + row * stride_x_token + d, mask=d_mask & ahead, other=0.0)
            dt_next = tl.load(dt_ptr + row * stride_dt_token + d, mask=d_mask & ahead, other=0.0)
            B_next = tl.load(B_ptr + row * stride_B_token + n, mask=n_mask & ahead, other=0.0)
            if HAS_DT_BIAS:
                dt += dt_bias
            if DT_SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            s = tl.exp2(A * dt[:, None]) * s + (dt * x)[:, None] * B[None, :]
            total += dt
        tl.store(chunk_state_ptr + chunk * stride_chunk_state_chunk + d[:, None] * stride_chunk_state_d
                 + n[None, :], s, mask=tile_mask)
        tl.store(chunk_dt_ptr + chunk * stride_chunk_dt_chunk + d, total, mask=d_mask)
    else:
        rows = first + tl.arange(0, CHUNK)  # (T,)
        row_mask = (rows < seq_end) & live
        dt = _load_chunk_dt(dt_ptr, dt_bias_ptr, rows, row_mask, d, d_mask, stride_dt_token, HAS_DT_BIAS, DT_SOFTPLUS)
        x = tl.load(x_ptr + rows[:, None] * stride_x_token + d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        dtx = dt * x
        total = tl.sum(dt, axis=0)  # (D,)
        to_end = total[None, :] - tl.cumsum(dt, axis=0)  # (T, D) sum of dt after token t, >= 0 up to rounding
        for n in range(d_state):
            A_n = tl.load(A_ptr + d * stride_A_d + n, mask=d_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            B_n = tl.load(B_ptr + rows * stride_B_token + n, mask=row_mask, other=0.0).to(tl.float32)
            h_n = tl.sum(tl.exp2(A_n[None, :] * to_end) * dtx * B_n[:, None], axis=0)  # (D,)
            tl.store(chunk_state_ptr + chunk * stride_chunk_state_chunk + d * stride_chunk_state_d + n, h_n,
                     mask=d_mask)
        tl.store(chunk_dt_ptr + chunk * stride_chunk_dt_chunk + d, total, mask=d_mask)


@triton.jit
def _scan_chunk_combine_kernel(
    # pointers
    A_ptr, ssm_state_ptr, state_indices_ptr, chunk_cu_ptr, chunk_state_ptr, chunk_dt_ptr, chunk_init_ptr,
    # sizes
    d_inner, d_state,
    # strides
    stride_A_d, stride_state_slot, stride_state_d,
    stride_chunk_state_chunk, stride_chunk_state_d, stride_chunk_dt_chunk,
    # meta-parameters
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    pid_d = tl.program_id(1)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    if slot >= 0:
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
        n = tl.arange(0, BLOCK_N)  # (N,)
        d_mask = d < d_inner
        mask = d_mask[:, None] & (n < d_state)[None, :]
        tile = d[:, None] * stride_chunk_state_d + n[None, :]
        A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=mask, other=0.0).to(tl.float32)
        A = A * 1.4426950408889634
        state_ptrs = ssm_state_ptr + slot * stride_state_slot + d[:, None] * stride_state_d + n[None, :]
        s = tl.load(state_ptrs, mask=mask, other=0.0)  # (D, N)
        c_first = tl.load(chunk_cu_ptr + seq).to(tl.int64)
        num_chunks = tl.load(chunk_cu_ptr + seq + 1).to(tl.int64) - c_first
        for i in tl.range(0, num_chunks, num_stages=3):
            c = c_first + i
            h = tl.load(chunk_state_ptr + c * stride_chunk_state_chunk + tile, mask=mask, other=0.0)
            total = tl.load(chunk_dt_ptr + c * stride_chunk_dt_chunk + d, mask=d_mask, other=0.0)
            tl.store(chunk_init_ptr + c * stride_chunk_state_chunk + tile, s, mask=mask)
            s = tl.exp2(A * total[:, None]) * s + h
        tl.store(state_ptrs, s, mask=mask)


@triton.jit
def _scan_chunk_output_kernel(
    # pointers
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, ssm_state_ptr, cu_seqlens_ptr,
    state_indices_ptr, chunk_seq_ptr, chunk_pos_ptr, chunk_init_ptr, out_ptr,
    # sizes
    d_inner, d_state,
    # strides
    stride_x_token, stride_dt_token, stride_A_d, stride_B_token, stride_C_token, stride_z_token,
    stride_state_slot, stride_state_d, stride_chunk_init_chunk, stride_chunk_init_d, stride_out_token,
    # meta-parameters
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # every sequence is one chunk: start from the pool, write the final state
    TOKEN_LOOP: tl.constexpr,  # within the chunk: a loop over tokens (state tile in registers), else a scan
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seq = tl.load(chunk_seq_ptr + chunk)
    slot = tl.load(state_indices_ptr + seq).to(tl.int64)
    live = slot >= 0
    seq_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + tl.load(chunk_pos_ptr + chunk).to(tl.int64) * CHUNK
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
    d_mask = d < d_inner
    if SINGLE_CHUNK:
        init_ptrs = ssm_state_ptr + slot * stride_state_slot + d * stride_state_d
    else:
        init_ptrs = chunk_init_ptr + chunk * stride_chunk_init_chunk + d * stride_chunk_init_d
    if HAS_D:
        D = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if TOKEN_LOOP:
        n = tl.arange(0, BLOCK_N)  # (N,)
        n_mask = n < d_state
        tile_mask = d_mask[:, None] & n_mask[None, :] & live
        A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        A = A * 1.4426950408889634
        s = tl.load(init_ptrs[:, None] + n[None, :], mask=tile_mask, other=0.0)  # (D, N)
        if HAS_DT_BIAS:
            dt_bias = tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        num_rows = tl.minimum(seq_end - first, CHUNK)
        num_rows = tl.where(live, num_rows, 0)
        # loads run one token ahead of the arithmetic (the loop is otherwise bound by load latency)
        has_rows = num_rows > 0
        x_next = tl.load(x_ptr + first * stride_x_token + d, mask=d_mask & has_rows, other=0.0)
        dt_next = tl.load(dt_ptr + first * stride_dt_token + d, mask=d_mask & has_rows, other=0.0)
        B_next = tl.load(B_ptr + first * stride_B_token + n, mask=n_mask & has_rows, other=0.0)
        C_next = tl.load(C_ptr + first * stride_C_token + n, mask=n_mask & has_rows, other=0.0)
        for i in tl.range(0, num_rows):
            row = first + i
            x, dt = x_next.to(tl.float32), dt_next.to(tl.float32)
            B, C = B_next.to(tl.float32), C_next.to(tl.float32)
            ahead = i + 1 < num_rows
            x_next = tl.load(x_ptr + (row + 1) * stride_x_token + d, mask=d_mask & ahead, other=0.0)
            dt_next = tl.load(dt_ptr + (row + 1) * stride_dt_token + d, mask=d_mask & ahead, other=0.0)
            B_next = tl.load(B_ptr + (row + 1) * stride_B_token + n, mask=n_mask & ahead, other=0.0)
            C_next = tl.load(C_ptr + (row + 1) * stride_C_token + n, mask=n_mask & ahead, other=0.0)
            if HAS_DT_BIAS:
                dt += dt_bias
            if DT_SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            s = tl.exp2(A * dt[:, None]) * s + (dt * x)[:, None] * B[None, :]
            y = tl.sum(s * C[None, :], axis=1)  # (D,)
            if HAS_D:
                y += D * x
            if HAS_Z:
                z = tl.load(z_ptr + row * stride_z_token + d, mask=d_mask, other=0.0).to(tl.float32)
                y *= z / (1.0 + tl.exp(-z))
            tl.store(out_ptr + row * stride_out_token + d, y.to(out_ptr.dtype.element_ty), mask=d_mask)
        if SINGLE_CHUNK:
            tl.store(init_ptrs[:, None] + n[None, :], s, mask=tile_mask)
        if slot < 0:  # a padding sequence: its rows are zero
            rows = first + tl.arange(0, CHUNK)
            tl.store(out_ptr + rows[:, None] * stride_out_token + d[None, :],
                     tl.zeros((CHUNK, BLOCK_D), dtype=out_ptr.dtype.element_ty),
                     mask=(rows < seq_end)[:, None] & d_mask[None, :])
    else:
        t = tl.arange(0, CHUNK)  # (T,)
        rows = first + t
        in_seq = rows < seq_end
        row_mask = in_seq & live
        tile_mask = row_mask[:, None] & d_mask[None, :]
        dt = _load_chunk_dt(dt_ptr, dt_bias_ptr, rows, row_mask, d, d_mask, stride_dt_token, HAS_DT_BIAS,
                            DT_SOFTPLUS)
        x = tl.load(x_ptr + rows[:, None] * stride_x_token + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dtx = dt * x
        y = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
        for n in range(d_state):
            A_n = tl.load(A_ptr + d * stride_A_d + n, mask=d_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            B_n = tl.load(B_ptr + rows * stride_B_token + n, mask=row_mask, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + rows * stride_C_token + n, mask=row_mask, other=0.0).to(tl.float32)
            s0 = tl.load(init_ptrs + n, mask=d_mask & live, other=0.0)  # (D,)
            a = tl.exp2(A_n[None, :] * dt)  # (T, D)
            b = dtx * B_n[:, None]
            b = tl.where((t == 0)[:, None], b + a * s0[None, :], b)  # fold the initial state into step 0
            _, h = tl.associative_scan((a, b), 0, _scan_combine)
            y += h * C_n[:, None]
            if SINGLE_CHUNK:
                # rows past the end carry the state unchanged (a = 1, b = 0): the last row is the final state
                final = tl.sum(tl.where((t == CHUNK - 1)[:, None], h, 0.0), axis=0)
                tl.store(init_ptrs + n, final, mask=d_mask & live)
        if HAS_D:
            y += D[None, :] * x
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * stride_z_token + d[None, :], mask=tile_mask,
                        other=0.0).to(tl.float32)
            y *= z / (1.0 + tl.exp(-z))
        y = tl.where(tile_mask, y, 0.0)
        tl.store(out_ptr + rows[:, None] * stride_out_token + d[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=in_seq[:, None] & d_mask[None, :])


def _scan_config(max_len: int, d_inner: int, token_loop: bool):
    """Hand-tuned (bench/RESULTS.md): (chunk, block_d, num_warps of the output pass)."""
    if token_loop:  # H200 sweep at 32K: chunk 128, 32 channels, 1 warp (1.02 ms; 64: 1.10, 256: 1.09 ms)
        chunk = min(128, max(next_power_of_2(max_len), 16))
        return chunk, min(next_power_of_2(d_inner), 32), 1
    chunk = 64 if max_len > 32 else max(next_power_of_2(max_len), 16)
    bd = min(next_power_of_2(d_inner), 64 if max_len <= 2048 else 32)
    return chunk, bd, 4 if chunk * bd <= 4096 else 8


def _selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, state_indices, dt_softplus=True,
                    layout=None, out=None, chunk_size=None, block_d=None, token_loop=None, num_warps=None):
    """selective_scan with the tuning knobs exposed (tests and benchmarks): chunk_size, block_d, and
    token_loop (within a chunk, a loop over tokens instead of tl.associative_scan; the default under the
    interpreter, whose scan calls the combine function once per element)."""
    if x.dim() != 2:
        raise ValueError(f"selective_scan: x must be (total, d_inner), got {tuple(x.shape)}")
    total, d_inner = x.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"selective_scan: A must be ({d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t, shape in (("dt", dt, (total, d_inner)), ("B", B, (total, d_state)), ("C", C, (total, d_state)),
                           ("z", z, (total, d_inner)), ("D", D, (d_inner,)), ("dt_bias", dt_bias, (d_inner,))):
        if t is not None and t.shape != shape:
            raise ValueError(f"selective_scan: {name} must be {shape}, got {tuple(t.shape)}")
    check_pool("ssm_state", ssm_state, 3)
    if ssm_state.shape[1:] != (d_inner, d_state) or ssm_state.dtype != torch.float32:
        raise ValueError(f"selective_scan: ssm_state must be fp32 (slots, {d_inner}, {d_state}), "
                         f"got {ssm_state.dtype} {tuple(ssm_state.shape)}")
    batch = cu_seqlens.shape[0] - 1
    check_indices("state_indices", state_indices, batch, x.device)
    x, dt, B, C, z = rows(x), rows(dt), rows(B), rows(C), rows(z)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    cu_seqlens, state_indices = cu_seqlens.contiguous(), state_indices.contiguous()

    if out is None:
        out = torch.empty_like(x)  # (total, d_inner); rows of -1 sequences are written as zeros
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"selective_scan: out must be {x.dtype} {tuple(x.shape)} with unit column stride")
    layout = layout_of(cu_seqlens, layout)
    bounds = layout.bounds
    if bounds[-1] > total:
        raise ValueError(f"selective_scan: cu_seqlens ends at {bounds[-1]}, past the {total} tokens")
    if bounds[-1] < total:
        out[bounds[-1]:].zero_()
    if batch == 0:
        return out
    max_len = layout.max_len
    if token_loop is None:
        token_loop = TOKEN_LOOP_DEFAULT or INTERPRETED
    chunk, bd, out_warps = _scan_config(max_len, d_inner, token_loop)
    chunk = chunk_size or chunk
    bd = block_d or bd
    out_warps = num_warps or out_warps
    single = max_len <= chunk
    chunk_seq, chunk_pos, chunk_cu = layout.chunk_tables(chunk)
    num_chunks = chunk_seq.shape[0]
    grid = (num_chunks, cdiv(d_inner, bd))
    flags = dict(HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus)
    dt_bias_arg = dt_bias if dt_bias is not None else dt
    state_warps = 4 if chunk * bd <= 4096 else 8
    if single:
        chunk_init = ssm_state  # unused
    else:
        chunk_state = torch.empty(num_chunks, d_inner, d_state, device=x.device, dtype=torch.float32)
        chunk_dt = torch.empty(num_chunks, d_inner, device=x.device, dtype=torch.float32)
        chunk_init = torch.empty_like(chunk_state)  # (chunks, d_inner, d_state)
        _scan_chunk_state_kernel[grid](
            x, dt, A, B, dt_bias_arg, cu_seqlens, state_indices, chunk_seq, chunk_pos, chunk_state, chunk_dt,
            d_inner, d_state,
            x.stride(0), dt.stride(0), A.stride(0), B.stride(0),
            chunk_state.stride(0), chunk_state.stride(1), chunk_dt.stride(0),
            TOKEN_LOOP=token_loop, CHUNK=chunk, BLOCK_D=bd, BLOCK_N=next_power_of_2(d_state),
            num_warps=out_warps if token_loop else state_warps, **flags,
        )
        block_n = next_power_of_2(d_state)
        bd_combine = max(min(next_power_of_2(d_inner), 1024 // block_n, 64), 1)
        _scan_chunk_combine_kernel[(batch, cdiv(d_inner, bd_combine))](
            A, ssm_state, state_indices, chunk_cu, chunk_state, chunk_dt, chunk_init,
            d_inner, d_state,
            A.stride(0), ssm_state.stride(0), ssm_state.stride(1),
            chunk_state.stride(0), chunk_state.stride(1), chunk_dt.stride(0),
            BLOCK_D=bd_combine, BLOCK_N=block_n, num_warps=2,
        )
    _scan_chunk_output_kernel[grid](
        x, dt, A, B, C, D if D is not None else x, z if z is not None else x, dt_bias_arg, ssm_state,
        cu_seqlens, state_indices, chunk_seq, chunk_pos, chunk_init, out,
        d_inner, d_state,
        x.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0,
        ssm_state.stride(0), ssm_state.stride(1), chunk_init.stride(0), chunk_init.stride(1), out.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, SINGLE_CHUNK=single, TOKEN_LOOP=token_loop,
        CHUNK=chunk, BLOCK_D=bd, BLOCK_N=next_power_of_2(d_state), num_warps=out_warps, **flags,
    )
    return out


def selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, state_indices, dt_softplus=True,
                   layout: PackedLayout | None = None, out=None):
    """Chunk form.

    x, dt, z: (total, d_inner) (z may be None: no gate); A: (d_inner, d_state) fp32 (negative);
    B, C: (total, d_state); D, dt_bias: (d_inner,) or None; ssm_state: (slots, d_inner, d_state) fp32,
    read as the initial state and overwritten with the final one; cu_seqlens: (batch + 1,);
    state_indices: (batch,), -1 skips the sequence (output rows zero, no state touched).
    out: optional (total, d_inner) destination in x.dtype with unit column stride (e.g. columns of a wider buffer).
    Returns y = (s_t C_t + D x_t) * silu(z_t): (total, d_inner) in x.dtype.
    """
    return _selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, state_indices, dt_softplus, layout,
                           out)


if not HAS_TRITON:  # pragma: no cover
    del selective_scan
