"""Programmatic dependent launch (Hopper and later) for the decode step's kernels (issue 10).

A decode step at a few rows is a chain of small dependent kernels: each reads its own weights and the previous
kernel's output, and most of its time is the launch and the weights' first loads, not the work. Launched with PDL, a
kernel may start while the kernel before it in the stream is still running: it loads its weights, then waits
(`griddepcontrol.wait`) until the previous kernel has finished and its writes are visible, and only then reads
activations and state and writes anything. It then lets the next kernel launch. On an H200, a chain of 120
dependent 1024 x 1024 bf16 products under a CUDA graph took 2.38 µs a product launched plainly, 2.21 with PDL and
the wait first, 1.59 with the weights loaded before the wait (`bench/bench_pdl.py`, bench/RESULTS.md).

The rules a kernel that takes PDL keeps:
- before `wait_for_inputs`: loads of weights only (no kernel of a step writes them), and no stores;
- `wait_for_inputs` itself lets the next kernel launch only after the wait, so that when a kernel starts, every
  kernel before the one it follows has finished.
A kernel launched without PDL, or with PDL after a kernel that never signals (cuBLAS, PyTorch's own), simply starts
once its predecessor is done; the wait then returns at once. CUDA graphs capture the launches as they are.

Off under the interpreter, without a Hopper GPU, where Triton lacks it, or with INFOMAMBA_PDL=0.
"""
from __future__ import annotations

import os

import torch

from kernels._triton import HAS_TRITON, INTERPRETED, tl, triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton, or none: `available` says no, so the branch below is never compiled
    gdc_launch_dependents = gdc_wait = None

# Read per launch: benchmarks flip it to time both ways in one run.
ENABLED = os.environ.get("INFOMAMBA_PDL", "1") != "0"
# On the H200 (bench/RESULTS.md, issue 10's ninth run), ms a decode step of the 130M-class model, PDL off / on: 1.20-1.22x
# at 1 row, 1.04-1.15x at 4, 1.06-1.11x at 32; at 64 and 256, where the Mamba step is main's and every product
# cuBLAS's, 0.98-1.01x.
MAX_ROWS = 32
_ON, _OFF = {"launch_pdl": True}, {}
_available: dict[int, bool] = {}  # device index -> whether PDL can be used there


def available(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL (sm_90 or later, compiled, a Triton that has it)."""
    if device.type != "cuda" or INTERPRETED or not HAS_TRITON or gdc_wait is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _available.get(index)
    if found is None:
        found = _available[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return found


def use(device: torch.device, rows: int) -> bool:
    """Whether the next launch on `device`, of a step of `rows` rows, takes PDL: the kernel's PDL meta-parameter.
    Up to MAX_ROWS only: above it a step's products are cuBLAS's and its few Triton launches gain nothing."""
    return rows <= MAX_ROWS and ENABLED and available(device)


def options(on: bool) -> dict:
    """The launch's keyword arguments: `kernel[grid](..., PDL=on, **pdl.options(on))`."""
    return _ON if on else _OFF


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished (its writes visible), then let the next one launch.
    Everything a kernel reads that a kernel of the step may have written comes after this."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
