"""Compile the fused kernels for a GPU target without a GPU, and report registers and spills (ptxas -v).

    python bench/compile_kernels.py [--arch 90] [--fp32]

The CPU interpreter runs a kernel's Python, not its compiled form: a global that is not a constexpr, a layout the
compiler cannot build or a tile that spills passes there and fails or crawls on the GPU. This compiles each kernel
at the 130M config's sizes (d_inner 1536, d_state 16, k 16, d_c 192, bf16; --fp32 adds the fp32 variants) with the
launch configurations the launchers pick, through Triton's own ptxas, and prints one line per variant.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import (causal_conv1d, concept_filter, concept_readout, concept_step, mamba_step,  # noqa: E402
                     selective_state_update, small_linear)

FLOAT_ARGS = ("eps", "norm_eps")


def pointer_types(act: str) -> dict:
    """Each pointer argument's element type, by name; activations and weights in `act`."""
    f32, f64, i32 = "*fp32", "*fp64", "*i32"
    types = {name: f32 for name in ("mix_ptr", "log_decay_ptr", "concept_mean_ptr", "read_ptr", "chunk_sum_ptr",
                                    "entry_mean_ptr", "dbc_part_ptr", "dt_bias_ptr", "A_ptr", "D_ptr",
                                    "ssm_state_ptr")}
    types.update({name: f64 for name in ("concept_mass_ptr", "chunk_mass_ptr", "entry_mass_ptr")})
    types.update({name: i32 for name in ("state_indices_ptr", "cu_seqlens_ptr", "chunk_seq_ptr", "chunk_pos_ptr",
                                         "chunk_cu_ptr")})
    return {"default": act, **types}


