"""Fused residual add + RMSNorm: the hand-off between layers."""
from __future__ import annotations

import torch


def add_rms_norm_ref(x, residual, weight, eps):
    """x: (tokens, d) the branch output; residual: (tokens, d) fp32 or None (then x starts the stream);
    weight: (d,). Returns (normed in weight.dtype, new residual = x + residual in fp32)."""
    res = x.float() if residual is None else residual.float() + x.float()
    normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(weight.dtype), res


# ---------------------------------------------------------------------------------------------------------
# Triton kernel: one program per token row (rows are short: d = d_model).

from kernels._triton import HAS_TRITON, next_power_of_2, tl, triton  # noqa: E402


@triton.jit
def _add_rms_norm_kernel(
    # pointers
    x_ptr, residual_ptr, weight_ptr, out_ptr, res_out_ptr,
    # sizes
    d, eps,
    # strides
    stride_x_row, stride_residual_row, stride_out_row, stride_res_out_row,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    res = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res += tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + row * stride_res_out_row + cols, res, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(res * res, axis=0) / d + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, (res * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x, residual, weight, eps):
    """x: (tokens, d) the branch output; residual: (tokens, d) fp32 or None (then x starts the stream);
    weight: (d,). Returns (normed in weight.dtype, new residual = x + residual in fp32)."""
    if x.dim() != 2:
        raise ValueError(f"add_rms_norm: x must be (tokens, d), got {tuple(x.shape)}")
    tokens, d = x.shape
    if weight.shape != (d,):
        raise ValueError(f"add_rms_norm: weight must be ({d},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    x = x.contiguous()
    weight = weight.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out = torch.empty((tokens, d), device=x.device, dtype=weight.dtype)  # (tokens, d)
    res_out = torch.empty((tokens, d), device=x.device, dtype=torch.float32)  # (tokens, d)
    if tokens == 0:
        return out, res_out
    block_d = next_power_of_2(d)
    _add_rms_norm_kernel[(tokens,)](
        x, residual if residual is not None else x, weight, out, res_out,
        d, float(eps),
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=block_d,
        num_warps=min(max(block_d // 256, 1), 8),
    )
    return out, res_out


if not HAS_TRITON:  # pragma: no cover
    del add_rms_norm
