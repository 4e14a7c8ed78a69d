"""Products of a few rows with a layer's weights, for decode steps (issue 10):

    linear(x, W, b)                          = x @ W^T + b
    add_rms_norm_linear(x, res, w, eps, W, b) = RMSNorm(x + res) * w @ W^T + b, and the new residual x + res

At a few rows such a product reads the whole weight matrix for a handful of multiply-adds a weight: its floor is the
weight's bytes over memory bandwidth. On the H200 cuBLAS took 4-6 µs a projection at batch 1 for 2.4-4.7 MB of
weights (0.5-1 µs of bandwidth), about a third of the 130M-class decode step, and the norm before in_proj was a
launch of its own. Here each program owns a block of output columns, streams its rows of W once, and does the norm
in its prologue (every program recomputes the statistics of the few input rows: a few KB from L2; the first column
block writes the new residual).

Past a few rows (`takes_kernel`) both fall back to cuBLAS (after the add_rms_norm kernel): there a product reads
each weight for many rows and the tensor-core GEMM wins. Configurations and limits come from
`bench/bench_small_linear.py`'s sweep on the H200 (no autotune: it would not run inside a CUDA-graph capture or
under the interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import add_rms_norm as _norm
from kernels.add_rms_norm import add_rms_norm_ref


def linear_ref(x, weight, bias=None):
    """x: (rows, K); weight: (N, K); bias: (N,) or None. Returns (rows, N) in x's dtype."""
    return F.linear(x, weight, bias)


def add_rms_norm_linear_ref(x, residual, norm_weight, eps, weight, bias=None):
    """x: (rows, K) the branch output; residual: (rows, K) fp32 or None (then x starts the stream); norm_weight:
    (K,); weight: (N, K); bias: (N,) or None. Returns (RMSNorm(x + residual) rounded to norm_weight's dtype, times
    W^T, plus b: (rows, N), and the new residual x + residual in fp32)."""
    normed, res = add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), res


# ---------------------------------------------------------------------------------------------------------
# Triton kernel over column blocks of W (and row blocks of x past BLOCK_B rows).

from kernels._jit import dot_rows, lowp_dot, stored  # noqa: E402
from kernels._triton import HAS_TRITON, INTERPRETED, cdiv, next_power_of_2, rows, tl, triton  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels.pdl import wait_for_inputs  # noqa: E402

# Up to this many rows a plain product runs here, else in cuBLAS; a product behind a norm up to NORM_LINEAR_MAX_BATCH
# (below). Read per call: the tests and the benchmarks set them.
SMALL_LINEAR_MAX_BATCH = 8
# Behind a norm (in_proj, the first product of a concept layer: N > K) cuBLAS caught up sooner: on the H200 the
# kernel won up to 2 rows at the 130M model's sizes (4.6 against 5.9 µs at 1 row, 5.4 against 6.4 at 2; 7.5 against
# 6.6 at 4) and up to 4 at the bundled model's (3.4 against 4.8 µs at 4 rows, 4.8 against 4.7 at 8).
NORM_LINEAR_MAX_BATCH = {"small": 4, "large": 2}
LARGE_WEIGHT = 1 << 20  # weights (N x K) from which a product counts as large here


@dataclass(frozen=True)
class LinearConfig:
    """block_b rows x block_n output columns a program, K in block_k steps. block_b < 16 multiplies by broadcast
    and sum on the CUDA cores, 16 and up on the tensor cores (tl.dot needs 16 rows)."""

    block_b: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def takes_kernel(batch: int, n: int, k: int, norm: bool) -> bool:
    """Whether a product of `batch` rows and N x K weights runs here rather than in cuBLAS."""
    if not 0 < batch <= SMALL_LINEAR_MAX_BATCH:
        return False
    return not norm or batch <= NORM_LINEAR_MAX_BATCH["large" if n * k >= LARGE_WEIGHT else "small"]


def default_config(batch: int, n: int, k: int) -> LinearConfig:
    """The configuration for a product of `batch` rows and N x K weights, from the H200 sweep
    (`bench/bench_small_linear.py`, bench/RESULTS.md): the whole of K in one block, so that each program's loads go out
    in one wave with no loop, and few output columns a program (2-8), so that the grid has hundreds of programs to
    keep memory busy. 130M sizes at 1 row: out_proj 2.7 µs against cuBLAS's 6.2, in_proj with its norm 4.6 against
    5.9 for the norm kernel and cuBLAS."""
    whole = next_power_of_2(k)
    if INTERPRETED:  # few, large programs: the interpreter pays per program and per op
        return LinearConfig(block_b=min(next_power_of_2(batch), 4), block_n=32, block_k=64, num_warps=1, num_stages=1)
    block_b = min(next_power_of_2(batch), 4)
    if whole >= 2048:  # out_proj-like (K = d_inner): two columns a program, 2 warps
        return LinearConfig(block_b, 2, whole, 2)
    return LinearConfig(block_b, 4 if block_b * 8 * whole > 16384 or batch == 1 else 8, whole, 4)


