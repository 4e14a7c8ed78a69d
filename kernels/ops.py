"""The ops the model calls: each routes to its Triton kernel or its PyTorch reference (see kernels.dispatch)."""
from __future__ import annotations

from kernels import add_rms_norm as _norm
from kernels import causal_conv1d as _conv
from kernels import concept_filter as _concept
from kernels import concept_readout as _readout
from kernels import concept_step as _concept_step
from kernels import mamba_step as _mamba_step
from kernels import selective_scan as _scan
from kernels import selective_state_update as _update
from kernels import window_attention as _attention
from kernels import window_attention_update as _attention_update
from kernels.dispatch import use_triton


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
