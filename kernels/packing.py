"""Packed variable-length sequences: helpers shared by the PyTorch reference ops.

A batch of sequences is packed token-major: row `cu_seqlens[i]:cu_seqlens[i+1]` of a (total, ...) tensor
belongs to sequence i, whose carried state lives in slot `state_indices[i]` of the pool (-1: padding, skipped).
"""
from __future__ import annotations

import contextlib
import threading

import torch

_declared = threading.local()


@contextlib.contextmanager
def known_bounds(cu_seqlens: torch.Tensor, bounds: list[int]):
    """Declare cu_seqlens's values on the host for the duration of a forward pass, so the chunk kernels of every
    layer build their grids without each waiting for the device. The caller must not change it meanwhile."""
    previous = getattr(_declared, "value", None)
    _declared.value = (cu_seqlens, bounds)
    try:
        yield
    finally:
        _declared.value = previous


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a host list: the declared values when this very tensor was declared, else read (a sync)."""
    declared = getattr(_declared, "value", None)
    if declared is not None and declared[0] is cu_seqlens:
        return declared[1]
    return cu_seqlens.tolist()


def seq_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, ...) -> (batch, max_len, ...) zero-padded on the right, and a (batch, max_len) bool mask."""
    lengths = seq_lengths(cu_seqlens)
    batch, max_len = len(lengths), max(lengths, default=0)
    padded = x.new_zeros((batch, max_len) + tuple(x.shape[1:]))
    mask = torch.zeros(batch, max_len, dtype=torch.bool, device=x.device)
    for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), lengths)):
        padded[i, :length] = x[start:start + length]
        mask[i, :length] = True
    return padded, mask


def unpad(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of pad_packed: (batch, max_len, ...) -> (total, ...)."""
    return padded[mask]
