"""The concept path's whole decode step in one launch (DESIGN.md §1): softmax routing, the concept mean and mass
update (concept_decay none or learned), the read-back through M, RMSNorm + GELU, and the IMF gates.

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
# Triton kernel: one program per ROWS rows. Each row's state update is kernels/concept_filter.py's (a (k, d_c)
# tile per slot); the rows' read-backs are gathered into one (BLOCK_M, d_c) tile so that the gate product runs
# on the tensor cores with its weights read once per program (kernels/concept_readout.py).

from kernels._jit import lowp_dot  # noqa: E402
from kernels._triton import HAS_TRITON, tl, triton  # noqa: E402
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
):
    first = tl.program_id(0).to(tl.int64) * ROWS
    m = tl.arange(0, BLOCK_M)  # (M,) tile rows; the first ROWS are this program's
    j = tl.arange(0, BLOCK_K)  # (K,)
    c = tl.arange(0, BLOCK_C)  # (C,)
    k_mask = j < k
    c_mask = c < d_c
    mix = tl.load(mix_ptr + j[:, None] * stride_mix_row + j[None, :], mask=k_mask[:, None] & k_mask[None, :],
                  other=0.0).to(tl.float32)  # (K, K)
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


def _step_rows(batch: int) -> int:
    """Rows per program (no autotune: the kernel writes state in place). One row each keeps the most programs in
    flight; the rows of a program update their states one after another, so more rows a program make a longer
    chain (the first GPU run, with four rows a program from batch 32, decoded k = 16 at batch 64-256 slower than
    before the fusion). `bench_model.py --sweep` times 1, 2, 4 and 8."""
    return 1


def _concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices, eps,
                  norm_eps, log_decay=None, out_output=None, rows=None, num_warps=None):
    """concept_step with the launch configuration exposed (benchmark sweeps)."""
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
    rows = rows or _step_rows(batch)
    block_c = readout_block_c(d_c)
    _concept_step_kernel[(triton.cdiv(batch, rows),)](
        logits, v, gate_h, mix, log_decay, concept_mean, concept_mass, state_indices, norm_weight, gate_weight,
        to_input, to_output,
        batch, k, d_c, float(eps), float(norm_eps),
        logits.stride(0), v.stride(0), gate_h.stride(0), mix.stride(0), concept_mean.stride(0),
        concept_mean.stride(1), concept_mass.stride(0), gate_weight.stride(0), to_input.stride(0),
        to_output.stride(0),
        HAS_DECAY=has_decay, ROWS=rows, BLOCK_M=max(16, triton.next_power_of_2(rows)),
        BLOCK_K=triton.next_power_of_2(k), BLOCK_C=block_c, BLOCK_O=min(block_c, 32), LOWP=lowp_dot(dtype),
        # sm_90 compile (ptxas -v) at k 16, d_c 192, bf16: no spills on 4 warps for one row, on 8 for four
        num_warps=num_warps or (4 if rows == 1 or block_c <= 64 else 8),
    )
    return to_input, to_output


def concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices, eps,
                 norm_eps, log_decay=None, out_output=None):
    """One step for a batch of slots.

    logits: (batch, k) W_a h + b_a; v: (batch, d_c) W_v h; gate_h: (batch, 2 d_c) W_g[:, :D] h + b_g;
    mix: (k, k) M; norm_weight: (d_c,); gate_weight: (2 d_c, d_c) W_g[:, D:];
    concept_mean (slots, k, d_c) fp32 and concept_mass (slots, k) fp64, updated in place; state_indices (batch,),
    -1 skips the row (its outputs are zero); log_decay: (k,) λ = log γ or None (γ = 1);
    out_output: optional (batch, d_c) destination of g_o ⊙ r.
    Returns (g_s ⊙ r, g_o ⊙ r), both (batch, d_c) in norm_weight.dtype.
    """
    return _concept_step(logits, v, gate_h, mix, norm_weight, gate_weight, concept_mean, concept_mass, state_indices,
                         eps, norm_eps, log_decay, out_output)


if not HAS_TRITON:  # pragma: no cover
    del concept_step
