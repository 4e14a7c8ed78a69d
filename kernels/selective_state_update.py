"""One Mamba-1 decode step for a batch of slots, state updated in place in the pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_ref(x, dt, A, B, C, D, z, dt_bias, ssm_state, state_indices, dt_softplus=True):
    """x, dt, z: (batch, d_inner) (z may be None); A: (d_inner, d_state); B, C: (batch, d_state);
    D, dt_bias: (d_inner,) or None; ssm_state: (slots, d_inner, d_state) fp32 updated in place;
    state_indices: (batch,), -1 skips the row (output zero). Returns (batch, d_inner) in x.dtype.
    """
    out = torch.zeros_like(x)
    live = state_indices >= 0
    if not bool(live.any()):
        return out
    slots = state_indices[live].long()
    dt = dt[live].float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    xl = x[live].float()
    s = torch.exp(dt[..., None] * A) * ssm_state[slots].float() + (dt * xl)[..., None] * B[live].float()[:, None, :]
    ssm_state[slots] = s.to(ssm_state.dtype)
    y = (s @ C[live].float()[..., None]).squeeze(-1)
    if D is not None:
        y = y + D.float() * xl
    if z is not None:
        y = y * F.silu(z[live].float())
    out[live] = y.to(x.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (row, channel block) holding a (BLOCK_D, d_state) tile of the state.
# Memory-bound: the state is read and written once (8 bytes per element); everything else is O(d_inner).

from kernels import pdl  # noqa: E402
from kernels._triton import (HAS_TRITON, cdiv, check_indices, check_pool, next_power_of_2, rows, tl,  # noqa: E402
                             triton)
from kernels.pdl import wait_for_inputs  # noqa: E402


@triton.jit
def _selective_state_update_kernel(
    # pointers
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, ssm_state_ptr, state_indices_ptr, out_ptr,
    # sizes
    d_inner, d_state,
    # strides
    stride_x_row, stride_dt_row, stride_A_d, stride_B_row, stride_C_row, stride_z_row,
    stride_state_slot, stride_state_d, stride_out_row,
    # meta-parameters
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (D,)
    n = tl.arange(0, BLOCK_N)  # (N,)
    d_mask = d < d_inner
    # the weights (for a -1 row too: its output is zeroed and its state left alone below)
    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=d_mask[:, None] & (n < d_state)[None, :],
                other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    mask = d_mask[:, None] & (n < d_state)[None, :] & live
    state_ptrs = ssm_state_ptr + slot * stride_state_slot + d[:, None] * stride_state_d + n[None, :]
    s = tl.load(state_ptrs, mask=mask, other=0.0)  # (D, N) fp32, issued first: it is the big load
    x = tl.load(x_ptr + row * stride_x_row + d, mask=d_mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row * stride_dt_row + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    B = tl.load(B_ptr + row * stride_B_row + n, mask=n < d_state, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + row * stride_C_row + n, mask=n < d_state, other=0.0).to(tl.float32)
    s = tl.exp2(A * (dt * 1.4426950408889634)[:, None]) * s + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, s, mask=mask)
    y = tl.sum(s * C[None, :], axis=1)  # (D,)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z_row + d, mask=d_mask, other=0.0).to(tl.float32)
        y *= z / (1.0 + tl.exp(-z))
    y = tl.where(live, y, 0.0)
    tl.store(out_ptr + row * stride_out_row + d, y.to(out_ptr.dtype.element_ty), mask=d_mask)


def _update_config(batch: int, d_inner: int, d_state: int):
    """Hand-tuned (no autotune: the kernel writes state in place): small batches get narrow channel
    blocks so that enough programs are in flight to cover the chip."""
    block_n = next_power_of_2(d_state)
    if batch <= 8:
        block_d = 16
    elif batch <= 64:
        block_d = 32
    else:
        block_d = 64
    block_d = max(min(block_d, next_power_of_2(d_inner), max(4096 // block_n, 1)), 1)
    # H200 sweep (bench/RESULTS.md): 512-element tiles on 1 warp, 1024 on 2
    num_warps = 4 if block_d * block_n > 1024 else (2 if block_d * block_n > 512 else 1)
    return block_d, block_n, num_warps


def selective_state_update(x, dt, A, B, C, D, z, dt_bias, ssm_state, state_indices, dt_softplus=True):
    """x, dt, z: (batch, d_inner) (z may be None); A: (d_inner, d_state); B, C: (batch, d_state);
    D, dt_bias: (d_inner,) or None; ssm_state: (slots, d_inner, d_state) fp32 updated in place;
    state_indices: (batch,), -1 skips the row (output zero). Returns (batch, d_inner) in x.dtype.
    """
    return _selective_state_update(x, dt, A, B, C, D, z, dt_bias, ssm_state, state_indices, dt_softplus)


def _selective_state_update(x, dt, A, B, C, D, z, dt_bias, ssm_state, state_indices, dt_softplus=True,
                            block_d=None, num_warps=None):
    """selective_state_update with the launch configuration exposed (benchmark sweeps)."""
    if x.dim() != 2:
        raise ValueError(f"selective_state_update: x must be (batch, d_inner), got {tuple(x.shape)}")
    batch, d_inner = x.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"selective_state_update: A must be ({d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t, shape in (("dt", dt, (batch, d_inner)), ("B", B, (batch, d_state)), ("C", C, (batch, d_state)),
                           ("z", z, (batch, d_inner)), ("D", D, (d_inner,)), ("dt_bias", dt_bias, (d_inner,))):
        if t is not None and t.shape != shape:
            raise ValueError(f"selective_state_update: {name} must be {shape}, got {tuple(t.shape)}")
    check_pool("ssm_state", ssm_state, 3)
    if ssm_state.shape[1:] != (d_inner, d_state) or ssm_state.dtype != torch.float32:
        raise ValueError(f"selective_state_update: ssm_state must be fp32 (slots, {d_inner}, {d_state}), "
                         f"got {ssm_state.dtype} {tuple(ssm_state.shape)}")
    check_indices("state_indices", state_indices, batch, x.device)
    x, dt, B, C, z = (rows(t) for t in (x, dt, B, C, z))
    A = A.contiguous()
    D, dt_bias = (t.contiguous() if t is not None else None for t in (D, dt_bias))
    state_indices = state_indices.contiguous()
    out = torch.empty_like(x)  # (batch, d_inner); every row is written (zeros for -1 slots)
    if batch == 0:
        return out
    config = _update_config(batch, d_inner, d_state)
    block_d, block_n, num_warps = block_d or config[0], config[1], num_warps or config[2]
    with_pdl = pdl.use(x.device, batch)
    _selective_state_update_kernel[(batch, cdiv(d_inner, block_d))](
        x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, ssm_state, state_indices, out,
        d_inner, d_state,
        x.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0,
        ssm_state.stride(0), ssm_state.stride(1), out.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, PDL=with_pdl,
        num_warps=num_warps, **pdl.options(with_pdl),
    )
    return out


if not HAS_TRITON:  # pragma: no cover
    del selective_state_update
