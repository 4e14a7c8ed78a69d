"""Runs one scheduled step: packs the chunks (cu_seqlens, state_indices), runs the model on the state pool in
place, and samples the next token of every stream whose inputs are used up."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from kernels.dispatch import use_triton
from kernels.packing import aligned, to_device_nowait
from server.engine.cuda_graphs import DEFAULT_BATCH_SIZES, CudaGraphDecoder
from server.engine.prefill_graphs import CudaGraphPrefill, buckets
from model.infomamba import InfoMamba, ModelOutput
from server.engine.protocol import Logprobs
from server.engine.sampler import input_logprobs, sample_on_device
from server.engine.scheduler import ScheduledBatch
from server.engine.state_pool import StatePool


@dataclass
class StepResult:
    outputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # seq id -> kind -> (n, width) CPU
    last_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq id -> (vocab,) fp32, on the device
    sampled: dict[int, int] = field(default_factory=dict)  # seq id -> token id
    logprobs: dict[int, Logprobs] = field(default_factory=dict)  # seq id -> its sampled token's, when asked
    prompt_logprobs: dict[int, Logprobs] = field(default_factory=dict)  # seq id -> its fed inputs', when asked
    replayed: bool = False  # the step replayed a CUDA graph


@dataclass
class LaunchedStep:
    """A step queued on the device, its sampled tokens possibly not yet on the host."""

    batch: ScheduledBatch
    result: StepResult
    sample_seqs: list = field(default_factory=list)  # the streams sampled, in the order of `tokens`
    tokens: torch.Tensor | None = None  # (len(sample_seqs),) on the device, when read back lazily
    host: torch.Tensor | None = None  # their copy on the host (pinned on a GPU), valid once `ready` has happened
    ready: object = None  # the CUDA event after that copy (None: valid now)
    step_id: int = 0  # the engine's count of steps when it launched this one
    started: float = 0.0  # time.monotonic() at its scheduling

    def host_tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class ReadBackRing:
    """Pinned host buffers and CUDA events for the sampled tokens' copies to the host, used in turn: a pinned
    allocation and an event a step were host time on every step. A buffer is written again `depth` launches
    later, so at most depth - 1 launches may be left unread (the engine leaves one)."""

    def __init__(self, max_rows: int, depth: int = 3):
        self.buffers = [torch.empty(max_rows, dtype=torch.long, pin_memory=True) for _ in range(depth)]
        self.events = [torch.cuda.Event() for _ in range(depth)]
        self.turn = 0

    def queue(self, step: LaunchedStep) -> None:
        """Queue the copy of step.tokens to the host, without waiting."""
        i, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        step.host = self.buffers[i][:step.tokens.shape[0]]
        step.host.copy_(step.tokens, non_blocking=True)
        step.ready = self.events[i]
        step.ready.record()


class ModelRunner:
    def __init__(self, model: InfoMamba, pool: StatePool, cuda_graphs: bool = True, prefill_graphs: bool = True,
                 max_num_batched_tokens: int = 2048):
        self.model = model
        self.pool = pool
        self.config = model.config
        self.device = model.device
        self.is_lm = model.config.head == "lm"
        self.graphs: CudaGraphDecoder | None = None
        self.prefill_graphs: CudaGraphPrefill | None = None
        # called once a step, while the GPU runs it: after a replay, before an eager pass (whose launches take ms);
        # the engine loop sends the previous step's outputs there rather than while the GPU waits for the next step
        self.while_launched = None
        self.last_sampled: torch.Tensor | None = None  # the last launch's sampled token ids, on the device
        self.read_back = ReadBackRing(pool.num_total) if self.device.type == "cuda" else None
        probe = torch.empty(0, device=self.device)
        if cuda_graphs and self.device.type == "cuda" and use_triton(probe) and self.config.vocab_size is not None:
            # Graphs for padded batch sizes up to the pool size; decode-only steps replay them.
            sizes = [bs for bs in DEFAULT_BATCH_SIZES if bs < pool.num_total] + [min(pool.num_total, 256)]
            self.graphs = CudaGraphDecoder(model, pool.state, batch_sizes=sizes)
            if prefill_graphs and not self.config.is_hybrid and buckets(sizes[-1], max_num_batched_tokens):
                # mixed steps of short chunks replay these; longer ones run eagerly (all of them where a step's
                # token budget is below the smallest bucket)
                self.prefill_graphs = CudaGraphPrefill(model, pool.state, max_seqs=sizes[-1],
                                                       max_tokens=max_num_batched_tokens)

    def run(self, batch: ScheduledBatch) -> StepResult:
        """One step, launched and read back."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> "LaunchedStep":
        """Queue one step on the device: the model, then the sampler. Returns without waiting for the device
        unless the step asks for what must be read back at once (per-step outputs, logprobs); collect() waits.
        Decode chunks with from_row >= 0 feed a token the previous launch sampled, straight from the device."""
        self.pool.zero_allocated()
        pieces, starts, slots = self._host_layout(batch)
        ahead = None  # (input rows, sampled rows) of the decodes fed from the device, when there are any
        if batch.num_from_device:
            pairs = [(i, c.from_row) for i, c in enumerate(batch.chunks[:batch.num_decodes]) if c.from_row >= 0]
            ahead = ([i for i, _ in pairs], [row for _, row in pairs])
        replayed = self._can_replay(batch)
        out = None if replayed or self.prefill_graphs is None else self._replay_mixed(batch, pieces, starts, slots,
                                                                                       ahead)
        if out is not None:
            replayed = True
        else:
            inputs, cu_seqlens, state_indices = self._to_device(pieces, starts, slots)
            self._feed_sampled(inputs, ahead)
            if replayed:
                out = ModelOutput(hidden=None, head=self.graphs(inputs, state_indices))
            else:
                self._launched()
                # the layout is known here (starts): the model and its kernels never read it back from the device
                out, _ = self.model(inputs, self.pool.state, cu_seqlens=cu_seqlens, state_indices=state_indices,
                                    bounds=starts)
        if replayed:
            self._launched()
        result = StepResult(replayed=replayed)
        sample_rows: list[int] = []  # the row of out.head each sampled stream draws from: its chunk's last step
        sample_seqs = []
        for i, chunk in enumerate(batch.chunks):
            seq, hi = chunk.seq, starts[i + 1]
            if not chunk.is_decode:
                if seq.outputs:
                    result.outputs[seq.id] = self._per_step(seq.outputs, out, starts[i], hi, i)
                if seq.prompt_logprobs is not None and self.is_lm:
                    self._input_logprobs(result, chunk, out.head[starts[i]:hi])
            if not self.is_lm:
                continue
            if seq.sampling is not None and not seq.is_draining and chunk.start + chunk.num_tokens >= seq.num_prompt:
                sample_rows.append(hi - 1)
                sample_seqs.append(seq)
            if seq.keep_last_logits and hi > starts[i]:
                # kept on the device: a copy to the host would wait for the step (a session's every append asks
                # for it); whoever reads it there later (a snapshot's writer, the sampler) waits then, if at all
                result.last_logits[seq.id] = out.head[hi - 1].to(torch.float32, copy=True)
        step = LaunchedStep(batch, result, sample_seqs)
        self.last_sampled = None
        if sample_seqs:
            # one gather, not a view per stream; an all-decode step samples from every row as it is
            rows = (out.head[:len(sample_rows)] if sample_rows[-1] == len(sample_rows) - 1
                    else out.head[to_device_nowait(sample_rows, out.head.device)])
            tokens, logprobs = sample_on_device(rows, sample_seqs)
            if logprobs is not None:  # read back already: the tokens with them
                result.sampled = dict(zip([seq.id for seq in sample_seqs], tokens.tolist()))
                result.logprobs = {sample_seqs[row].id: found for row, found in logprobs.items()}
            else:
                step.tokens = self.last_sampled = tokens
                if self.device.type == "cuda":
                    self.read_back.queue(step)
                else:
                    step.host = step.tokens
        return step

    def collect(self, step: "LaunchedStep") -> StepResult:
        """The step's results on the host, waiting for its sampled tokens if they are not there yet."""
        result = step.result
        if step.tokens is not None:
            result.sampled = dict(zip([seq.id for seq in step.sample_seqs], step.host_tokens()))
        return result

    @torch.inference_mode()
    def warm_up_kernels(self, max_tokens: int) -> int:
        """Eager passes over one layout of every class the kernels compile a variant for (the longest sequence's
        power of two, which picks block and chunk sizes; the sequence and token counts' Triton specialization: 1,
        a multiple of 16, or neither), on pad slots (-1: no state touched). Without it a step of a new class waits
        for the compiler mid-serving (H200: three compiles inside a measured second, p99 387 ms). Returns the
        passes run; a no-op off the GPU (the PyTorch path compiles nothing)."""
        probe = torch.empty(0, device=self.device)
        if self.device.type != "cuda" or not use_triton(probe) or self.config.vocab_size is None:
            return 0
        lengths = [n for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 48, 64, 65, 100, 128, 129, 256, 257, 2048,
                               2049, 4096, 4097, max_tokens - 1, max_tokens) if 0 < n <= max_tokens]
        layouts = {(length,) + (other,) * (num_seqs - 1) for length in lengths for num_seqs in (1, 2, 16, 17)
                   for other in (1, length)}  # one long sequence beside decodes, or all alike
        passes = 0
        for seq_lengths in sorted(layouts):
            starts = list(itertools.accumulate(seq_lengths, initial=0))
            if starts[-1] > max_tokens:
                continue
            passes += 1
            # packed as a step's are: what Triton specializes on includes the tensors' alignment
            inputs, cu_seqlens, slots = self._to_device([torch.zeros(starts[-1], dtype=torch.long)], starts,
                                                        [-1] * len(seq_lengths))
            self.model(inputs, self.pool.state, cu_seqlens=cu_seqlens, state_indices=slots, bounds=starts)
        torch.cuda.synchronize(self.device)
        return passes

    def _launched(self) -> None:
        hook = self.while_launched
        if hook is not None:
            hook()

    def _replay_mixed(self, batch: ScheduledBatch, pieces, starts: list[int], slots: list[int],
                      ahead: tuple[list[int], list[int]] | None) -> ModelOutput | None:
        """A mixed step from graphs, or None (it runs eager). The decodes replay their own graph and the prompt
        chunks a prefill graph: in one prefill bucket each decode would cost a whole chunk's scan (H200, 64 clients:
        0.69 ms a step against 0.36 for a decode graph). With per-step hidden outputs asked for, one bucket for all."""
        chunks, nd = batch.chunks, batch.num_decodes
        if nd == len(chunks):  # decodes alone, more than the largest decode graph
            return None
        max_len = max(c.num_tokens for c in chunks[nd:])
        split = 0 < nd <= self.graphs.batch_sizes[-1] and not any("hidden" in c.seq.outputs for c in chunks[nd:])
        if not split:
            bucket = self.prefill_graphs.bucket_for(starts, max_len)
            if bucket is None:
                return None
            staged = self._stage(pieces, starts[-1])
            if ahead:
                staged = staged.to(self.device, non_blocking=True)
                self._feed_sampled(staged, ahead)
            return self.prefill_graphs(bucket, staged, starts, slots)
        prompt_starts = [s - nd for s in starts[nd:]]
        bucket = self.prefill_graphs.bucket_for(prompt_starts, max_len)
        if bucket is None:
            return None
        staged = self._stage(pieces, starts[-1])
        decode_slots = torch.tensor(slots[:nd], dtype=torch.int32).pin_memory()
        decode_tokens = staged[:nd]
        if ahead:
            decode_tokens = decode_tokens.to(self.device, non_blocking=True)
            self._feed_sampled(decode_tokens, ahead)
        decoded = self.graphs(decode_tokens, decode_slots)  # (nd, vocab): a view of the graph's own output
        prompts = self.prefill_graphs(bucket, staged[nd:], prompt_starts, slots[nd:])
        return ModelOutput(hidden=None, head=torch.cat([decoded, prompts.head]))

    def _feed_sampled(self, tokens: torch.Tensor, ahead: tuple[list[int], list[int]] | None) -> None:
        """Write into `tokens` (the step's inputs, on the device) the tokens the previous launch sampled: ahead
        holds the input rows and, in the same order, the rows of those sampled tokens."""
        if not ahead:
            return
        if self.last_sampled is None:
            raise RuntimeError("a decode feeds a sampled token, but the previous launch sampled none")
        positions, rows = ahead
        k, identity = len(rows), list(range(len(rows)))
        if positions == identity and rows == identity:  # the same streams as the last step, in order
            tokens[:k] = self.last_sampled[:k]
        elif positions == identity:  # some streams left since: those that stay keep their order
            tokens[:k] = self.last_sampled.index_select(0, to_device_nowait(rows, tokens.device))
        else:
            index = to_device_nowait(positions + rows, tokens.device)
            tokens.index_copy_(0, index[:k], self.last_sampled.index_select(0, index[k:]))

    def _input_logprobs(self, result: StepResult, chunk, logits: torch.Tensor) -> None:
        # row j predicts input j + 1; the prompt's last row predicts the first sampled token instead
        seq = chunk.seq
        num_rows = min(logits.shape[0], seq.num_prompt - 1 - chunk.start)
        if num_rows > 0:
            targets = seq.inputs[chunk.start + 1:chunk.start + 1 + num_rows]
            result.prompt_logprobs[seq.id] = input_logprobs(logits[:num_rows], targets, seq.prompt_logprobs)

    def _can_replay(self, batch: ScheduledBatch) -> bool:
        return (self.graphs is not None and len(batch.chunks) <= self.graphs.batch_sizes[-1]
                and all(chunk.is_decode for chunk in batch.chunks))

    def _host_layout(self, batch: ScheduledBatch) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """The step's inputs in pieces, its row bounds and its slots, on the host."""
        # before the model is launched, so on the step's critical path: list comprehensions over the decode steps
        # (the scheduler puts them first), one tensor for all their tokens
        chunks, num_decodes = batch.chunks, batch.num_decodes
        pieces = []
        if num_decodes:
            if self.config.vocab_size is None:
                raise RuntimeError("decode step on a model without token inputs")
            # a token sampled by the previous launch and not read yet is written on the device (-1 here)
            pieces.append(torch.tensor([c.token for c in chunks[:num_decodes]], dtype=torch.int64))
        starts = list(range(num_decodes + 1))  # host copy: row ranges without reading the device
        end = num_decodes
        for chunk in chunks[num_decodes:]:
            pieces.append(chunk.seq.inputs[chunk.start:chunk.start + chunk.num_tokens])
            end += chunk.num_tokens
            starts.append(end)
        return pieces, starts, [c.seq.slot for c in chunks]

    def _stage(self, pieces: list[torch.Tensor], total: int) -> torch.Tensor:
        """The pieces in one pinned tensor: a copy from pageable memory may be staged in step with the stream (the
        driver then waits for the steps queued before it). Pinned blocks come from torch's caching host allocator,
        which hands a block out again only once the copies queued on it are done."""
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in pieces))  # as torch.cat's own result
        staging = torch.empty((total, *pieces[0].shape[1:]), dtype=dtype, pin_memory=True)
        return torch.cat(pieces, out=staging)

    def _to_device(self, pieces: list[torch.Tensor], starts: list[int],
                   slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, cu_seqlens, state_indices) on the model's device, without waiting for it."""
        at = aligned(len(starts))  # state_indices at the same alignment whatever the batch (kernels.packing)
        layout = torch.tensor(starts + [0] * (at - len(starts)) + slots, dtype=torch.int32)
        if self.device.type != "cuda":
            inputs = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(self.device)
            layout = layout.to(self.device)
        else:
            inputs = self._stage(pieces, starts[-1]).to(self.device, non_blocking=True)
            layout = layout.pin_memory().to(self.device, non_blocking=True)
        return inputs, layout[:len(starts)], layout[at:]

    def _per_step(self, kinds, out, lo: int, hi: int, i: int) -> dict[str, torch.Tensor]:
        got = {}
        for kind in kinds:
            if kind == "hidden":
                got[kind] = out.hidden[lo:hi].float().cpu()
            elif kind == "head" and self.config.head == "classify":
                got[kind] = out.head[i:i + 1].float().cpu()  # the chunk's last step
            elif kind == "logprobs":
                got[kind] = torch.log_softmax(out.head[lo:hi].float(), dim=-1).cpu()
            else:  # logits, or a per_step/lm head
                got[kind] = out.head[lo:hi].float().cpu()
        return got
