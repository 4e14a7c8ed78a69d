"""One Mamba-1 decode step between in_proj and out_proj in two launches (they were four: conv update, x_proj,
dt_proj, state update):

    launch 1: conv window update + SiLU, and x_proj as partial sums over channel blocks;
    launch 2: the partial sums added up, dt_proj + softplus, SSM state update, D skip and SiLU(z) gate.

x_proj reduces over every channel and the state update needs its result for every channel, so the step cannot
be one launch without a grid-wide barrier; the partial sums (a few KB per row) are what crosses between the two.
From THREE_LAUNCH_MIN_BATCH rows (1: every batch, from the H200 sweep) launch 2 is split in two, so that the state
update runs in many small programs:
    launch 2: the partial sums added up, dt_proj + softplus, z + injection, written in fp32;
    launch 3: kernels/selective_state_update.py's kernel on them (state update, D skip, SiLU(z) gate).

The model decodes through this step up to FUSED_MAMBA_MAX_BATCH rows (32) only: above it main's unfused Mamba step
(conv update, x_proj, dt_proj, state update: two Triton kernels and two cuBLAS products) was the faster on the
H200 (run 5, see the constant). The op itself takes any batch; its tests and the benchmark's sweep run it at 64 and
256 too.

With concepts (DESIGN.md §1) the SSM input u = h + W_s (g_s ⊙ r) only feeds in_proj, so in_proj(u) =
in_proj(h) + (W_in W_s)(g_s ⊙ r): the layer hands in in_proj(h) as `xz` and g_s ⊙ r as `inject` with
`inject_weight` = W_in W_s, and each launch adds its own channels' share.

The intermediates stay in fp32, more accurate than the unfused path, which stores each in the model dtype. That is
also what makes the step checkable against its reference in bf16: rounding a result computed in two summation
orders to 16 bits flips the last bit of one element in a few thousand, and a flipped dt moves a whole state row
(issue 10's first GPU run). The tensor cores take an fp32 operand as a 16-bit head plus the rounding of the rest.
"""
from __future__ import annotations

import torch

from kernels.causal_conv1d import causal_conv1d_update_ref
from kernels.selective_state_update import selective_state_update_ref


