"""Which implementation runs: the Triton kernels or the PyTorch references.

INFOMAMBA_KERNELS=auto (default) uses Triton for CUDA tensors and PyTorch elsewhere; `triton` forces the
kernels (on the CPU only under TRITON_INTERPRET=1, for tests); `torch` forces the references.
"""
from __future__ import annotations

import importlib.util
import os

import torch

CHOICES = ("auto", "triton", "torch")


def kernel_choice() -> str:
    choice = os.environ.get("INFOMAMBA_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"INFOMAMBA_KERNELS: expected one of {CHOICES}, got {choice!r}")
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
