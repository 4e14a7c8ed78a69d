"""Which streams run in the next model step. Plain Python: no tensors are touched except through the pool.

Each step packs decode steps (one token each) of running streams and prefill chunks of streams with inputs left,
up to `max_num_batched_tokens`. Long inputs are split into chunks with the state carried in the stream's slot.
Scheduled streams rotate to the back of the running queue, so every stream is served round-robin; with
max_num_batched_tokens >= max_num_streams each running prefill gets at least one token every step.

With `max_prefill_wait_steps` > 0 (CUDA graphs on), a step in which streams decode leaves small prefill work
waiting for up to that many steps: decode-only steps replay a graph, and a step that mixes in a single prompt
runs eager, at the cost of a graph step several times over. New prompts then enter together, once per few steps.
Prefill work of at least half a step's budget goes in at once, and so does work that goes in graph chunks (below):
its step replays a graph too.

With `graph_chunk` > 0 (the runner replays graphs of mixed steps whose chunks are all that short), a step in which
streams decode feeds a prompt of up to GRAPH_CHUNK_SPLIT chunks in chunks of graph_chunk: a few replayed steps cost
less than one eager step, and the decodes beside them go on. Longer prompts go in whole (an eager step's launches
are then a small part of its work).

With `long_graph_chunk` > 0 (the runner also replays one sequence of any multiple of it up to `long_graph_max`
tokens), a prompt too long for the step is cut at a multiple of it and is the step's only prompt (behind other
prompts, it waits for the next step, which it leads), so that the step replays a graph: a long prompt then goes in graph steps but for its last chunk, where eager steps cost
two to five times their GPU work in launches (bench/RESULTS.md). A prompt that ends in the step is not cut: that
would add a step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import msgspec

from server.engine.sequence import Sequence, SeqStatus

GRAPH_CHUNK_SPLIT = 8  # prompts of up to this many graph chunks are split into them beside decodes


class ScheduledChunk(msgspec.Struct, gc=False):
    """A msgspec Struct, not a dataclass: one is built per stream per step, and its constructor runs in C (half the
    cost); gc=False keeps hundreds a step out of the cyclic collector (a chunk is never part of a cycle)."""

    seq: Sequence
    start: int  # index of the first input fed (seq.num_fed when scheduled)
    num_tokens: int
    is_decode: bool  # feeds a sampled token rather than seq.inputs
    token: int = -1  # a decode's token, known on the host
    from_row: int = -1  # or, >= 0: the row of the previous step's sampled tokens it feeds, still on the device


@dataclass(slots=True)
class ScheduledBatch:
    chunks: list[ScheduledChunk]
    num_decodes: int  # the first num_decodes chunks are decode steps, and no other is
    num_from_device: int = 0  # decodes that feed a token the previous step sampled, still on the device

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(c.num_tokens for c in self.chunks[self.num_decodes:])


class Scheduler:
    def __init__(self, pool, max_num_batched_tokens: int, max_num_prefill_tokens: int | None = None,
                 max_prefill_wait_steps: int = 0):
        """pool: anything with allocate() -> slot | None and free(slot) (the StatePool, or a fake in tests).
        max_num_prefill_tokens: the budget of a step in which no stream decodes; nobody waits on such a step's
        latency, and a long append then goes through in a few large steps instead of many small ones."""
        if max_num_batched_tokens < pool.num_total:
            raise ValueError(f"max_num_batched_tokens: must be >= max_num_streams ({pool.num_total}), "
                             f"got {max_num_batched_tokens}")
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_prefill_tokens = max(max_num_prefill_tokens or 0, max_num_batched_tokens)
        self.max_prefill_wait_steps = max_prefill_wait_steps
        self.graph_chunk = 0  # set by the engine when its runner replays mixed steps of chunks this short
        self.long_graph_chunk = 0  # and these two when it replays one long sequence of a multiple of this many
        self.long_graph_max = 0  # tokens, up to this many
        self.num_prefill_waits = 0  # decode-only steps run in a row while prefill work waited
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting_for_slot(self) -> int:
        return sum(1 for s in self.waiting if s.owns_slot)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a stream out (done, cancelled or failed) and give back its slot if the request owned it."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            if seq.owns_slot and seq.slot is not None:
                self.pool.free(seq.slot)
                seq.slot = None
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _admit(self) -> None:
        blocked = False  # keep FIFO among requests that need a pool slot
        for seq in list(self.waiting):
            if not seq.owns_slot:  # a session's request: its slot is already held
                self.waiting.remove(seq)
            elif blocked:
                continue
            else:
                slot = self.pool.allocate()
                if slot is None:
                    blocked = True
                    continue
                seq.slot = slot
                if seq.initial_state is not None:  # a fork of another request: it starts from that one's state
                    self.pool.write(slot, seq.initial_state)
                    seq.initial_state = None
                self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's chunks. What the step will do to each stream's position is booked here, when it is
        scheduled (inputs fed, pending token consumed), so the step after it can be scheduled before this one's
        results are read (EngineCore's async scheduling)."""
        self._admit()
        # one pass sorts the running streams (this runs every step over hundreds of them)
        decoding: list[Sequence] = []
        prefilling: list[Sequence] = []
        for seq in self.running:
            if seq.num_fed >= seq.num_prompt:
                # its token: on the device (sampled by the step still running) or on the host; a stream whose
                # token is still being read, or whose generation ended meanwhile, waits
                if (seq.ahead_row is not None and not seq.is_draining) or (
                        seq.pending_token is not None and seq.in_flight_step is None):
                    decoding.append(seq)
            elif seq.num_prompt > seq.num_fed:  # inputs left
                prefilling.append(seq)
        budget = self.max_num_batched_tokens if decoding else self.max_num_prefill_tokens
        # decode steps first: one token each, cheap, latency-bound
        chunks, from_device = [], 0
        for seq in decoding[:budget]:
            row = seq.ahead_row
            if row is None or seq.is_draining:
                chunks.append(ScheduledChunk(seq, seq.num_fed, 1, True, seq.pending_token))
                seq.pending_token = None
            else:
                chunks.append(ScheduledChunk(seq, seq.num_fed, 1, True, -1, row))
                seq.fed_ahead = True
                from_device += 1
            seq.ahead_row = None
            seq.num_decoded += 1
        num_decodes = len(chunks)
        budget -= num_decodes
        if chunks and self._prefill_can_wait(prefilling, budget):
            self.num_prefill_waits += 1
        else:
            self.num_prefill_waits = 0
            split = self.graph_chunk if chunks else 0
            for seq in prefilling:
                if not budget:
                    break
                left = seq.num_prompt - seq.num_fed
                n = min(left, budget)
                is_cut = False
                if split and n <= split * GRAPH_CHUNK_SPLIT:
                    n = min(n, split)
                elif n < left and self.long_graph_chunk <= n <= self.long_graph_max:
                    if len(chunks) > num_decodes:  # it would share the step: it leads the next one instead
                        break
                    n -= n % self.long_graph_chunk  # (long_graph_chunk 0: long_graph_max is 0 too, never here)
                    is_cut = True
                chunks.append(ScheduledChunk(seq, seq.num_fed, n, False))
                seq.num_fed += n
                budget -= n
                if is_cut:  # the step's one prompt: a second would take it off the graph
                    break
        if not chunks:
            return None
        if len(chunks) == len(self.running):  # all scheduled: the new order is the chunks'
            self.running = deque(c.seq for c in chunks) if prefilling else self.running
        else:
            scheduled = {id(c.seq) for c in chunks}
            rest = [s for s in self.running if id(s) not in scheduled]
            self.running = deque(rest + [c.seq for c in chunks])
        return ScheduledBatch(chunks, num_decodes, from_device)

    def _prefill_can_wait(self, prefilling: list[Sequence], budget: int) -> bool:
        if self.num_prefill_waits >= self.max_prefill_wait_steps:
            return False
        limit = self.graph_chunk * GRAPH_CHUNK_SPLIT
        if limit and all(seq.num_prompt - seq.num_fed <= limit for seq in prefilling):
            return False  # it goes in graph chunks: the step replays a graph anyway, and waiting costs its TTFT
        pending = sum(seq.num_prompt - seq.num_fed for seq in prefilling)
        return 0 < pending < budget // 2