def compile_one(kernel, ptrs, constexprs, arch, num_warps, out_ptr=None):
    if "PDL" in inspect.signature(kernel.fn).parameters:  # the variant the GPU runs (kernels/pdl.py)
        constexprs = {"PDL": arch >= 90, **constexprs}
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = (out_ptr if name == "out_ptr" and out_ptr else None) or ptrs.get(name, ptrs["default"])
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    suffix = "a" if arch >= 90 else ""
    report = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    shown = {k: v for k, v in constexprs.items()
             if not k.startswith("BLOCK_") or k in ("BLOCK_D", "BLOCK_NC", "BLOCK_M", "BLOCK_O", "BLOCK_B", "BLOCK_N",
                                                   "BLOCK_K")
             and not k.startswith(("HAS_CONV", "D_CONV", "DT_"))}
    print(f"{kernel.fn.__name__} {shown} warps {num_warps}: {regs.group(1) if regs else '?'} registers, "
          f"{spills.group(1) if spills else '?'} bytes spilled", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (H100/H200: 90)")
    parser.add_argument("--fp32", action="store_true", help="also the fp32 variants (IEEE dots)")
    args = parser.parse_args()
    for lowp, act in ((True, "*bf16"),) + (((False, "*fp32"),) if args.fp32 else ()):
        ptrs = pointer_types(act)
        for decay, rows in itertools.product((False, True), (1, 4)):
            compile_one(concept_step._concept_step_kernel, ptrs, dict(
                HAS_DECAY=decay, ROWS=rows, BLOCK_M=16, BLOCK_K=16, BLOCK_C=256, BLOCK_O=32, LOWP=lowp), args.arch,
                4 if rows == 1 else 8)
        for decay in (False, True):
            compile_one(concept_step._concept_step_update_kernel, ptrs, dict(
                HAS_DECAY=decay, BLOCK_K=16, BLOCK_C=256), args.arch, 8)
        for block_m, block_o in ((1, 16), (1, 32), (2, 16), (4, 16), (16, 16), (16, 32)):  # bench_model --sweep's
            compile_one(concept_step._concept_step_gates_kernel, {**ptrs, "read_ptr": "*fp32"}, dict(
                BLOCK_M=block_m, BLOCK_C=256, BLOCK_O=block_o, LOWP=lowp), args.arch, 4)
        compile_one(concept_readout._concept_readout_kernel, ptrs, dict(
            BLOCK_M=64, BLOCK_C=256, BLOCK_O=16, LOWP=lowp), args.arch, 8)
        for inject, num_sub, block_c in itertools.product((False, True), (1, 2, 4), (64, 128, 256)):
            compile_one(mamba_step._mamba_step_conv_kernel, ptrs, dict(
                HAS_INJECT=inject, HAS_CONV_BIAS=True, D_CONV=4, LOWP=lowp, NUM_SUB=num_sub, BLOCK_B=16, BLOCK_E=64,
                BLOCK_W=4, BLOCK_P=128, BLOCK_C=block_c), args.arch, 8)
        for inject, (parts, block_d) in itertools.product((False, True), ((24, 16), (12, 32), (6, 32))):
            compile_one(mamba_step._mamba_step_ssm_kernel, ptrs, dict(
                HAS_INJECT=inject, LOWP=lowp, NUM_PARTS=parts, BLOCK_B=16, BLOCK_D=block_d, BLOCK_N=16, BLOCK_R=64,
                BLOCK_C=64), args.arch, 8)
        # the three-launch (large-batch) path: launch 1 as above, then the dt launch and the state update
        f32_out = {**ptrs, **{name: "*fp32" for name in ("dt_ptr", "z_ptr", "B_ptr", "C_ptr")}}
        for inject, (parts, block_d), block_c in itertools.product(
                (False, True), ((24, 64), (24, 128), (12, 64), (12, 128)), (64, 128, 256)):
            if block_d >= 128 and block_c > 128:
                continue  # the launcher's cap (mamba_step.INJECT_BLOCK_C): it spills
            compile_one(mamba_step._mamba_step_dt_kernel, f32_out, dict(
                HAS_INJECT=inject, LOWP=lowp, NUM_PARTS=parts, PART_UNROLL=mamba_step.DT_PART_UNROLL, BLOCK_B=16,
                BLOCK_D=block_d, BLOCK_N=16, BLOCK_R=64, BLOCK_C=block_c), args.arch, mamba_step.DT_WARPS)
        for z in ("*fp32", act):
            compile_one(selective_state_update._selective_state_update_kernel, {
                **f32_out, "x_ptr": "*fp32", "z_ptr": z}, dict(
                HAS_D=True, HAS_Z=True, HAS_DT_BIAS=False, DT_SOFTPLUS=False, BLOCK_D=64, BLOCK_N=16), args.arch, 2)
        # the few-row products (bench_small_linear.py's sweep): in_proj behind its norm and out_proj, 130M sizes
        for (norm, k), (block_b, block_n, block_k, warps) in itertools.product(
                ((True, 768), (False, 1536)), ((1, 16, 256, 4), (2, 8, 128, 2), (4, 16, 256, 4), (16, 32, 128, 4),
                                            (1, 4, 1024, 4), (1, 2, 2048, 2))):  # the last two: decode's
            compile_one(small_linear._small_linear_kernel, {**ptrs, "residual_ptr": "*fp32", "res_out_ptr": "*fp32"},
                        dict(K=k, NORM=norm, HAS_RESIDUAL=norm, HAS_BIAS=False, LOWP=lowp, BLOCK_B=block_b,
                             BLOCK_N=block_n, BLOCK_K=block_k), args.arch, warps)
        if not lowp:
            continue
        # the chunk kernels compute in fp32 whatever the activations' dtype
        chunk = {**ptrs, "out_ptr": "*fp32"}
        for decay, single in itertools.product((False, True), (False, True)):
            for kernel in (concept_filter._concept_chunk_sums_kernel, concept_filter._concept_chunk_output_kernel):
                compile_one(kernel, chunk, dict(CHUNK=64, BLOCK_K=16, BLOCK_DC=64, HAS_DECAY=decay,
                                                SINGLE_CHUNK=single, IS_LOGITS=True), args.arch, 4)
        for decay, block_nc in itertools.product((False, True), (16, 32, 64)):
            compile_one(concept_filter._concept_chunk_prefix_kernel, chunk, dict(
                CHUNK=64, BLOCK_NC=block_nc, BLOCK_DC=32, HAS_DECAY=decay), args.arch, 8 if block_nc > 32 else 4)
        compile_one(causal_conv1d._causal_conv1d_fwd_kernel, ptrs, dict(
            D_CONV=4, HAS_BIAS=True, SILU=True, BLOCK_L=64, BLOCK_D=64, BLOCK_W=4), args.arch, 4)


if __name__ == "__main__":
    main()
