"""Small @triton.jit helpers shared by the fused kernels (activations, rounding to a storage dtype, row dots)."""
from __future__ import annotations

import torch

from kernels._triton import INTERPRETED, tl, triton

@triton.jit
def softplus(x):
    # log(1 + e^x) overflows in fp32 past x = 88; past 20 it equals x to fp32 precision
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def gelu(x):
    """The exact (erf) GELU, as torch.nn.functional.gelu's default."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def stored(x, like_ptr):
    """x (fp32) as it reads back after a store through `like_ptr`'s dtype: the fused kernels round where the
    unfused path writes an activation to memory, so both paths see the same values."""
    if like_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates (NaN and inf aside)
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def dot_rows(a, b, like_ptr, LOWP: tl.constexpr):
    """a (M, K) @ b (K, N) accumulated in fp32. LOWP: both hold values of `like_ptr`'s 16-bit dtype exactly (they were
    read from it or rounded to it), so the tensor cores multiply them in that dtype without error; else IEEE
    fp32 (tf32 would round fp32 inputs). M, N, K >= 16."""
    if LOWP:
        dtype = like_ptr.dtype.element_ty
        return tl.dot(a.to(dtype), b.to(dtype))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def dot_split(a, b, like_ptr, LOWP: tl.constexpr):
    """a (M, K) fp32 @ b (K, N), b holding values of `like_ptr`'s dtype, to about fp32 accuracy: with LOWP, a is
    split into a 16-bit head and the 16-bit rounding of the rest, two exact tensor-core products (a rounded to 16
    bits would put a rounding of its own into the result, which a product of unrounded inputs does not have)."""
    if LOWP:
        dtype = like_ptr.dtype.element_ty
        head = a.to(dtype)
        tail = (a - head.to(tl.float32)).to(dtype)
        return tl.dot(head, b.to(dtype)) + tl.dot(tail, b.to(dtype))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


def lowp_dot(dtype: torch.dtype) -> bool:
    """Whether dot_rows may multiply in `dtype`: 16-bit, and on a GPU (the interpreter gets bf16 arithmetic wrong).
    INTERPRETED, read once at import as the kernels were decorated: this runs in every step's launchers."""
    return dtype in (torch.float16, torch.bfloat16) and not INTERPRETED
