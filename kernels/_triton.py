"""Optional Triton import: the kernel modules still import (and their `*_ref` still work) without Triton.

Without Triton, `triton.jit` leaves the function as it is and each module deletes its public fast
functions, so `kernels.ops` falls back to the references.
"""
from __future__ import annotations

import os
import sys

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(int(n) - 1, 0).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = _NoTriton()
    tl = None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter ignores strides and autotune)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# `triton.jit` picks the interpreter when it decorates a kernel, at import: the kernels run the way they were
# decorated, whatever the variable says later, and `rows` (called per tensor per launch) reads this, not os.environ.
INTERPRETED = interpreting()


def compiled_kernels() -> int:
    """Compiled variants held by the project's Triton kernels (kernels.*). A kernel compiles once per
    specialization (constexprs, and Triton's own: ints equal to 1 or divisible by 16, pointer alignment), at its
    first launch with it: a count that grows while serving means steps that waited for the compiler. 0 under the
    interpreter, without Triton, or where Triton keeps its cache differently."""
    return sum(compiled_variants().values())


def compiled_variants() -> dict[str, int]:
    """compiled_kernels by kernel: {module.kernel: variants}."""
    if not HAS_TRITON or interpreting():
        return {}
    from triton.runtime.jit import JITFunction

    found, seen = {}, set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernels.") or module is None:
            continue
        for attr, obj in list(vars(module).items()):
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotuner / heuristics wrappers
                obj = obj.fn
            if isinstance(obj, JITFunction) and id(obj) not in seen:  # once, where another module imports it too
                seen.add(id(obj))
                try:
                    found[f"{name}.{attr}"] = sum(len(entry[0]) for entry in obj.device_caches.values())
                except (AttributeError, TypeError, IndexError):
                    return {}
    return found


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 on the host (0 for n <= 0, as Triton's). Triton's own is a constexpr_function: a call
    from Python unwraps its arguments through lists and dicts, some µs each, and a layer's launchers make ~15."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """triton.cdiv on the host, for the same reason."""
    return (a + b - 1) // b


def rows(t):
    """A tensor the kernels can address by row stride alone: views with unit inner stride (slices of a fused
    projection) go through as they are on a GPU, saving a copy; the interpreter gets a contiguous copy."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 and not INTERPRETED else t.contiguous()


def check_pool(name: str, pool, ndim: int):
    """State pools are updated in place, so they cannot be made contiguous behind the caller's back."""
    if pool.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError(f"{name}: the state pool view must be contiguous (it is updated in place)")


def check_indices(name: str, t, batch: int, device):
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")


__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRETED", "interpreting", "next_power_of_2", "cdiv", "rows",
           "check_pool", "check_indices"]