def mamba_step_ref(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, conv_state, ssm_state,
                   state_indices, inject=None, inject_weight=None, out=None):
    """One step for a batch of slots.

    xz: (batch, 2 E) in_proj's output [x; z]; conv_weight: (E, K); conv_bias: (E,) or None;
    x_proj_weight: (R + 2 N, E); dt_proj_weight: (E, R); dt_bias, D: (E,); A: (E, N) fp32 (negative);
    conv_state: (slots, E, K - 1) and ssm_state: (slots, E, N) fp32, updated in place;
    state_indices: (batch,), -1 skips the row (output zero, no state touched);
    inject: (batch, C) and inject_weight: (2 E, C), or None: xz + inject @ inject_weight^T replaces xz;
    out: optional (batch, E) destination. Returns y = (s C + D xc) SiLU(z): (batch, E) in xz.dtype.
    Everything between the inputs and y is fp32 (x and z after the injection, the conv output, x_proj's and
    dt_proj's outputs); only what is stored is rounded: the carried window to its dtype, y to xz.dtype.
    """
    E, R, N = conv_weight.shape[0], dt_proj_weight.shape[1], A.shape[1]
    xz32 = xz.float()
    if inject is not None:
        xz32 = xz32 + inject.float() @ inject_weight.float().t()
    xc = causal_conv1d_update_ref(xz32[:, :E], conv_weight, conv_bias, conv_state, state_indices)  # (batch, E) fp32
    dbc = xc @ x_proj_weight.float().t()  # (batch, R + 2N)
    dt = dbc[:, :R] @ dt_proj_weight.float().t()  # (batch, E)
    y = selective_state_update_ref(xc, dt, A, dbc[:, R:R + N], dbc[:, R + N:], D, xz32[:, E:], dt_bias, ssm_state,
                                   state_indices).to(xz.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels over (row block, channel block). Rows come BLOCK_B (>= 16) at a time so that the projections
# run on the tensor cores with their weights read once per row block, not once per row; padding rows are masked.

from kernels._jit import dot_rows, dot_split, lowp_dot, silu, softplus, stored  # noqa: E402
from kernels._triton import (HAS_TRITON, cdiv, check_indices, check_pool, next_power_of_2, rows, tl,  # noqa: E402
                             triton)
from kernels.selective_state_update import _selective_state_update_kernel, _update_config  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels.pdl import wait_for_inputs  # noqa: E402


@triton.jit
def _step_rows(state_indices_ptr, pid_b, batch, BLOCK_B: tl.constexpr):
    """This program's rows of the batch (B,), which of them exist, their pool slots and which slots are real (a pad
    row's slot is -1: the kernels skip it)."""
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < batch
    slots = tl.load(state_indices_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    return rows, row_mask, slots, slots >= 0


@triton.jit
def _injected(inject_ptr, inject_weight_ptr, rows, row_mask, cols, col_mask, d_inject, stride_inject_row,
              stride_inject_weight_row, LOWP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """(B, BLOCK) fp32: inject[rows] @ inject_weight[cols]^T, the injection into in_proj's output columns `cols`,
    over d_inject in blocks of BLOCK_C (a whole (rows, d_inject) operand would crowd the registers)."""
    acc = tl.zeros((BLOCK_B, BLOCK), dtype=tl.float32)
    for c0 in range(0, d_inject, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < d_inject
        inject = tl.load(inject_ptr + rows[:, None] * stride_inject_row + c[None, :],
                         mask=row_mask[:, None] & c_mask[None, :], other=0.0)  # (B, C)
        weight = tl.load(inject_weight_ptr + cols[:, None] * stride_inject_weight_row + c[None, :],
                         mask=col_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK, C)
        acc += dot_rows(inject, tl.trans(weight), inject_weight_ptr, LOWP)
    return acc


@triton.jit
def _conv_weights(conv_weight_ptr, e, e_mask, w_tap, stride_conv_weight_d, D_CONV: tl.constexpr):
    """(E, W) fp32: the conv taps of channels e."""
    return tl.load(conv_weight_ptr + e[:, None] * stride_conv_weight_d + w_tap[None, :],
                   mask=e_mask[:, None] & (w_tap < D_CONV)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _x_proj_weights(x_proj_weight_ptr, e, e_mask, p, d_proj, stride_x_proj_row):
    """(E, P): x_proj's weights of channels e, transposed."""
    return tl.load(x_proj_weight_ptr + p[None, :] * stride_x_proj_row + e[:, None],
                   mask=e_mask[:, None] & (p < d_proj)[None, :], other=0.0)


@triton.jit
def _mamba_step_conv_kernel(
    # pointers
    xz_ptr, inject_ptr, inject_weight_ptr, conv_weight_ptr, conv_bias_ptr, conv_state_ptr, x_proj_weight_ptr,
    state_indices_ptr, xc_ptr, dbc_part_ptr,
    # sizes
    batch, d_inner, d_proj, d_inject,
    # strides
    stride_xz_row, stride_inject_row, stride_inject_weight_row, stride_conv_weight_d, stride_conv_state_slot,
    stride_conv_state_d, stride_x_proj_row, stride_xc_row, stride_part_part, stride_part_row,
    # meta-parameters
    HAS_INJECT: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    D_CONV: tl.constexpr,
    LOWP: tl.constexpr,
    NUM_SUB: tl.constexpr,  # channel blocks per program: one partial sum of x_proj per program
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    w_tap = tl.arange(0, BLOCK_W)  # (W,) window tap, oldest first; tap D_CONV - 1 is this step's x
    p = tl.arange(0, BLOCK_P)  # (P,) x_proj outputs
    # with PDL and one channel block a program (small batches), the weights' loads go out before the wait
    PREFETCH: tl.constexpr = PDL and NUM_SUB == 1
    if PREFETCH:
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = e < d_inner
        w_first = _conv_weights(conv_weight_ptr, e, e_mask, w_tap, stride_conv_weight_d, D_CONV)
        w_x_first = _x_proj_weights(x_proj_weight_ptr, e, e_mask, p, d_proj, stride_x_proj_row)
    wait_for_inputs(PDL)
    rows, row_mask, slots, live = _step_rows(state_indices_ptr, pid_b, batch, BLOCK_B)
    part = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for sub in range(NUM_SUB):
        e = (pid_e * NUM_SUB + sub) * BLOCK_E + tl.arange(0, BLOCK_E)  # (E,)
        e_mask = e < d_inner
        tile = row_mask[:, None] & e_mask[None, :]
        x = tl.load(xz_ptr + rows[:, None] * stride_xz_row + e[None, :], mask=tile, other=0.0).to(tl.float32)
        if HAS_INJECT:
            x += _injected(inject_ptr, inject_weight_ptr, rows, row_mask, e, e_mask, d_inject, stride_inject_row,
                           stride_inject_weight_row, LOWP, BLOCK_B, BLOCK_E, BLOCK_C)
        # the window (B, E, W): the carried K - 1 inputs, then x
        live3 = (tile & live[:, None])[:, :, None]
        state = conv_state_ptr + slots[:, None, None] * stride_conv_state_slot + e[None, :, None] * stride_conv_state_d
        old = tl.load(state + w_tap[None, None, :], mask=live3 & (w_tap < D_CONV - 1)[None, None, :], other=0.0)
        window = tl.where((w_tap == D_CONV - 1)[None, None, :], x[:, :, None], old.to(tl.float32))
        if PREFETCH:
            w = w_first
        else:
            w = _conv_weights(conv_weight_ptr, e, e_mask, w_tap, stride_conv_weight_d, D_CONV)
        acc = tl.sum(window * w[None, :, :], axis=2)  # (B, E)
        if HAS_CONV_BIAS:
            acc += tl.load(conv_bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
        xc = tl.where(tile & live[:, None], silu(acc), 0.0)  # (B, E) fp32
        tl.store(xc_ptr + rows[:, None] * stride_xc_row + e[None, :], xc, mask=tile)
        # shift the window left by one: new[w] = old[w + 1], new[K - 2] = x
        shifted = tl.load(state + w_tap[None, None, :] + 1, mask=live3 & (w_tap < D_CONV - 2)[None, None, :],
                          other=0.0)
        new = tl.where((w_tap == D_CONV - 2)[None, None, :],
                       stored(x, conv_state_ptr)[:, :, None].to(conv_state_ptr.dtype.element_ty), shifted)
        tl.debug_barrier()  # every thread has read the old window before any of it is overwritten
        tl.store(state + w_tap[None, None, :], new, mask=live3 & (w_tap < D_CONV - 1)[None, None, :])
        if PREFETCH:
            w_x = w_x_first
        else:
            w_x = _x_proj_weights(x_proj_weight_ptr, e, e_mask, p, d_proj, stride_x_proj_row)
        part += dot_split(xc, w_x, x_proj_weight_ptr, LOWP)
    tl.store(dbc_part_ptr + pid_e * stride_part_part + rows[:, None] * stride_part_row + p[None, :], part,
             mask=row_mask[:, None] & (p < d_proj)[None, :])


@triton.jit
def _mamba_step_ssm_kernel(
    # pointers
    xz_ptr, inject_ptr, inject_weight_ptr, xc_ptr, dbc_part_ptr, dt_proj_weight_ptr, dt_bias_ptr, A_ptr, D_ptr,
    ssm_state_ptr, state_indices_ptr, out_ptr,
    # sizes
    batch, d_inner, d_state, dt_rank, d_inject,
    # strides
    stride_xz_row, stride_inject_row, stride_inject_weight_row, stride_xc_row, stride_part_part, stride_part_row,
    stride_dt_proj_row, stride_A_d, stride_ssm_state_slot, stride_ssm_state_d, stride_out_row,
    # meta-parameters
    HAS_INJECT: tl.constexpr,
    LOWP: tl.constexpr,
    NUM_PARTS: tl.constexpr,  # unrolled: the partial sums' loads are all in flight at once
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,) channels
    d_mask = d < d_inner
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    r = tl.arange(0, BLOCK_R)
    w_dt = tl.load(dt_proj_weight_ptr + d[None, :] * stride_dt_proj_row + r[:, None],
                   mask=(r < dt_rank)[:, None] & d_mask[None, :], other=0.0)  # (R, D)
    wait_for_inputs(PDL)
    rows, row_mask, slots, live = _step_rows(state_indices_ptr, pid_b, batch, BLOCK_B)
    tile = row_mask[:, None] & d_mask[None, :]
    # x_proj's output: the partial sums of launch 1, added up (fp32)
    delta = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    B = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    C = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(NUM_PARTS):
        part = dbc_part_ptr + i * stride_part_part + rows[:, None] * stride_part_row
        delta += tl.load(part + r[None, :], mask=row_mask[:, None] & (r < dt_rank)[None, :], other=0.0)
        B += tl.load(part + dt_rank + n[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        C += tl.load(part + dt_rank + d_state + n[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
    dt = dot_split(delta, w_dt, dt_proj_weight_ptr, LOWP)  # (B, D)
    dt = softplus(dt + tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :])
    z = tl.load(xz_ptr + rows[:, None] * stride_xz_row + d_inner + d[None, :], mask=tile, other=0.0).to(tl.float32)
    if HAS_INJECT:
        z += _injected(inject_ptr, inject_weight_ptr, rows, row_mask, d_inner + d, d_mask, d_inject, stride_inject_row,
                       stride_inject_weight_row, LOWP, BLOCK_B, BLOCK_D, BLOCK_C)
    xc = tl.load(xc_ptr + rows[:, None] * stride_xc_row + d[None, :], mask=tile, other=0.0).to(tl.float32)
    live3 = (tile & live[:, None])[:, :, None] & n_mask[None, None, :]
    state_ptrs = (ssm_state_ptr + slots[:, None, None] * stride_ssm_state_slot + d[None, :, None] * stride_ssm_state_d
                  + n[None, None, :])
    s = tl.load(state_ptrs, mask=live3, other=0.0)  # (B, D, N) fp32
    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=d_mask[:, None] & n_mask[None, :],
                other=0.0).to(tl.float32)  # (D, N)
    s = tl.exp2(A[None, :, :] * (dt * 1.4426950408889634)[:, :, None]) * s + (dt * xc)[:, :, None] * B[:, None, :]
    tl.store(state_ptrs, s, mask=live3)
    y = tl.sum(s * C[:, None, :], axis=2)  # (B, D)
    y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :] * xc
    y = tl.where(tile & live[:, None], stored(y * silu(z), out_ptr), 0.0)
    tl.store(out_ptr + rows[:, None] * stride_out_row + d[None, :], y.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _mamba_step_dt_kernel(
    # pointers
    xz_ptr, inject_ptr, inject_weight_ptr, dbc_part_ptr, dt_proj_weight_ptr, dt_bias_ptr, dt_ptr, z_ptr, B_ptr,
    C_ptr,
    # sizes
    batch, d_inner, d_state, dt_rank, d_inject,
    # strides
    stride_xz_row, stride_inject_row, stride_inject_weight_row, stride_part_part, stride_part_row,
    stride_dt_proj_row, stride_dt_row, stride_z_row, stride_B_row, stride_C_row,
    # meta-parameters
    HAS_INJECT: tl.constexpr,
    LOWP: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PART_UNROLL: tl.constexpr,  # partial sums loaded at once
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    """Launch 2 of the three-launch (large-batch) step: launch 2 of the two-launch step without the state. The
    partial sums of x_proj added up; dt = softplus(dt_proj(δ) + dt_bias) and, with the injection, z + injection,
    both (batch, E) fp32; B and C (batch, N) fp32 from the first channel block's programs. Everything the state
    update needs, so that it runs as kernels/selective_state_update.py's one-row programs."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (B,)
    row_mask = rows < batch
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,) channels
    d_mask = d < d_inner
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    r = tl.arange(0, BLOCK_R)
    tile = row_mask[:, None] & d_mask[None, :]
    # the partial sums PART_UNROLL at a time, in the order the two-launch path adds them: all of them unrolled
    # (as there) spill at 24 parts (ptxas -v: 660 bytes), and one at a time would be 24 dependent loads
    w_dt = tl.load(dt_proj_weight_ptr + d[None, :] * stride_dt_proj_row + r[:, None],
                   mask=(r < dt_rank)[:, None] & d_mask[None, :], other=0.0)  # (R, D)
    wait_for_inputs(PDL)
    delta = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for i0 in range(0, NUM_PARTS, PART_UNROLL):
        for u in tl.static_range(PART_UNROLL):
            part = dbc_part_ptr + (i0 + u) * stride_part_part + rows[:, None] * stride_part_row
            delta += tl.load(part + r[None, :], mask=row_mask[:, None] & (r < dt_rank)[None, :] & (i0 + u < NUM_PARTS),
                             other=0.0)
    dt = dot_split(delta, w_dt, dt_proj_weight_ptr, LOWP)  # (B, D)
    dt = softplus(dt + tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :])
    tl.store(dt_ptr + rows[:, None] * stride_dt_row + d[None, :], dt, mask=tile)
    if HAS_INJECT:
        z = tl.load(xz_ptr + rows[:, None] * stride_xz_row + d_inner + d[None, :], mask=tile,
                    other=0.0).to(tl.float32)
        z += _injected(inject_ptr, inject_weight_ptr, rows, row_mask, d_inner + d, d_mask, d_inject,
                       stride_inject_row, stride_inject_weight_row, LOWP, BLOCK_B, BLOCK_D, BLOCK_C)
        tl.store(z_ptr + rows[:, None] * stride_z_row + d[None, :], z, mask=tile)
    if pid_d == 0:
        B = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        C = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for i0 in range(0, NUM_PARTS, PART_UNROLL):
            for u in tl.static_range(PART_UNROLL):
                part = dbc_part_ptr + (i0 + u) * stride_part_part + rows[:, None] * stride_part_row
                part_mask = row_mask[:, None] & n_mask[None, :] & (i0 + u < NUM_PARTS)
                B += tl.load(part + dt_rank + n[None, :], mask=part_mask, other=0.0)
                C += tl.load(part + dt_rank + d_state + n[None, :], mask=part_mask, other=0.0)
        bc_mask = row_mask[:, None] & n_mask[None, :]
        tl.store(B_ptr + rows[:, None] * stride_B_row + n[None, :], B, mask=bc_mask)
        tl.store(C_ptr + rows[:, None] * stride_C_row + n[None, :], C, mask=bc_mask)


def _step_config(batch: int, d_inner: int):
    """(channels per block of launch 1, blocks per program there, channels per program of launch 2). Hand-picked,
    no autotune (both launches write state in place): small batches spread over more, narrower programs; launch 2
    adds up one partial sum of x_proj per program of launch 1 (24 at d_inner 1536 for batch <= 16)."""
    block_e = min(next_power_of_2(d_inner), 64)
    num_sub = 1 if batch <= 16 else (2 if batch <= 64 else 4)
    block_d = 16 if batch <= 16 else 32
    return block_e, num_sub, block_d


# From this batch the three-launch path. Why it was built (issue 10's H200 profile at batch 256: launch 1 ~31 µs and
# launch 2 ~45 µs a layer, against ~12 µs for the 50 MB of state launch 2 moves): both launches run 8 warps a program
# at 155-255 registers a thread (ptxas -v), so one program fits an SM, and each program is one long dependent chain
# (the x_proj partial sums, dt_proj and the injection's products, and only then the state load), so nothing hides
# the memory latency; launch 1 had 96 programs (16 row blocks x 6) for 132 SMs. The three-launch path keeps
# launch 1 (with more programs), moves everything but the state into a launch of its own, and updates the state
# with kernels/selective_state_update.py's kernel (one row and 64 channels a program, 1-2 warps, the state load
# issued first: many programs an SM).
# Why from batch 1: issue 10's H200 sweep (bench/RESULTS.md, "run 4": branch wt-fused at 4b1cb83, bench_model.py
# --sweep, k = 16, 130M config, bf16, CUDA graphs) timed the three-launch path the fastest at every batch timed: ms a
# step, best three-launch against best two-launch, 1.065 / 1.104 at batch 1, 1.284 / 1.571 at 64, 2.215 / 2.842 at
# 256 (at batch 1 the margin is about the run's noise, 0.01-0.05 ms). The two-launch path stays (the sweep times
# it, `three=False` forces it).
THREE_LAUNCH_MIN_BATCH = 1

# The model's decode step (MambaMixer.mix, INFOMAMBA_FUSED_STEP `1`) runs this fused step up to this many rows (the
# padded batch under CUDA graphs, fixed at capture), and main's unfused Mamba step above it (conv update, x_proj,
# dt_proj, selective_state_update; the concept step stays fused at every batch). From issue 10's H200 run 5
# (bench/RESULTS.md: branch wt-fused at 766188d, bench_model.py --sweep --skip-long, 130M config, bf16, CUDA
# graphs), ms a step, fused / unfused Mamba step: k = 0 0.690 / 0.722 at batch 1, 0.894 / 0.830 at 64, 1.418 /
# 1.102 at 256; k = 16 (concept step fused in both) 1.027 / 1.107, 1.242 / 1.326, 2.089 / 1.910. The fused step
# wins at batch 1 and loses at 256 for both; at 64 it loses for k = 0 (the default model) and wins by 0.08 ms for
# k = 16. Batches 2-63 were not timed: 32, the largest captured graph under 64, is a guess between the two.
FUSED_MAMBA_MAX_BATCH = 32
# the injection's inner dimension (d_c, 192 at the 130M config) per block of _injected: a wider block puts more of
# its loads in flight at once, for fewer dependent rounds. The dt launch spills at 256 with 128 channels a program,
# and the two-launch path's state launch above 64 (bench/compile_kernels.py), so they take at most that.
# bench_model.py --sweep times the choices; on an H200 (k = 16, 130M config, graphs) 64 / 128 / 256 read 0.884 /
# 0.983 / 0.923 ms a step at batch 1 and 1.053 / 1.031 / 1.037 at 4, where one configuration timed twice in the
# same run differed by up to 0.09 ms: no gain to take, so 64 stays.
INJECT_BLOCK_C = 64
DT_PART_UNROLL, DT_WARPS = 8, 8  # the dt launch: no spills at the 130M config (bench/compile_kernels.py)


def _three_launch_config(batch: int, d_inner: int):
    """(channels per block of launch 1, blocks per program there, channels per program of the dt launch). From the
    same sweep (run 4), the fastest of (64, 1 or 2, 64 or 128) at each batch timed: (64, 1, 128) at batch 1 (1.065
    ms; (64, 1, 64) 1.133), (64, 1, 64) at 64 (1.284; 128: 1.293) and at 256 (2.215; 128: 2.271). Batches 2-63 were
    not timed: up to 16 take batch 1's choice (the two-launch configuration's own boundary). Above 256, not timed
    either, two blocks a program as before."""
    block_e = min(next_power_of_2(d_inner), 64)
    return block_e, 1 if batch <= 256 else 2, 128 if batch <= 16 else 64


def _mamba_step(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, conv_state, ssm_state,
                state_indices, inject=None, inject_weight=None, out=None, block_e=None, num_sub=None, block_d=None,
                three=None):
    """mamba_step with the launch configuration exposed (benchmark sweeps, tests): `three` forces the three-launch
    path (True) or the two-launch one (False); else the batch picks (THREE_LAUNCH_MIN_BATCH)."""
    if xz.dim() != 2 or xz.stride(-1) != 1:
        raise ValueError(f"mamba_step: xz must be (batch, 2 d_inner) with unit column stride, got {tuple(xz.shape)}")
    batch = xz.shape[0]
    if conv_weight.dim() != 2 or conv_weight.shape[1] < 2 or xz.shape[1] != 2 * conv_weight.shape[0]:
        raise ValueError(f"mamba_step: conv_weight must be (d_inner, d_conv >= 2) with xz (batch, 2 d_inner), got "
                         f"{tuple(conv_weight.shape)} and {tuple(xz.shape)}")
    d_inner, d_conv = conv_weight.shape
    d_state = A.shape[1] if A.dim() == 2 else -1
    dt_rank = dt_proj_weight.shape[1] if dt_proj_weight.dim() == 2 else -1
    d_proj = dt_rank + 2 * d_state
    for name, t, shape in (("conv_bias", conv_bias, (d_inner,)), ("x_proj_weight", x_proj_weight, (d_proj, d_inner)),
                           ("dt_proj_weight", dt_proj_weight, (d_inner, dt_rank)), ("dt_bias", dt_bias, (d_inner,)),
                           ("A", A, (d_inner, d_state)), ("D", D, (d_inner,)), ("out", out, (batch, d_inner))):
        if t is not None and t.shape != shape:  # torch.Size compares to a tuple: no tuple built per tensor
            raise ValueError(f"mamba_step: {name} must be {shape}, got {tuple(t.shape)}")
    if (inject is None) != (inject_weight is None):
        raise ValueError("mamba_step: inject and inject_weight go together")
    d_inject = inject.shape[1] if inject is not None else 0
    if inject is not None and (inject.shape != (batch, d_inject) or inject_weight.shape != (2 * d_inner, d_inject)):
        raise ValueError(f"mamba_step: inject must be ({batch}, C) and inject_weight ({2 * d_inner}, C), got "
                         f"{tuple(inject.shape)} and {tuple(inject_weight.shape)}")
    check_pool("conv_state", conv_state, 3)
    check_pool("ssm_state", ssm_state, 3)
    if conv_state.shape[1:] != (d_inner, d_conv - 1):
        raise ValueError(f"mamba_step: conv_state must be (slots, {d_inner}, {d_conv - 1}), got {tuple(conv_state.shape)}")
    if ssm_state.shape[1:] != (d_inner, d_state) or ssm_state.dtype != torch.float32:
        raise ValueError(f"mamba_step: ssm_state must be fp32 (slots, {d_inner}, {d_state}), "
                         f"got {ssm_state.dtype} {tuple(ssm_state.shape)}")
    check_indices("state_indices", state_indices, batch, xz.device)
    if out is not None and (out.stride(-1) != 1 or out.dtype != xz.dtype):
        raise ValueError("mamba_step: out must have xz's dtype and unit column stride")
    conv_weight, x_proj_weight = conv_weight.contiguous(), x_proj_weight.contiguous()
    dt_proj_weight, A = dt_proj_weight.contiguous(), A.contiguous()
    conv_bias = conv_bias.contiguous() if conv_bias is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    D = D.contiguous() if D is not None else None
    if inject is not None:
        inject, inject_weight = inject.contiguous(), inject_weight.contiguous()
    state_indices = state_indices.contiguous()
    out = out if out is not None else torch.empty((batch, d_inner), device=xz.device, dtype=xz.dtype)
    if batch == 0:
        return out
    three = batch >= THREE_LAUNCH_MIN_BATCH if three is None else three
    config = (_three_launch_config if three else _step_config)(batch, d_inner)
    block_e, num_sub, block_d = block_e or config[0], num_sub or config[1], block_d or config[2]
    block_b = 16  # tl.dot's least
    # 8 warps: the sm_90 compile (ptxas -v) of both kernels spills on 4 at the 130M config in bf16
    num_parts = cdiv(d_inner, block_e * num_sub)
    xc = torch.empty((batch, d_inner), device=xz.device, dtype=torch.float32)  # (batch, E) the conv's output
    dbc_part = torch.empty((num_parts, batch, d_proj), device=xz.device, dtype=torch.float32)
    block_c = min(max(next_power_of_2(d_inject), 16), INJECT_BLOCK_C)  # the injection's inner dimension, per block
    lowp = lowp_dot(xz.dtype)
    placeholder = xz  # pointer arguments the kernels never read (no injection)
    grid_b = cdiv(batch, block_b)
    with_pdl = pdl.use(xz.device, batch)
    _mamba_step_conv_kernel[(grid_b, num_parts)](
        xz, inject if inject is not None else placeholder, inject_weight if inject is not None else placeholder,
        conv_weight, conv_bias if conv_bias is not None else conv_weight, conv_state, x_proj_weight, state_indices,
        xc, dbc_part,
        batch, d_inner, d_proj, d_inject,
        xz.stride(0), inject.stride(0) if inject is not None else 0,
        inject_weight.stride(0) if inject is not None else 0, conv_weight.stride(0), conv_state.stride(0),
        conv_state.stride(1), x_proj_weight.stride(0), xc.stride(0), dbc_part.stride(0), dbc_part.stride(1),
        HAS_INJECT=inject is not None, HAS_CONV_BIAS=conv_bias is not None, D_CONV=d_conv, LOWP=lowp,
        NUM_SUB=num_sub, BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_W=next_power_of_2(d_conv),
        BLOCK_P=max(next_power_of_2(d_proj), 16), BLOCK_C=block_c, PDL=with_pdl, num_warps=8,
        **pdl.options(with_pdl),
    )
    if three:
        _three_launch_rest(xz, inject, inject_weight, dbc_part, dt_proj_weight, dt_bias, A, D, xc, ssm_state,
                           state_indices, out, batch, d_inner, d_state, dt_rank, d_inject, num_parts, block_b,
                           block_d, block_c, lowp, with_pdl)
        return out
    _mamba_step_ssm_kernel[(grid_b, cdiv(d_inner, block_d))](
        xz, inject if inject is not None else placeholder, inject_weight if inject is not None else placeholder, xc,
        dbc_part, dt_proj_weight, dt_bias, A, D, ssm_state, state_indices, out,
        batch, d_inner, d_state, dt_rank, d_inject,
        xz.stride(0), inject.stride(0) if inject is not None else 0,
        inject_weight.stride(0) if inject is not None else 0, xc.stride(0), dbc_part.stride(0), dbc_part.stride(1),
        dt_proj_weight.stride(0), A.stride(0), ssm_state.stride(0), ssm_state.stride(1), out.stride(0),
        HAS_INJECT=inject is not None, LOWP=lowp, NUM_PARTS=num_parts, BLOCK_B=block_b, BLOCK_D=block_d,
        BLOCK_N=next_power_of_2(d_state), BLOCK_R=max(next_power_of_2(dt_rank), 16),
        BLOCK_C=min(block_c, 64), PDL=with_pdl, num_warps=8, **pdl.options(with_pdl),
    )
    return out


def _three_launch_rest(xz, inject, inject_weight, dbc_part, dt_proj_weight, dt_bias, A, D, xc, ssm_state,
                       state_indices, out, batch, d_inner, d_state, dt_rank, d_inject, num_parts, block_b, block_d,
                       block_c, lowp, with_pdl):
    """Launches 2 and 3 of the three-launch path: dt, z (with the injection), B and C in fp32, then the state
    update. The intermediates stay fp32 as in the two-launch path, so both compute the same step (only the order of
    sums differs: none, since both add the same partial sums in the same order and take the same products)."""
    dt = torch.empty((batch, d_inner), device=xz.device, dtype=torch.float32)  # (batch, E) softplus'd, bias in
    B = torch.empty((batch, d_state), device=xz.device, dtype=torch.float32)  # (batch, N)
    C = torch.empty_like(B)
    if inject is not None:
        z = torch.empty((batch, d_inner), device=xz.device, dtype=torch.float32)  # (batch, E) z + injection
        z_in = z
    else:  # z read straight from xz's second half by the state update
        z, z_in = dt, xz[:, d_inner:]
    placeholder = xz
    _mamba_step_dt_kernel[(cdiv(batch, block_b), cdiv(d_inner, block_d))](
        xz, inject if inject is not None else placeholder, inject_weight if inject is not None else placeholder,
        dbc_part, dt_proj_weight, dt_bias, dt, z, B, C,
        batch, d_inner, d_state, dt_rank, d_inject,
        xz.stride(0), inject.stride(0) if inject is not None else 0,
        inject_weight.stride(0) if inject is not None else 0, dbc_part.stride(0), dbc_part.stride(1),
        dt_proj_weight.stride(0), dt.stride(0), z.stride(0), B.stride(0), C.stride(0),
        HAS_INJECT=inject is not None, LOWP=lowp, NUM_PARTS=num_parts, PART_UNROLL=DT_PART_UNROLL, BLOCK_B=block_b,
        BLOCK_D=block_d, BLOCK_N=next_power_of_2(d_state), BLOCK_R=max(next_power_of_2(dt_rank), 16),
        BLOCK_C=min(block_c, 128) if block_d >= 128 else block_c, PDL=with_pdl, num_warps=DT_WARPS,
        **pdl.options(with_pdl),
    )
    z_in = rows(z_in)
    ssu_block_d, block_n, ssu_warps = _update_config(batch, d_inner, d_state)
    _selective_state_update_kernel[(batch, cdiv(d_inner, ssu_block_d))](
        xc, dt, A, B, C, D, z_in, dt, ssm_state, state_indices, out,
        d_inner, d_state,
        xc.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0), z_in.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), out.stride(0),
        HAS_D=True, HAS_Z=True, HAS_DT_BIAS=False, DT_SOFTPLUS=False, BLOCK_D=ssu_block_d, BLOCK_N=block_n,
        PDL=with_pdl, num_warps=ssu_warps, **pdl.options(with_pdl),
    )


def mamba_step(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, conv_state, ssm_state,
               state_indices, inject=None, inject_weight=None, out=None):
    """mamba_step_ref's step on the kernels (its docstring has the arguments), in two or three launches."""
    return _mamba_step(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, conv_state,
                       ssm_state, state_indices, inject, inject_weight, out)


if not HAS_TRITON:  # pragma: no cover
    del mamba_step
