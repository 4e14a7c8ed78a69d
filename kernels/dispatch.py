"""Which implementation runs: the Triton kernels or the PyTorch references.

INFOMAMBA_KERNELS=auto (default) uses Triton for CUDA tensors and PyTorch elsewhere; `triton` forces the
kernels (on the CPU only under TRITON_INTERPRET=1, for tests); `torch` forces the references.

INFOMAMBA_FUSED_STEP picks the decode step's path: `1` (default) the fused layer and concept step at every batch
(issue 10), with the fused Mamba step (kernels/mamba_step.py) up to mamba_step.FUSED_MAMBA_MAX_BATCH rows (32) and
main's one-op-a-kernel Mamba step above it, where the H200 timed it faster; `concept` the fused layer and concept
step with main's Mamba step at every batch; `0` main's decode path throughout (the layer's separate projections,
the concept filter's update, norm, GELU and gates as separate ops, conv update, x_proj, dt_proj, state update). The
other paths stay selectable so that one GPU run can time them beside the default (bench/bench_model.py).
"""
from __future__ import annotations

import importlib.util
import os

import torch

CHOICES = ("auto", "triton", "torch")
FUSED_STEP_CHOICES = ("1", "concept", "0")


def kernel_choice() -> str:
    choice = os.environ.get("INFOMAMBA_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"INFOMAMBA_KERNELS: expected one of {CHOICES}, got {choice!r}")
    return choice


def fused_step() -> str:
    choice = os.environ.get("INFOMAMBA_FUSED_STEP", "1").strip().lower() or "1"
    if choice not in FUSED_STEP_CHOICES:
        raise ValueError(f"INFOMAMBA_FUSED_STEP: expected one of {FUSED_STEP_CHOICES}, got {choice!r}")
    return choice


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return tensor.is_cuda and triton_available()
