"""The ops the model calls: each routes to its Triton kernel or its PyTorch reference (see kernels.dispatch).

Each `ops.X` decides per call. A forward pass calls dozens of ops on tensors of one device, so the model resolves
them once per pass (`resolve`) and calls the chosen functions directly: the choice reads the environment, which
costs more host time than some of the launches it routes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kernels import add_rms_norm as _norm
from kernels import causal_conv1d as _conv
from kernels import concept_filter as _concept
from kernels import concept_readout as _readout
from kernels import concept_step as _concept_step
from kernels import mamba_step as _mamba_step
from kernels import selective_scan as _scan
from kernels import selective_state_update as _update
from kernels import small_linear as _small
from kernels import window_attention as _attention
from kernels import window_attention_update as _attention_update
from kernels.dispatch import fused_step, use_triton


def _pick(module, name, fast: bool):
    ref = getattr(module, name + "_ref")
    impl = getattr(module, name, None) if fast else None
    return impl if impl is not None else ref


def _routed(module, name):
    ref = getattr(module, name + "_ref")

    def op(first, *args, **kwargs):
        fast = getattr(module, name, None)
        impl = fast if fast is not None and use_triton(first) else ref
        return impl(first, *args, **kwargs)

    op.__name__, op.__doc__ = name, ref.__doc__
    return op


causal_conv1d = _routed(_conv, "causal_conv1d")
causal_conv1d_update = _routed(_conv, "causal_conv1d_update")
selective_scan = _routed(_scan, "selective_scan")
selective_state_update = _routed(_update, "selective_state_update")
concept_filter = _routed(_concept, "concept_filter")
concept_filter_update = _routed(_concept, "concept_filter_update")
add_rms_norm = _routed(_norm, "add_rms_norm")
concept_readout = _routed(_readout, "concept_readout")
concept_step = _routed(_concept_step, "concept_step")
mamba_step = _routed(_mamba_step, "mamba_step")
window_attention = _routed(_attention, "window_attention")
window_attention_update = _routed(_attention_update, "window_attention_update")
linear = _routed(_small, "linear")
add_rms_norm_linear = _routed(_small, "add_rms_norm_linear")


_TABLE = (
    (_conv, "causal_conv1d"), (_conv, "causal_conv1d_update"), (_scan, "selective_scan"),
    (_update, "selective_state_update"), (_concept, "concept_filter"), (_concept, "concept_filter_update"),
    (_norm, "add_rms_norm"), (_readout, "concept_readout"), (_concept_step, "concept_step"),
    (_mamba_step, "mamba_step"), (_attention, "window_attention"), (_attention_update, "window_attention_update"),
    (_small, "linear"), (_small, "add_rms_norm_linear"),
)


@dataclass(frozen=True, slots=True)
class OpSet:
    """Every op, resolved to one implementation (the same signatures as the routed `ops.X`)."""

    causal_conv1d: Callable
    causal_conv1d_update: Callable
    selective_scan: Callable
    selective_state_update: Callable
    concept_filter: Callable
    concept_filter_update: Callable
    add_rms_norm: Callable
    concept_readout: Callable
    concept_step: Callable
    mamba_step: Callable
    window_attention: Callable
    window_attention_update: Callable
    linear: Callable
    add_rms_norm_linear: Callable
    # INFOMAMBA_FUSED_STEP's decode path ("1", "concept", "0"; kernels.dispatch), read once per pass like the rest;
    # None: read per call (ROUTED)
    fused_step: str | None = None

    def step_path(self) -> str:
        """The decode step's path: this pass's choice, else the environment's now."""
        return self.fused_step if self.fused_step is not None else fused_step()


def resolve(tensor) -> OpSet:
    """The implementations that `ops.X(tensor, ...)` would route to now, looked up once for a whole pass."""
    fast = use_triton(tensor)
    return OpSet(*(_pick(module, name, fast) for module, name in _TABLE), fused_step=fused_step())


# per call, as `ops.X` itself: for callers that build no OpSet
ROUTED = OpSet(*(globals()[name] for _, name in _TABLE))
