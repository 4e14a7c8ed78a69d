"""Mixed steps under CUDA graphs: decodes beside short prompt chunks and session appends, replayed rather than
launched kernel by kernel.

An eager step of the bundled model costs milliseconds of host time (about a hundred kernel launches) against a
fraction of one for a replayed decode graph, and under HTTP load most eager steps are a few prompts of tens of
tokens beside the decodes (H200, 64 clients: 9% of the steps were eager and took half of the engine's time;
bench/RESULTS.md). Such a step replays a graph captured for a padded layout instead, one per bucket of
(sequences, tokens), every sequence at most MAX_CHUNK tokens:

- padding is sequences with slot -1, which every kernel skips, holding the pad tokens (MAX_CHUNK each at most);
- the chunk kernels read each sequence's bounds from cu_seqlens on the device, and their tables, for sequences of
  one chunk at most, depend on the number of sequences alone: built once before the capture, they serve every
  layout of the bucket;
- each bucket is captured with a sequence of MAX_CHUNK tokens, so its kernels are configured for the longest
  sequence they may meet; the chunked form gives the same result for any chunking, so shorter ones are exact.

Long prompts get buckets too: one sequence of exactly L tokens, L a multiple of LONG_STEP up to the step's token
budget, with nothing padded (the layout is exact, so its tables and grids are those of the real step). An eager
2048-token step of the 130M-class model costs 14-31 ms of host time against 5-7 ms of GPU work (H200,
bench/profile_host.py); the scheduler cuts a long prompt that does not fit one step into chunks of these lengths
(Scheduler.long_graph_chunk), so all its steps but the last replay a graph.
"""
from __future__ import annotations

import torch

from kernels.packing import PackedLayout, aligned
from model.infomamba import InfoMamba, ModelOutput
from model.state import StreamState

MAX_CHUNK = 64  # longest sequence a bucket takes: one chunk of the scan (kernels/selective_scan._scan_config)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)
SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CHUNK_SIZES = (16, 32, 64, 128)  # every chunk size a kernel may ask the layout's tables for, at max_len 64
LONG_STEP = 256  # long buckets hold one sequence of a multiple of this many tokens


def buckets(max_seqs: int, max_tokens: int) -> list[tuple[int, int]]:
    """(sequences, tokens) pairs to capture: a sequence has a token at least (its prompt's or its decode's) and
    MAX_CHUNK at most."""
    return [(n, t) for n in SEQ_BUCKETS if n <= max_seqs for t in TOKEN_BUCKETS
            if t <= max_tokens and n <= t <= n * MAX_CHUNK]


def long_lengths(max_tokens: int) -> list[int]:
    """The lengths of the long buckets (one sequence each) under a step's token budget."""
    return list(range(LONG_STEP, max_tokens + 1, LONG_STEP))


def pad_layout(starts: list[int], num_seqs: int, num_tokens: int) -> list[int]:
    """Bounds of the real sequences followed by pad sequences that fill num_seqs and num_tokens (MAX_CHUNK each
    at most, then empty ones)."""
    bounds = list(starts)
    end = bounds[-1]
    for _ in range(num_seqs - (len(starts) - 1)):
        end = min(end + MAX_CHUNK, num_tokens)
        bounds.append(end)
    if end != num_tokens:
        raise ValueError(f"pad_layout: {num_seqs} sequences cannot hold {num_tokens} tokens")
    return bounds


def choose_bucket(by_seqs: dict[int, list[int]], starts: list[int], max_len: int,
                  long: frozenset[int] = frozenset()) -> tuple[int, int] | None:
    """The smallest bucket that holds a layout (starts: the real sequences' bounds; max_len: the longest one), or
    None. by_seqs: sequences -> the token sizes captured for it, both ascending; long: the long buckets' lengths
    (one sequence of exactly that many tokens)."""
    if max_len > MAX_CHUNK:
        return (1, max_len) if len(starts) == 2 and max_len in long else None
    num_seqs, num_tokens = len(starts) - 1, starts[-1]
    for n, sizes in by_seqs.items():
        if n < num_seqs:
            continue
        for t in sizes:
            if t >= num_tokens and t - num_tokens <= (n - num_seqs) * MAX_CHUNK:
                return n, t
    return None


