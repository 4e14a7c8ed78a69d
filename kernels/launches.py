"""Counting the kernel launches a piece of model code makes (tests and benchmarks), on any device.

A decode step is launch-bound: its cost is about the number of kernels it launches, each a few microseconds on
the GPU however little it moves. A launch is a Triton kernel or a PyTorch op that computes; views, allocations and
metadata launch nothing. Both are counted from Python, so the count is the same on the CPU under
TRITON_INTERPRET=1 as on a GPU, where `count_cuda_kernels` (the profiler's records) measures the real thing.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# ops that allocate, alias or read metadata: no kernel runs
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
              "lift_fresh", "alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
              "split", "split_with_sizes", "unbind", "chunk"}


@dataclass
class Launches:
    triton: Counter = field(default_factory=Counter)  # kernel name -> launches
    torch: Counter = field(default_factory=Counter)  # aten op name -> calls

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.torch.values())

    def describe(self) -> str:
        parts = [f"{name} x{n}" for name, n in sorted((self.triton + self.torch).items())]
        return f"{self.total} launches: " + ", ".join(parts)


class _TorchOps(TorchDispatchMode):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_LAUNCH:
            self.counter[name] += 1
        return func(*args, **(kwargs or {}))


def _triton_classes():
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def counting_launches():
    """Counts the launches made inside the block into the yielded Launches (not thread-safe: one block at a time)."""
    launches = Launches()
    originals = {cls: cls.run for cls in _triton_classes()}

    def counted(original):
        def run(self, *args, **kwargs):
            launches.triton[self.fn.__name__] += 1
            with _disable_current_modes():  # the interpreter's own tensor work is not the kernel's
                return original(self, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        with _TorchOps(launches.torch):
            yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original


def count_cuda_kernels(fn) -> int:
    """GPU activities (kernels, copies, fills) recorded by the profiler while fn() runs, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
