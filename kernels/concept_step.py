"""The concept path's whole decode step in one or two launches (DESIGN.md §1): softmax routing, the concept mean and
mass update (concept_decay none or learned), the read-back through M, RMSNorm + GELU, and the IMF gates. Batches up
to SPLIT_MAX_BATCH (256: all the server captures) take two launches so that one row's gate product is spread over
many programs (see below).

The layer's one projection of h supplies the routing logits (W_a h + b_a), the values (W_v h) and the h half of
the gates (W_g[:, :D] h + b_g); this op does everything between that projection and the in_proj/out_proj
products, which were each a launch of their own (about ten per layer before).
"""
from __future__ import annotations

import torch

from kernels.concept_filter import concept_filter_update_ref
from kernels.concept_readout import concept_readout_ref


def concept_step_ref(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices,
                     eps, norm_eps, log_decay=None, out_output=None):
    """One step for a batch of slots.

    logits: (batch, k) W_a h + b_a; v: (batch, d_c) W_v h; gate_h: (batch, 2 d_c) W_g[:, :D] h + b_g;
    mix: (k, k) M; norm_weight: (d_c,); gate_weight: (2 d_c, d_c) W_g[:, D:];
    concept_mean (slots, k, d_c) fp32 and concept_mass (slots, k) fp64, updated in place; state_indices (batch,),
    -1 skips the row (its outputs are zero); log_decay: (k,) λ = log γ or None (γ = 1);
    out_output: optional (batch, d_c) destination of g_o ⊙ r.
    Returns (g_s ⊙ r, g_o ⊙ r), both (batch, d_c) in norm_weight.dtype.
    """
    a = torch.softmax(logits.float(), dim=-1)  # (batch, k)
    read = concept_filter_update_ref(a, v, mix, concept_mean, concept_mass, state_indices, eps, log_decay)
    return concept_readout_ref(read, gate_h, norm_weight, gate_weight, norm_eps, out_output)


# ---------------------------------------------------------------------------------------------------------
# Two ways to run the step (the wrapper picks one by batch size, `_step_path`):
#   one launch, one program per ROWS rows (`_concept_step_kernel`): the state update, read-back and the whole gate
#     product in one program, so at batch 1 one program on one SM does all of it serially (~17 µs on the H200);
#   two launches (`_concept_step_update_kernel`, then `_concept_step_gates_kernel`): the first, one program per
#     row, updates the state and leaves the read-back a^T M mean (batch, d_c) fp32 in a scratch buffer; the second,
#     a grid of (row blocks, column blocks of the gates), recomputes the cheap RMSNorm + GELU of its rows from the
#     scratch and computes only its columns of the gate product, so one row's work is spread over d_c / BLOCK_O
#     programs (12 at d_c 192).
# Why two launches and not one grid that also updates the state: every gate column needs the whole read-back (the
# norm is over all of d_c), the read-back needs the whole updated mean, so every program of a row must read the
# whole OLD state, and any program that writes it in place would race with the others' reads (the launch orders
# nothing between programs). The update's own launch owns the slot (one program per row, mean and mass written
# once), and the gate programs never touch the state. The scratch is 4 d_c bytes a row.
# In both, each row's state update is kernels/concept_filter.py's (a (k, d_c) tile per slot). In the one-launch
# path the rows' read-backs are gathered into one (BLOCK_M, d_c) tile so that the gate product runs on the tensor
# cores with its weights read once per program (kernels/concept_readout.py).

from kernels._jit import dot_rows, gelu, lowp_dot, sigmoid, stored  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels._triton import HAS_TRITON, cdiv, next_power_of_2, tl, triton  # noqa: E402
from kernels.pdl import wait_for_inputs  # noqa: E402
from kernels.concept_filter import _check_concept_args, _decay_args, update_slot  # noqa: E402
from kernels.concept_readout import check_readout_args, readout_block_c, readout_gates  # noqa: E402


