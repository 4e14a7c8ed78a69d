"""The engine loop, `schedule() -> runner.run(batch) -> postprocess()`, in a background thread; and its asyncio
front: a bounded queue, an output stream per request, cancellation when the client goes away."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Callable

import torch

from model.infomamba import InfoMamba
from server.errors import APIError
from server.metrics import Metrics
from server.runner import ModelRunner, StepResult, sample
from server.scheduler import ScheduledBatch, Scheduler
from server.sequence import Sequence, SeqStatus
from server.state_pool import StatePool

log = logging.getLogger("infomamba.engine")


class EventOutbox:
    """Events for asyncio consumers. Posted from the engine thread they are held until the step ends, then handed
    over with one loop wake-up per step instead of one per token; from any other thread they go at once."""

    def __init__(self):
        self.owner: threading.Thread | None = None
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}

    def post(self, loop: asyncio.AbstractEventLoop, deliver: Callable, event: tuple) -> None:
        if threading.current_thread() is not self.owner:
            loop.call_soon_threadsafe(deliver, event)
            return
        self._pending.setdefault(loop, []).append((deliver, event))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the consumer's loop has closed: nobody is listening
                pass


def _deliver_all(items: list) -> None:
    for deliver, event in items:
        deliver(event)


class Engine:
    """Owns the state pool; the only thread that touches model state. Other threads talk to it through
    add/abort (thread-safe) and call(fn), which runs fn between two steps and returns a Future."""

    def __init__(self, model: InfoMamba, max_num_streams: int, max_num_batched_tokens: int,
                 max_queue: int = 1024, metrics: Metrics | None = None, tokenizer=None, cuda_graphs: bool = True):
        self.model = model.eval()
        self.pool = StatePool(model, max_num_streams)
        self.scheduler = Scheduler(self.pool, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool, cuda_graphs=cuda_graphs)
        self.max_queue = max_queue
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ops: list[tuple[Callable, concurrent.futures.Future]] = []
        self._aborts: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self.outbox = EventOutbox()
        self._stop = False
        self.num_steps = 0

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="infomamba-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def is_idle(self) -> bool:
        with self._lock:
            return not self.scheduler.has_work() and not self._ops

    def drain(self, timeout: float) -> bool:
        """Wait until every admitted request has finished (graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_idle():
                return True
            time.sleep(0.01)
        return False

    # -- requests (any thread) -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        with self._wake:
            if seq.owns_slot and self.scheduler.num_waiting >= self.max_queue:
                raise APIError(429, "queue_full", f"the request queue is full ({self.max_queue} waiting); retry later",
                               retry_after=1)
            self.scheduler.add(seq)
            self._wake.notify()

    def abort(self, seq: Sequence) -> None:
        with self._wake:
            seq.is_cancelled = True
            self._aborts.append(seq)
            self._wake.notify()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._ops.append((fn, future))
            self._wake.notify()
        if self._thread is None:  # not started (tests, shutdown): run inline
            self._run_ops()
        return future

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                    "waiting_for_slot": self.scheduler.num_waiting_for_slot,
                    "slots_used": self.pool.num_used, "slots_total": self.pool.num_total}

    # -- the loop (engine thread) ----------------------------------------------------------------------------

    def _loop(self) -> None:
        self.outbox.owner = threading.current_thread()
        while True:
            with self._wake:
                while not self._stop and not self._ops and not self._aborts and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stop:
                    self.outbox.flush()
                    return
            self._run_ops()
            try:
                self.step()
            except Exception:  # a bug must not take the server down: fail what was running, keep serving
                log.exception("engine step failed")
                with self._lock:
                    for seq in list(self.scheduler.running):
                        self._fail(seq, APIError(500, "internal_error", "the engine step failed"))
            finally:
                self.outbox.flush()

    def step(self) -> ScheduledBatch | None:
        with self._lock:
            for seq in self._aborts:
                self._finish(seq, "cancelled")
            self._aborts.clear()
            for seq in list(self.scheduler.waiting):
                if seq.num_prompt == 0 and seq.pending_token is None and not seq.is_cancelled:
                    self._start_from_logits(seq)
            batch = self.scheduler.schedule()
        if batch is None:
            return None
        t0 = time.monotonic()
        for chunk in batch.chunks:
            if chunk.seq.scheduled_time is None:
                chunk.seq.scheduled_time = t0
                if self.metrics:
                    self.metrics.queue_time.observe(t0 - chunk.seq.arrival_time)
        result = self.runner.run(batch)
        if self.metrics:
            self.metrics.observe_step(batch, time.monotonic() - t0)
        with self._lock:
            self.postprocess(batch, result)
        self.num_steps += 1
        return batch

    def postprocess(self, batch: ScheduledBatch, result: StepResult) -> None:
        now = time.monotonic()
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.status is SeqStatus.FINISHED:
                continue
            if chunk.is_decode:
                seq.pending_token = None
            seq.num_fed += chunk.num_tokens if not chunk.is_decode else 0
            if seq.id in result.last_logits:
                seq.initial_logits = result.last_logits[seq.id]
            if seq.id in result.outputs:
                self._mark_output(seq, now, chunk.num_tokens)
                seq.emit(("outputs", result.outputs[seq.id]))
            if self.metrics and not chunk.is_decode:
                self.metrics.prompt_steps.inc(chunk.num_tokens)
            if seq.id in result.sampled:
                self._on_token(seq, result.sampled[seq.id], now)
            elif seq.num_pending == 0:
                self._finish(seq, seq.finish_reason or "done")

    def _on_token(self, seq: Sequence, token: int, now: float) -> None:
        self._mark_output(seq, now, 1)
        seq.output_ids.append(token)
        if self.metrics:
            self.metrics.generation_steps.inc()
        params = seq.sampling
        reason = None
        if seq.detok is not None and seq.detok.add(token):
            reason = "stop"
        elif token in params.stop_token_ids or (token == self.eos_id and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            reason = "length"
        text = seq.detok.delta(is_final=reason is not None) if seq.detok is not None else ""
        seq.emit(("token", token, text))
        if reason is None:
            seq.pending_token = token
        elif seq.feed_last:
            seq.pending_token = token
            seq.is_draining = True
            seq.finish_reason = reason
        else:
            self._finish(seq, reason)

    def _mark_output(self, seq: Sequence, now: float, n: int) -> None:
        if self.metrics:
            if seq.first_output_time is None:
                self.metrics.time_to_first_output.observe(now - seq.arrival_time)
            elif seq.last_output_time is not None:
                self.metrics.time_per_output_step.observe((now - seq.last_output_time) / max(n, 1))
        if seq.first_output_time is None:
            seq.first_output_time = now
        seq.last_output_time = now

    def _start_from_logits(self, seq: Sequence) -> None:
        if seq.initial_logits is None or seq.sampling is None:
            self._fail(seq, APIError(400, "nothing_to_run", "no inputs to run"))
            return
        token = sample(seq.initial_logits[None], [seq])[0]
        self._on_token(seq, token, time.monotonic())

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        done = {"finish_reason": reason, "prompt_steps": seq.num_fed, "generated": len(seq.output_ids)}
        if seq.slot is not None and seq.status is SeqStatus.RUNNING:
            done["steps"] = self.pool.steps(seq.slot)
            if seq.want_state and reason != "cancelled":
                done["state"] = self.pool.read(seq.slot)
        if seq.keep_last_logits:
            done["last_logits"] = seq.initial_logits
        self.scheduler.finish(seq, reason)
        if self.metrics and reason != "cancelled":
            self.metrics.e2e_latency.observe(time.monotonic() - seq.arrival_time)
        seq.emit(("done", done))

    def _fail(self, seq: Sequence, error: APIError) -> None:
        self.scheduler.finish(seq, "error")
        seq.emit(("error", error))

    def _run_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for fn, future in ops:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


class RequestStream:
    """The events of one submitted Sequence, in order; closing it before the end cancels the request."""

    def __init__(self, engine: Engine, seq: Sequence):
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.seq = seq
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        seq.emit = lambda event: engine.outbox.post(loop, self._queue.put_nowait, event)
        engine.add(seq)  # raises APIError(429) when the queue is full

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple:
        if self.finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self.cancel()
            raise
        if event[0] in ("done", "error"):
            self.finished = True
        return event

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.seq)

    async def collect(self) -> tuple[list[dict], list[int], dict]:
        """Run to completion: (per-chunk outputs, generated ids, done info); raises APIError on error."""
        outputs, tokens, done = [], [], {}
        try:
            async for event in self:
                if event[0] == "outputs":
                    outputs.append(event[1])
                elif event[0] == "token":
                    tokens.append(event[1])
                elif event[0] == "done":
                    done = event[1]
                elif event[0] == "error":
                    raise event[1]
        finally:
            self.cancel()
        return outputs, tokens, done


class AsyncEngine:
    """The asyncio side of the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def call(self, fn: Callable):
        return await asyncio.wrap_future(self.engine.call(fn))

    def open(self, seq: Sequence) -> RequestStream:
        return RequestStream(self.engine, seq)

    async def run(self, seq: Sequence) -> tuple[list[dict], list[int], dict]:
        return await self.open(seq).collect()


def concat_outputs(chunks: list[dict[str, torch.Tensor]], kinds: tuple[str, ...], is_classify: bool) -> dict:
    """Per-chunk output tensors joined along steps (a classify head keeps only the last chunk's)."""
    joined = {}
    for kind in kinds:
        parts = [c[kind] for c in chunks if kind in c]
        if not parts:
            joined[kind] = []
        elif kind == "head" and is_classify:
            joined[kind] = parts[-1][0].tolist()
        else:
            joined[kind] = torch.cat(parts).tolist()
    return joined
