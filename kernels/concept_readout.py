"""The concept term's read-back and the IMF gates (DESIGN.md §1), fused: r = GELU(RMSNorm(read)) and
[g_s, g_o] = sigmoid(W_g [h; r] + b_g), giving g_s ⊙ r (the SSM input's injection) and g_o ⊙ r (the output's).

The h half of the gate, W_g[:, :D] h + b_g, comes precomputed (`gate_h`) from the layer's one projection of h;
only the r half, a (2 d_c, d_c) product, is done here. Prefill runs this over the concept filter's read-back;
decode runs the same code inside kernels/concept_step.py's one-launch step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.add_rms_norm import add_rms_norm_ref


def concept_readout_ref(read, gate_h, norm_weight, gate_weight, norm_eps, out_output=None):
    """read: (tokens, d_c) fp32, the concept filter's a^T M mean; gate_h: (tokens, 2 d_c) W_g[:, :D] h + b_g;
    norm_weight: (d_c,); gate_weight: (2 d_c, d_c) W_g[:, D:], the gates' weights on r; out_output: optional
    (tokens, d_c) destination of g_o ⊙ r. Returns (g_s ⊙ r, g_o ⊙ r), both (tokens, d_c) in norm_weight.dtype.
    r is rounded to that dtype where the unfused path stores it (after the norm and after the GELU)."""
    dtype = norm_weight.dtype
    d_c = read.shape[1]
    normed, _ = add_rms_norm_ref(read, None, norm_weight, norm_eps)  # (tokens, d_c) in dtype
    r = F.gelu(normed.float()).to(dtype).float()
    gates = torch.sigmoid(gate_h.float() + r @ gate_weight.float().t())  # (tokens, 2 d_c)
    to_input = (gates[:, :d_c] * r).to(dtype)
    to_output = (gates[:, d_c:] * r).to(dtype)
    if out_output is None:
        return to_input, to_output
    out_output.copy_(to_output)
    return to_input, out_output


# ---------------------------------------------------------------------------------------------------------
# Triton kernel: one program per block of rows. The gate product runs on the tensor cores (rows x d_c by
# d_c x 2 d_c, in column blocks of the output); r is stashed in g_o ⊙ r's destination so that each column block
# can read its own r back (a register tile cannot be sliced by columns).

from kernels._jit import dot_rows, gelu, lowp_dot, sigmoid, stored  # noqa: E402
from kernels._triton import HAS_TRITON, cdiv, next_power_of_2, tl, triton  # noqa: E402


@triton.jit
def readout_gates(
    read, rows, row_mask, c, c_mask,
    norm_weight_ptr, gate_h_ptr, gate_weight_ptr, to_input_ptr, to_output_ptr,
    d_c, norm_eps,
    stride_gate_h_row, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
    BLOCK_O: tl.constexpr,
    LOWP: tl.constexpr,
):
    """read (M, BLOCK_C) fp32 for `rows` (M,) -> stores g_s ⊙ r and g_o ⊙ r for the rows in row_mask."""
    mask = row_mask[:, None] & c_mask[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(read * read, axis=1) / d_c + norm_eps)  # (M,)
    w = tl.load(norm_weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    normed = stored(read * rstd[:, None] * w[None, :], norm_weight_ptr)
    r = tl.where(mask, stored(gelu(normed), to_output_ptr), 0.0)  # (M, C)
    stash = to_output_ptr + rows[:, None] * stride_to_output_row
    tl.store(stash + c[None, :], r.to(to_output_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the stash is read back below by other threads of this program
    for o0 in range(0, d_c, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)  # (O,) output columns of each gate
        o_mask = o < d_c
        w_mask = o_mask[:, None] & c_mask[None, :]
        w_s = tl.load(gate_weight_ptr + o[:, None] * stride_gate_weight_row + c[None, :], mask=w_mask, other=0.0)
        w_o = tl.load(gate_weight_ptr + (d_c + o)[:, None] * stride_gate_weight_row + c[None, :], mask=w_mask,
                      other=0.0)  # (O, C)
        tile = row_mask[:, None] & o_mask[None, :]
        gate_h = gate_h_ptr + rows[:, None] * stride_gate_h_row + o[None, :]
        g_s = sigmoid(tl.load(gate_h, mask=tile, other=0.0).to(tl.float32)
                      + dot_rows(r, tl.trans(w_s), gate_weight_ptr, LOWP))  # (M, O)
        g_o = sigmoid(tl.load(gate_h + d_c, mask=tile, other=0.0).to(tl.float32)
                      + dot_rows(r, tl.trans(w_o), gate_weight_ptr, LOWP))
        r_o = tl.load(stash + o[None, :], mask=tile, other=0.0).to(tl.float32)  # (M, O) this block's r
        tl.debug_barrier()  # every thread has read this block of the stash before it is overwritten
        tl.store(to_input_ptr + rows[:, None] * stride_to_input_row + o[None, :],
                 stored(g_s * r_o, to_input_ptr).to(to_input_ptr.dtype.element_ty), mask=tile)
        tl.store(stash + o[None, :], stored(g_o * r_o, to_output_ptr).to(to_output_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _concept_readout_kernel(
    # pointers
    read_ptr, gate_h_ptr, norm_weight_ptr, gate_weight_ptr, to_input_ptr, to_output_ptr,
    # sizes
    tokens, d_c, norm_eps,
    # strides
    stride_read_row, stride_gate_h_row, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    LOWP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    row_mask = rows < tokens
    c = tl.arange(0, BLOCK_C)
    c_mask = c < d_c
    read = tl.load(read_ptr + rows[:, None] * stride_read_row + c[None, :], mask=row_mask[:, None] & c_mask[None, :],
                   other=0.0).to(tl.float32)
    readout_gates(read, rows, row_mask, c, c_mask, norm_weight_ptr, gate_h_ptr, gate_weight_ptr, to_input_ptr,
                  to_output_ptr, d_c, norm_eps,
                  stride_gate_h_row, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
                  BLOCK_O, LOWP)


def check_readout_args(name, tokens, d_c, gate_h, norm_weight, gate_weight, out_output):
    """Shapes shared by the prefill readout and the decode step; returns the outputs' dtype."""
    if gate_h.shape != (tokens, 2 * d_c):
        raise ValueError(f"{name}: gate_h must be ({tokens}, {2 * d_c}), got {tuple(gate_h.shape)}")
    if norm_weight.shape != (d_c,):
        raise ValueError(f"{name}: norm_weight must be ({d_c},), got {tuple(norm_weight.shape)}")
    if gate_weight.shape != (2 * d_c, d_c) or gate_weight.stride(-1) != 1:
        raise ValueError(f"{name}: gate_weight must be ({2 * d_c}, {d_c}) with unit column stride, "
                         f"got {tuple(gate_weight.shape)}")
    for what, t in (("gate_h", gate_h), ("out_output", out_output)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: {what} must have unit column stride")
    if out_output is not None and (out_output.shape != (tokens, d_c) or out_output.dtype != norm_weight.dtype):
        raise ValueError(f"{name}: out_output must be {norm_weight.dtype} ({tokens}, {d_c}), "
                         f"got {out_output.dtype} {tuple(out_output.shape)}")
    return norm_weight.dtype


def readout_block_c(d_c: int) -> int:
    """Every column of r in one tile (the norm needs the whole row); tl.dot needs 16 in every dimension."""
    return max(next_power_of_2(d_c), 16)


def concept_readout(read, gate_h, norm_weight, gate_weight, norm_eps, out_output=None):
    """read: (tokens, d_c) fp32, the concept filter's a^T M mean; gate_h: (tokens, 2 d_c) W_g[:, :D] h + b_g;
    norm_weight: (d_c,); gate_weight: (2 d_c, d_c) W_g[:, D:], the gates' weights on r; out_output: optional
    (tokens, d_c) destination of g_o ⊙ r. Returns (g_s ⊙ r, g_o ⊙ r), both (tokens, d_c) in norm_weight.dtype.
    r is rounded to that dtype where the unfused path stores it (after the norm and after the GELU)."""
    if read.dim() != 2:
        raise ValueError(f"concept_readout: read must be (tokens, d_c), got {tuple(read.shape)}")
    tokens, d_c = read.shape
    dtype = check_readout_args("concept_readout", tokens, d_c, gate_h, norm_weight, gate_weight, out_output)
    read = read.contiguous()
    to_input = torch.empty((tokens, d_c), device=read.device, dtype=dtype)  # (tokens, d_c)
    to_output = out_output if out_output is not None else torch.empty_like(to_input)
    if tokens == 0:
        return to_input, to_output
    block_c = readout_block_c(d_c)
    # sm_90 compile (ptxas -v) at d_c 192 in bf16: 64 rows with 16-column gate blocks on 8 warps fit the registers
    # (32 columns spill); 64 rows read the gate weights half as often as 32
    block_m = 64
    _concept_readout_kernel[(cdiv(tokens, block_m),)](
        read, gate_h, norm_weight, gate_weight, to_input, to_output,
        tokens, d_c, float(norm_eps),
        read.stride(0), gate_h.stride(0), gate_weight.stride(0), to_input.stride(0), to_output.stride(0),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_O=min(block_c, 16), LOWP=lowp_dot(dtype),
        num_warps=4 if block_c <= 64 else 8,
    )
    return to_input, to_output


if not HAS_TRITON:  # pragma: no cover
    del concept_readout