@triton.jit
def _concept_step_kernel(
    # pointers
    logits_ptr, v_ptr, gate_h_ptr, mix_ptr, log_decay_ptr, concept_mean_ptr, concept_mass_ptr, state_indices_ptr,
    norm_weight_ptr, gate_weight_ptr, to_input_ptr, to_output_ptr,
    # sizes
    batch, k, d_c, eps, norm_eps,
    # strides
    stride_logits_row, stride_v_row, stride_gate_h_row, stride_mix_row, stride_mean_slot, stride_mean_k,
    stride_mass_slot, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
    # meta-parameters
    HAS_DECAY: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    LOWP: tl.constexpr,
    PDL: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * ROWS
    m = tl.arange(0, BLOCK_M)  # (M,) tile rows; the first ROWS are this program's
    j = tl.arange(0, BLOCK_K)  # (K,)
    c = tl.arange(0, BLOCK_C)  # (C,)
    k_mask = j < k
    c_mask = c < d_c
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    wait_for_inputs(PDL)
    read = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(ROWS):
        row = first + i
        in_batch = row < batch
        slot = tl.load(state_indices_ptr + row, mask=in_batch, other=-1).to(tl.int64)
        live = slot >= 0
        logits = tl.load(logits_ptr + row * stride_logits_row + j, mask=k_mask & in_batch, other=0.0)
        logits = tl.where(k_mask, logits.to(tl.float32), float("-inf"))
        a = tl.exp(logits - tl.max(logits, axis=0))
        a = a / tl.sum(a, axis=0)  # (K,) softmax; 0 past k
        v = tl.load(v_ptr + row * stride_v_row + c, mask=c_mask & live, other=0.0).to(tl.float32)
        read_row = update_slot(a, v, mix, j, c, slot, live, log_decay_ptr, concept_mean_ptr, concept_mass_ptr,
                               k, d_c, eps, stride_mean_slot, stride_mean_k, stride_mass_slot, HAS_DECAY)
        read = tl.where((m == i)[:, None], read_row[None, :], read)
    rows = first + m
    readout_gates(read, rows, (m < ROWS) & (rows < batch), c, c_mask, norm_weight_ptr, gate_h_ptr, gate_weight_ptr,
                  to_input_ptr, to_output_ptr, d_c, norm_eps,
                  stride_gate_h_row, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
                  BLOCK_O, LOWP)


@triton.jit
def _concept_step_update_kernel(
    # pointers
    logits_ptr, v_ptr, mix_ptr, log_decay_ptr, concept_mean_ptr, concept_mass_ptr, state_indices_ptr, read_ptr,
    # sizes
    k, d_c, eps,
    # strides
    stride_logits_row, stride_v_row, stride_mix_row, stride_mean_slot, stride_mean_k, stride_mass_slot,
    stride_read_row,
    # meta-parameters
    HAS_DECAY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    """Launch 1 of the two-launch step: softmax routing, the slot's mean and mass updated in place, the read-back
    a^T M mean stored (zero for -1 rows). One program per row: the only program that touches the slot."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)  # (K,)
    c = tl.arange(0, BLOCK_C)  # (C,)
    k_mask = j < k
    c_mask = c < d_c
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
    wait_for_inputs(PDL)
    slot = tl.load(state_indices_ptr + row).to(tl.int64)
    live = slot >= 0
    logits = tl.load(logits_ptr + row * stride_logits_row + j, mask=k_mask, other=0.0)
    logits = tl.where(k_mask, logits.to(tl.float32), float("-inf"))
    a = tl.exp(logits - tl.max(logits, axis=0))
    a = a / tl.sum(a, axis=0)  # (K,) softmax; 0 past k
    v = tl.load(v_ptr + row * stride_v_row + c, mask=c_mask & live, other=0.0).to(tl.float32)
    read = update_slot(a, v, mix, j, c, slot, live, log_decay_ptr, concept_mean_ptr, concept_mass_ptr,
                       k, d_c, eps, stride_mean_slot, stride_mean_k, stride_mass_slot, HAS_DECAY)
    tl.store(read_ptr + row * stride_read_row + c, read, mask=c_mask)


@triton.jit
def _concept_step_gates_kernel(
    # pointers
    read_ptr, gate_h_ptr, norm_weight_ptr, gate_weight_ptr, to_input_ptr, to_output_ptr,
    # sizes
    batch, d_c, norm_eps,
    # strides
    stride_read_row, stride_gate_h_row, stride_gate_weight_row, stride_to_input_row, stride_to_output_row,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # rows per program: 1 (or up to 8) as a broadcast product, >= 16 on the tensor cores
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,  # output columns of each gate per program
    LOWP: tl.constexpr,
    PDL: tl.constexpr,
):
    """Launch 2 of the two-launch step: r = GELU(RMSNorm(read)) for BLOCK_M rows (every program of the rows
    recomputes it: d_c numbers a row), then columns o of both gates: g_s ⊙ r and g_o ⊙ r at o. Reads no state.
    The rounding follows concept_readout.readout_gates step for step, so both paths give the same r."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (O,)
    c = tl.arange(0, BLOCK_C)  # (C,)
    row_mask = rows < batch
    c_mask = c < d_c
    o_mask = o < d_c
    w_mask = o_mask[:, None] & c_mask[None, :]
    # the gate weights first: the largest load, and independent of everything else
    w_s = tl.load(gate_weight_ptr + o[:, None] * stride_gate_weight_row + c[None, :], mask=w_mask, other=0.0)
    w_o = tl.load(gate_weight_ptr + (d_c + o)[:, None] * stride_gate_weight_row + c[None, :], mask=w_mask,
                  other=0.0)  # (O, C)
    w = tl.load(norm_weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    w_o_norm = tl.load(norm_weight_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    mask = row_mask[:, None] & c_mask[None, :]
    tile = row_mask[:, None] & o_mask[None, :]
    read = tl.load(read_ptr + rows[:, None] * stride_read_row + c[None, :], mask=mask, other=0.0)  # (M, C) fp32
    read_o = tl.load(read_ptr + rows[:, None] * stride_read_row + o[None, :], mask=tile, other=0.0)  # (M, O)
    gate_h = gate_h_ptr + rows[:, None] * stride_gate_h_row + o[None, :]
    h_s = tl.load(gate_h, mask=tile, other=0.0).to(tl.float32)
    h_o = tl.load(gate_h + d_c, mask=tile, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(read * read, axis=1) / d_c + norm_eps)  # (M,)
    r = tl.where(mask, stored(gelu(stored(read * rstd[:, None] * w[None, :], norm_weight_ptr)), to_output_ptr), 0.0)
    # r at this program's columns: the same elementwise operations on the same numbers, so the same values as r's
    # columns o (a register tile cannot be sliced by columns)
    r_o = tl.where(tile, stored(gelu(stored(read_o * rstd[:, None] * w_o_norm[None, :], norm_weight_ptr)),
                                to_output_ptr), 0.0)  # (M, O)
    if BLOCK_M >= 16:
        p_s = dot_rows(r, tl.trans(w_s), gate_weight_ptr, LOWP)  # (M, O)
        p_o = dot_rows(r, tl.trans(w_o), gate_weight_ptr, LOWP)
    else:  # a few rows: products of 16-bit values are exact in fp32, only the order of the sum differs
        p_s = tl.sum(r[:, None, :] * w_s.to(tl.float32)[None, :, :], axis=2)
        p_o = tl.sum(r[:, None, :] * w_o.to(tl.float32)[None, :, :], axis=2)
    g_s = sigmoid(h_s + p_s)
    g_o = sigmoid(h_o + p_o)
    tl.store(to_input_ptr + rows[:, None] * stride_to_input_row + o[None, :],
             stored(g_s * r_o, to_input_ptr).to(to_input_ptr.dtype.element_ty), mask=tile)
    tl.store(to_output_ptr + rows[:, None] * stride_to_output_row + o[None, :],
             stored(g_o * r_o, to_output_ptr).to(to_output_ptr.dtype.element_ty), mask=tile)


def _step_rows(batch: int) -> int:
    """Rows per program of the one-launch path (no autotune: the kernel writes state in place). One row each keeps
    the most programs in flight; the rows of a program update their states one after another, so more rows a
    program make a longer chain (the first GPU run, with four rows a program from batch 32, decoded k = 16 at batch
    64-256 slower than before the fusion). `bench_model.py --sweep` times 1, 2, 4 and 8."""
    return 1


# Up to this batch the two-launch path (its gate product spread over column blocks); above it the one-launch path.
# From issue 10's H200 sweep (bench/RESULTS.md, "run 4": branch wt-fused at 4b1cb83, bench_model.py --sweep, k = 16,
# 130M config, bf16, CUDA graphs): the two-launch path was the faster at every batch timed, 1, 64 and 256 (ms a step
# at batch 256: 2.094 at (16, 32) against 2.215-2.248 for the one-launch path at one row a program). 256 is the
# largest batch timed and the largest the server captures; above it nothing was timed.
SPLIT_MAX_BATCH = 256


def _step_path(batch: int, d_c: int):
    """None: the one-launch path; else (rows per program, output columns per program) of the gates launch. The
    same sweep (run 4) timed (1, 16), (1, 32), (2, 16), (4, 16), (16, 16) and (16, 32), and (16, 32) was the fastest
    at batch 1 (1.095 ms), 64 (1.547) and 256 (2.094): 16 rows a program on the tensor cores even at batch 1 (15 of
    them padding). At batch 1 the margin is inside the noise (one configuration timed twice there read 1.108 and
    1.120 ms); at 64 and 256 it is 0.09 and 0.03 ms over (16, 16)."""
    if batch > SPLIT_MAX_BATCH:
        return None
    return 16, min(readout_block_c(d_c), 32)


def _concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices, eps,
                  norm_eps, log_decay=None, out_output=None, rows=None, num_warps=None, split=None):
    """concept_step with the launch configuration exposed (benchmark sweeps, tests): `rows` forces the one-launch
    path with that many rows a program; `split` = (rows, columns) a program forces the two-launch path."""
    for name, t in (("logits", logits), ("v", v)):
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"concept_step: {name} must be 2-D with unit column stride, got {tuple(t.shape)}")
    batch = logits.shape[0]
    if v.shape[0] != batch:
        raise ValueError(f"concept_step: v has {v.shape[0]} rows, logits has {batch}")
    k, d_c = _check_concept_args(logits, v, mix, concept_mean, concept_mass, state_indices, batch, log_decay)
    dtype = check_readout_args("concept_step", batch, d_c, gate_h, norm_weight, gate_weight, out_output)
    mix, state_indices = mix.contiguous(), state_indices.contiguous()
    log_decay, has_decay = _decay_args(log_decay, mix)
    to_input = torch.empty((batch, d_c), device=logits.device, dtype=dtype)  # (batch, d_c)
    to_output = out_output if out_output is not None else torch.empty_like(to_input)
    if batch == 0:
        return to_input, to_output
    block_c = readout_block_c(d_c)
    with_pdl = pdl.use(logits.device, batch)
    if split is None and rows is None:
        split = _step_path(batch, d_c)
    if split is not None:
        block_m, block_o = split
        read = torch.empty((batch, d_c), device=logits.device, dtype=torch.float32)  # (batch, d_c) a^T M mean
        # sm_90 compile (ptxas -v) at k 16, d_c 192, bf16: see bench/compile_kernels.py
        _concept_step_update_kernel[(batch,)](
            logits, v, mix, log_decay, concept_mean, concept_mass, state_indices, read,
            k, d_c, float(eps),
            logits.stride(0), v.stride(0), mix.stride(0), concept_mean.stride(0), concept_mean.stride(1),
            concept_mass.stride(0), read.stride(0),
            HAS_DECAY=has_decay, BLOCK_K=next_power_of_2(k), BLOCK_C=block_c, PDL=with_pdl, num_warps=8,
            **pdl.options(with_pdl),
        )
        _concept_step_gates_kernel[(cdiv(batch, block_m), cdiv(d_c, block_o))](
            read, gate_h, norm_weight, gate_weight, to_input, to_output,
            batch, d_c, float(norm_eps),
            read.stride(0), gate_h.stride(0), gate_weight.stride(0), to_input.stride(0), to_output.stride(0),
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_O=block_o, LOWP=lowp_dot(dtype), PDL=with_pdl,
            num_warps=num_warps or 4, **pdl.options(with_pdl),
        )
        return to_input, to_output
    rows = rows or _step_rows(batch)
    _concept_step_kernel[(cdiv(batch, rows),)](
        logits, v, gate_h, mix, log_decay, concept_mean, concept_mass, state_indices, norm_weight, gate_weight,
        to_input, to_output,
        batch, k, d_c, float(eps), float(norm_eps),
        logits.stride(0), v.stride(0), gate_h.stride(0), mix.stride(0), concept_mean.stride(0),
        concept_mean.stride(1), concept_mass.stride(0), gate_weight.stride(0), to_input.stride(0),
        to_output.stride(0),
        HAS_DECAY=has_decay, ROWS=rows, BLOCK_M=max(16, next_power_of_2(rows)),
        BLOCK_K=next_power_of_2(k), BLOCK_C=block_c, BLOCK_O=min(block_c, 32), LOWP=lowp_dot(dtype), PDL=with_pdl,
        # sm_90 compile (ptxas -v) at k 16, d_c 192, bf16: no spills on 4 warps for one row, on 8 for four
        num_warps=num_warps or (4 if rows == 1 or block_c <= 64 else 8), **pdl.options(with_pdl),
    )
    return to_input, to_output


def concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices, eps,
                 norm_eps, log_decay=None, out_output=None):
    """concept_step_ref's step on the kernels (its docstring has the arguments), in one or two launches."""
    return _concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices,
                         eps, norm_eps, log_decay, out_output)


if not HAS_TRITON:  # pragma: no cover
    del concept_step
