"""Packed variable-length sequences: helpers shared by the PyTorch reference ops.

A batch of sequences is packed token-major: row `cu_seqlens[i]:cu_seqlens[i+1]` of a (total, ...) tensor
belongs to sequence i, whose carried state lives in slot `state_indices[i]` of the pool (-1: padding, skipped).
"""
from __future__ import annotations

import torch


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
