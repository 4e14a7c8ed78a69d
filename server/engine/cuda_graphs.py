"""Decode under CUDA graphs: one graph per padded batch size, replayed over the resident state pool.

Static token and slot buffers are padded with slot -1 (skipped by every kernel), so a graph captured for
batch 16 serves any 9..16 streams; the pool is never copied in or out.
"""
from __future__ import annotations

import torch

from model.infomamba import InfoMamba
from model.state import StreamState

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CudaGraphDecoder:
    def __init__(self, model: InfoMamba, pool: StreamState, batch_sizes=DEFAULT_BATCH_SIZES):
        if not model.device.type == "cuda":
            raise ValueError("CudaGraphDecoder: the model must be on a CUDA device")
        self.model, self.pool = model, pool
        self.batch_sizes = sorted(set(batch_sizes))
        max_bs, cfg = self.batch_sizes[-1], model.config
        token_shape = (max_bs,) if cfg.vocab_size is not None else (max_bs, cfg.d_input)
        token_dtype = torch.long if cfg.vocab_size is not None else model.dtype
        self.tokens = torch.zeros(token_shape, dtype=token_dtype, device=model.device)
        self.slots = torch.full((max_bs,), -1, dtype=torch.int32, device=model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = None
        # Warm up (compiles the Triton kernels) on a side stream, as capture requires; slots are all -1 so the
        # pool is untouched.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in self.batch_sizes:
                self.model.decode_step(self.tokens[:bs], self.pool, self.slots[:bs])
        torch.cuda.current_stream().wait_stream(stream)
        for bs in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                out = self.model.decode_step(self.tokens[:bs], self.pool, self.slots[:bs])
            memory_pool = graph.pool()
            self.graphs[bs], self.outputs[bs] = graph, out.head

    def padded_size(self, n: int) -> int:
        for bs in self.batch_sizes:
            if bs >= n:
                return bs
        raise ValueError(f"batch of {n} exceeds the largest captured decode batch {self.batch_sizes[-1]}")

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, state_indices: torch.Tensor) -> torch.Tensor:
        """tokens: (n,) or (n, d_input); state_indices: (n,) -> head outputs (n, d_out), a view valid until the
        next call."""
        n = tokens.shape[0]
        bs = self.padded_size(n)
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.slots[:n].copy_(state_indices, non_blocking=True)
        if n < bs:
            self.slots[n:bs].fill_(-1)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