class CudaGraphPrefill:
    """One CUDA graph per (sequences, tokens) bucket of the packed forward, over the resident state pool."""

    def __init__(self, model: InfoMamba, pool: StreamState, max_seqs: int, max_tokens: int):
        if model.device.type != "cuda":
            raise ValueError("CudaGraphPrefill: the model must be on a CUDA device")
        if model.config.vocab_size is None or model.config.is_hybrid:
            raise ValueError("CudaGraphPrefill: token inputs and recurrent layers only")
        self.model, self.pool = model, pool
        self.long = frozenset(long_lengths(max_tokens))
        self.buckets = buckets(max_seqs, max_tokens) + [(1, t) for t in sorted(self.long)]
        self.by_seqs: dict[int, list[int]] = {}  # sequences -> the token sizes captured for it, ascending
        for n, t in self.buckets:
            if t not in self.long or n != 1:
                self.by_seqs.setdefault(n, []).append(t)
        device = model.device
        self.tokens = torch.zeros(max(t for _, t in self.buckets), dtype=torch.long, device=device)
        # per sequence count: [cu_seqlens (n + 1), pad, slots (n)] in one buffer, filled by one copy a step
        self.layout_buffers = {n: torch.zeros(aligned(n + 1) + n, dtype=torch.int32, device=device)
                               for n, _ in self.buckets}
        self.layouts: dict[tuple[int, int], PackedLayout] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], ModelOutput] = {}
        self.num_replays = 0
        self.num_long_replays = 0  # of them, long buckets'
        self._capture()

    def _capture_layout(self, n: int, t: int) -> PackedLayout:
        buf = self.layout_buffers[n]
        if n == 1 and t in self.long:  # one sequence, exactly t tokens
            bounds = [0, t]
        else:  # all pad: the first sequences MAX_CHUNK long, as the kernels must expect
            bounds = pad_layout([0], n, t)
        buf[:n + 1].copy_(torch.tensor(bounds, dtype=torch.int32))
        buf[aligned(n + 1):].fill_(-1)
        layout = PackedLayout(buf[:n + 1], bounds)
        for chunk in CHUNK_SIZES:  # on the device before the capture: it must copy nothing from the host
            layout.chunk_tables(chunk)
        return layout

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for n, t in sorted(self.buckets, key=lambda b: (-b[1], -b[0])):  # largest first: the rest reuse its memory
            layout = self.layouts[n, t] = self._capture_layout(n, t)
            slots = self.layout_buffers[n][aligned(n + 1):]
            with torch.cuda.stream(stream):  # compiles the kernels; slots are all -1, so the pool is untouched
                self.model(self.tokens[:t], self.pool, state_indices=slots, layout=layout)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                out, _ = self.model(self.tokens[:t], self.pool, state_indices=slots, layout=layout)
            memory_pool = graph.pool()
            self.graphs[n, t], self.outputs[n, t] = graph, out
        torch.cuda.current_stream().wait_stream(stream)

    def bucket_for(self, starts: list[int], max_len: int) -> tuple[int, int] | None:
        return choose_bucket(self.by_seqs, starts, max_len, self.long)

    @torch.inference_mode()
    def __call__(self, bucket: tuple[int, int], inputs: torch.Tensor, starts: list[int],
                 slots: list[int]) -> ModelOutput:
        """inputs: the real tokens (starts[-1],) in pinned memory or on the device; starts, slots: the real layout on
        the host. Returns the real rows of the outputs: views valid until this bucket's next replay."""
        n, t = bucket
        num_tokens, num_pad = starts[-1], n - len(slots)
        bounds = pad_layout(starts, n, t)
        layout = torch.tensor(bounds + [0] * (aligned(n + 1) - n - 1) + slots + [-1] * num_pad, dtype=torch.int32)
        self.layout_buffers[n].copy_(layout.pin_memory(), non_blocking=True)
        self.tokens[:num_tokens].copy_(inputs, non_blocking=True)
        self.tokens[num_tokens:t].zero_()
        self.graphs[bucket].replay()
        self.num_replays += 1
        self.num_long_replays += n == 1 and t in self.long
        out = self.outputs[bucket]
        return ModelOutput(hidden=out.hidden[:num_tokens], head=out.head[:num_tokens])
