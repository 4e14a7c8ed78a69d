"""Packed variable-length sequences: helpers shared by the PyTorch reference ops.

A batch of sequences is packed token-major: row `cu_seqlens[i]:cu_seqlens[i+1]` of a (total, ...) tensor
belongs to sequence i, whose carried state lives in slot `state_indices[i]` of the pool (-1: padding, skipped).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class PackedLayout:
    """One forward pass's batch layout, built once (by the server's runner, or the model) and passed down to every
    layer's chunk kernels: cu_seqlens on the device, its values on the host (the grids need them; reading them
    from the device would wait on it), and the chunk tables the chunked kernels build from them, per chunk size."""

    cu_seqlens: torch.Tensor  # (batch + 1,) int32 on the device
    bounds: list[int]  # the same values on the host
    _tables: dict = field(default_factory=dict)
    # from the bounds, once per pass rather than in every kernel of every layer (a loop over the sequences)
    num_seqs: int = field(init=False)
    max_len: int = field(init=False)  # the longest sequence, 0 with none

    def __post_init__(self):
        self.num_seqs = len(self.bounds) - 1
        self.max_len = max(map(operator.sub, self.bounds[1:], self.bounds[:-1]), default=0)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, bounds: list[int] | None = None) -> "PackedLayout":
        return cls(cu_seqlens, bounds if bounds is not None else cu_seqlens.tolist())

    def chunk_tables(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per chunk: its sequence and its index within it; per sequence: its first chunk (a prefix sum). Built on
        the host and sent in one copy; the kernels only read them, so every layer of the pass reuses them."""
        tables = self._tables.get(chunk)
        if tables is None:
            tables = self._tables[chunk] = _build_chunk_tables(self.bounds, chunk, self.cu_seqlens.device,
                                                               self.max_len)
        return tables


def layout_of(cu_seqlens: torch.Tensor, layout: PackedLayout | None) -> PackedLayout:
    """The caller's layout when it describes this cu_seqlens, else one read from it (a host read)."""
    if layout is not None and layout.cu_seqlens is cu_seqlens:
        return layout
    return PackedLayout.of(cu_seqlens)


def to_device_nowait(values: list, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`, queued without waiting: a copy from pageable memory waits for the
    stream (the step's host work would then wait for the GPU), one from pinned memory does not."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def aligned(n: int) -> int:
    """n int32 entries rounded up to 16 bytes: where a second table starts in a shared buffer. Triton specializes
    a kernel on each pointer's 16-byte alignment, so a table at an offset that moved with the batch would compile a
    variant per alignment, mid-serving (the H200's long append compiled three)."""
    return -(-n // 4) * 4


def _build_chunk_tables(bounds, chunk, device, max_len):
    num_seqs = len(bounds) - 1
    if max_len <= chunk:  # one chunk a sequence (a mixed step's decodes and short prompts): no loop over them
        n = num_seqs
        chunk_seq, chunk_pos, chunk_cu = list(range(n)), [0] * n, list(range(n + 1))
    else:
        chunk_seq, chunk_pos, chunk_cu = [], [], [0]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            count = max(-(-(b - a) // chunk), 1)  # an empty sequence still gets a chunk: it carries the state
            chunk_seq += [i] * count
            chunk_pos += range(count)
            chunk_cu.append(chunk_cu[-1] + count)
        n = len(chunk_seq)
    pad = [0] * (aligned(n) - n)
    packed = torch.tensor(chunk_seq + pad + chunk_pos + pad + chunk_cu, dtype=torch.int32)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    at = aligned(n)
    return packed[:n], packed[at:at + n], packed[2 * at:]


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