@triton.jit
def _small_linear_kernel(
    # pointers
    x_ptr, residual_ptr, norm_weight_ptr, weight_ptr, bias_ptr, out_ptr, res_out_ptr,
    # sizes
    batch, n, eps,
    # strides (inner strides are 1)
    stride_x_row, stride_residual_row, stride_weight_row, stride_out_row, stride_res_out_row,
    # meta-parameters
    K: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    row = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = row < batch
    col = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col < n
    # with PDL and all of K in one block (the decode configurations), W's loads go out before the wait for x
    PREFETCH: tl.constexpr = PDL and BLOCK_K >= K
    if PREFETCH:
        ks = tl.arange(0, BLOCK_K)
        w_first = tl.load(weight_ptr + col[:, None] * stride_weight_row + ks[None, :],
                          mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
    wait_for_inputs(PDL)
    if NORM:
        # pass 1: the rows' mean square (loads only: a store here would keep the compiler from issuing W's loads
        # before it, and with one K block both passes' loads go out together)
        sum_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (ks < K)[None, :]
            v = tl.load(x_ptr + row[:, None] * stride_x_row + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                v += tl.load(residual_ptr + row[:, None] * stride_residual_row + ks[None, :], mask=mask,
                             other=0.0).to(tl.float32)
            sum_sq += tl.sum(v * v, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
        writes_residual = row_mask & (pid_n == 0)  # the first column block writes the new residual
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):  # not unrolled: the software pipeliner keeps num_stages loads in flight
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        if PREFETCH:
            w = w_first
        else:
            w = tl.load(weight_ptr + col[:, None] * stride_weight_row + ks[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + row[:, None] * stride_x_row + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            if HAS_RESIDUAL:
                a += tl.load(residual_ptr + row[:, None] * stride_residual_row + ks[None, :], mask=mask,
                             other=0.0).to(tl.float32)
            tl.store(res_out_ptr + row[:, None] * stride_res_out_row + ks[None, :], a,
                     mask=writes_residual[:, None] & k_mask[None, :])
            scale = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            # the normed input rounded where the unfused path stores it (norm_weight's dtype, the model's)
            a = stored(a * rstd[:, None] * scale[None, :], norm_weight_ptr)
        if BLOCK_B >= 16:
            acc += dot_rows(a, tl.trans(w), weight_ptr, LOWP)
        else:
            acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + row[:, None] * stride_out_row + col[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _check(name, x, weight, bias):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: x (rows, K) and weight (N, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def _launch(x, residual, norm_weight, eps, weight, bias, out, res_out, config: LinearConfig | None):
    batch, k = x.shape
    n = weight.shape[0]
    config = config or default_config(batch, n, k)
    x, weight = rows(x), rows(weight)
    residual = rows(residual) if residual is not None else None
    grid = (cdiv(n, config.block_n), cdiv(batch, config.block_b))
    with_pdl = pdl.use(x.device, batch)
    _small_linear_kernel[grid](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, out, res_out if res_out is not None else out,
        batch, n, float(eps),
        x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        K=k, NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        LOWP=lowp_dot(weight.dtype),
        BLOCK_B=config.block_b, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=with_pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.options(with_pdl),
    )


def linear(x, weight, bias=None, config: LinearConfig | None = None):
    """x: (rows, K); weight: (N, K); bias: (N,) or None. Returns (rows, N) in x's dtype. Up to
    SMALL_LINEAR_MAX_BATCH rows in the Triton kernel (or always, with an explicit `config`), else cuBLAS."""
    _check("linear", x, weight, bias)
    if config is None and not takes_kernel(x.shape[0], weight.shape[0], weight.shape[1], norm=False):
        return F.linear(x, weight, bias)
    out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    _launch(x, None, None, 0.0, weight, bias, out, None, config)
    return out


def add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias=None, config: LinearConfig | None = None):
    """As add_rms_norm_linear_ref, in one launch where takes_kernel says so (or always, with an explicit `config`);
    elsewhere the add_rms_norm kernel and cuBLAS."""
    _check("add_rms_norm_linear", x, weight, bias)
    if norm_weight.shape != (x.shape[1],):
        raise ValueError(f"add_rms_norm_linear: norm_weight must be ({x.shape[1]},), got {tuple(norm_weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm_linear: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if config is None and not takes_kernel(x.shape[0], weight.shape[0], weight.shape[1], norm=True):
        normed, res = _norm.add_rms_norm(x, residual, norm_weight, eps)
        return F.linear(normed, weight, bias), res
    out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=norm_weight.dtype)
    res_out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    _launch(x, residual, norm_weight.contiguous(), eps, weight, bias, out, res_out, config)
    return out, res_out


if not HAS_TRITON:  # pragma: no cover
    del linear, add_rms_norm_linear
