"""The engine core: requests in, one batch of outputs per step out. No HTTP, no asyncio, no sockets (those are in
server/engine/process.py and the frontends); one thread owns everything here, so no locks.

    handle(request) ... -> step(): schedule() -> runner.launch(batch) -> postprocess() -> take_outputs()

Async scheduling (`async_scheduling`; by default on where the device's decode step outlasts the host's work around
it): a step's sampled tokens stay on the device while the next step is scheduled and launched, which feeds them
from there; the host reads them and postprocesses the step while the device runs the next one. So the host's work
between steps (postprocess, requests in and outputs out, scheduling, packing) overlaps the device's, rather than
adding to it. A stream goes on that way only where what its next step does cannot depend on the token: plain
sampling (no penalties, logit bias, min_tokens or logprobs), no forks to start, no state to return, and the token
is not its last by length. A token that turns out to end generation (eos, a stop id or string) then has one more
step computed behind it: a request that owns its slot drops that step's result and its slot; a session's request
feeds its last token anyway. Any step that has a stream that cannot go on, or outputs to read back, is read at
once, as without async scheduling.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import torch

from kernels._triton import compiled_variants
from model.state import save_snapshot, state_nbytes_per_stream
from server import hops
from server.config import ServerConfig
from server.engine import errors
from server.engine.errors import EngineError
from server.engine.protocol import (Abort, Add, Array, EngineInfo, Error, Hello, Logprobs, Reply, RequestOutput,
                                    Sampling, SessionOp, StepOutputs, TokenOutputs, Utility, child_rid)
from server.engine.prefill_graphs import LONG_STEP, MAX_CHUNK
from server.engine.runner import LaunchedStep, ModelRunner, StepResult
from server.engine.sampler import sample
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import SamplingParams, Sequence, SeqStatus
from server.engine.sessions import Captured, Session, SessionTable
from server.engine.state_pool import StatePool, auto_num_streams
from server.engine.redis_store import Relinquish, open_store
from server.engine.store import Persisted
from server.engine.wal import LogRecord
from server.metrics import Metrics

log = logging.getLogger("infomamba.engine")
REAP_INTERVAL = 0.25  # seconds between looks for sessions idle past their TTL
INTERNAL = ""  # the client of the engine's own requests (replays of logged inputs): their outputs go nowhere


@dataclass(slots=True)
class _Waiter:
    """An answer held until a store write lands."""

    client: str
    answer: object  # RequestOutput or Reply; None: a background snapshot, which nobody waits for
    session: object = None
    snapshot_steps: int | None = None  # set when the write is a snapshot of the session at that step


class EngineCore:
    def __init__(self, model, tokenizer, config: ServerConfig, state_dir: str, model_name: str | None = None,
                 model_dir: str | None = None, runner=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name or config.served_model_name or model.config.name
        self.model_dir = model_dir
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.metrics = Metrics()
        self._compiled: dict[str, int] = {}  # Triton variants by kernel at the last metrics refresh
        num_streams = config.max_num_streams or auto_num_streams(model, config.gpu_memory_fraction)
        self.pool = StatePool(model, num_streams)
        self.scheduler = Scheduler(self.pool, max(config.max_num_batched_tokens, num_streams),
                                   config.max_num_prefill_tokens)
        self.runner = runner or ModelRunner(model, self.pool, cuda_graphs=config.cuda_graphs,
                                            prefill_graphs=config.prefill_graphs,
                                            max_num_batched_tokens=self.scheduler.max_num_batched_tokens)
        if getattr(self.runner, "graphs", None) is not None:  # eager decode steps cost what mixed ones do
            self.scheduler.max_prefill_wait_steps = config.max_prefill_wait_steps
        if getattr(self.runner, "prefill_graphs", None) is not None:
            self.scheduler.graph_chunk = MAX_CHUNK
            if self.runner.prefill_graphs.long:
                self.scheduler.long_graph_chunk = LONG_STEP
                self.scheduler.long_graph_max = max(self.runner.prefill_graphs.long)
        # events from other threads (frontend requests, finished writes), handled by the engine thread in order
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.on_post = None  # called after each post(), to wake a loop that sleeps elsewhere (EngineLoop)
        self.store = open_store(config, state_dir, model.config.name, model.fingerprint(), self.post,
                                self.metrics)
        self.sessions = SessionTable(self.pool, model, self.store, config.max_num_sessions, config.session_ttl)
        # this replica's name on its leases, and the `replica` label of its series (the dashboard joins on it)
        self.replica_id = getattr(self.store, "replica_id", None) or config.replica_id or socket.gethostname()
        self.metrics.replica_info.labels(self.replica_id).set(1)
        self.requests: dict[tuple[str, str], Sequence] = {}
        self.num_steps = 0
        # async scheduling needs a runner that launches steps; "auto" is decided by the warm-up
        # (process.choose_async_scheduling), off until then
        self.async_scheduling = config.async_scheduling is True and hasattr(self.runner, "launch")
        self._in_flight: LaunchedStep | None = None  # a launched step whose results are not read yet
        self._outputs: dict[tuple[str, str], RequestOutput] = {}  # this step's, by (client, rid)
        self._tokens: dict[str, TokenOutputs] = {}  # this step's plain tokens, by client (see _on_token)
        self._replies: dict[str, list[Reply]] = defaultdict(list)
        self._welcomes: set[str] = set()
        self._held: dict[int, list[_Waiter]] = {}  # store ticket -> the answers waiting for that write
        self._log_batch: list[LogRecord] = []  # this turn's log records, written together
        self._log_waiters: list[_Waiter] = []
        self._snapshots: list[tuple[Session, Captured]] = []  # background snapshots, written after this turn's log
        self._rotation: int | None = None  # the ticket of a log rotation under way
        self._next_reap = 0.0
        # session requests and operations whose session needs a slot while every slot runs something
        self._awaiting_slot: deque[Sequence | SessionOp] = deque()
        self.metrics.state_bytes_per_stream.set(state_nbytes_per_stream(model.config, model.dtype))

    @property
    def info(self) -> EngineInfo:
        from kernels.dispatch import use_triton

        return EngineInfo(pid=os.getpid(), model_name=self.model_name, config=self.model.config.to_dict(),
                          fingerprint=self.model.fingerprint(), model_dir=self.model_dir,
                          state_bytes_per_stream=state_nbytes_per_stream(self.model.config, self.model.dtype),
                          num_slots=self.pool.num_total,
                          kernels="triton" if use_triton(self.model.norm_f.weight) else "pytorch")

    def post(self, message) -> None:
        """From any thread: a message for the engine thread to handle in order."""
        self.inbox.put(message)
        if self.on_post is not None:
            self.on_post()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._awaiting_slot) or self._in_flight is not None

    @property
    def running_ahead(self) -> bool:
        """A step is launched and not read yet: the device is busy with it."""
        return self._in_flight is not None

    # -- one turn of the loop ------------------------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> dict[str, StepOutputs]:
        """Handle what arrived (waiting up to `timeout` for something when idle; 0: never), run one step, and
        return the step's outputs by frontend."""
        block = timeout != 0 and not self.has_work()
        try:
            self.handle(self.inbox.get(block=block, timeout=timeout if block else None))
            while True:
                self.handle(self.inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + REAP_INTERVAL
            self.sessions.spill_expired(now)
        while self._awaiting_slot and (self.pool.num_free or self.sessions.spillable()):
            item = self._awaiting_slot.popleft()
            session = self._session_of(item)
            session.running = None
            if isinstance(item, SessionOp):
                self._session_op(item, queued=True)
                self._next_in_session(session)
            else:
                self._start_in_session(item)
        starved = self.scheduler.num_waiting_for_slot
        if starved and self.pool.num_free == 0:  # idle sessions give their slots to waiting requests
            self.sessions.spill_lru(starved)
        self.step()
        return self.take_outputs()

    def handle(self, message) -> None:
        if self._in_flight is not None and isinstance(message, (Abort, SessionOp, Relinquish)):
            self.collect()  # these act on streams as the host knows them: bring the host up to date first
        try:
            if isinstance(message, Add):
                self._add(message)
            elif isinstance(message, Abort):
                seq = self.requests.get((message.client, message.rid))
                if seq is not None:
                    self._abort(seq)
            elif isinstance(message, SessionOp):
                self._session_op(message)
            elif isinstance(message, Persisted):
                self._persisted(message)
            elif isinstance(message, Relinquish):
                self.sessions.relinquish(message.session)
            elif isinstance(message, Utility):
                self._replies[message.client].append(self._utility(message))
            elif isinstance(message, Hello):
                self._welcomes.add(message.client)
        except EngineError as exc:
            rid = getattr(message, "rid", "")
            if isinstance(message, Add):
                self._output(message.client, rid).error = exc.to_struct()
            else:
                self._replies[message.client].append(Reply(rid, ok=False, error=exc.to_struct()))

    def step(self) -> ScheduledBatch | None:
        """Schedule and launch one step; postprocess the step before it if it is still in flight, or this one
        if it cannot leave its results on the device (see the module's docstring)."""
        for seq in list(self.scheduler.waiting):
            if seq.num_prompt == 0 and seq.pending_token is None:
                self._start_from_logits(seq)
        batch = self.scheduler.schedule()
        if batch is None:
            self.collect()
            return None
        t0 = time.monotonic()
        for chunk in batch.chunks:
            if chunk.seq.scheduled_time is None:
                chunk.seq.scheduled_time = t0
                self.metrics.queue_time.observe(t0 - chunk.seq.arrival_time)
        try:
            if not self.async_scheduling:
                result = self.runner.run(batch)
            else:
                launched = self.runner.launch(batch)
        except Exception:  # a bug must not take the engine down: fail what ran, keep serving
            log.exception("engine step failed")
            self.collect()
            for chunk in batch.chunks:
                self._fail(chunk.seq, EngineError("internal_error", "the engine step failed"))
            return batch
        self.num_steps += 1
        if not self.async_scheduling:
            self._observe(batch, result, time.monotonic() - t0)
            self.postprocess(batch, result)
            return batch
        launched.step_id, launched.started = self.num_steps, t0
        can_go_on = self._mark_in_flight(launched)
        self.collect()  # the step before, while the device runs this one
        self._in_flight = launched
        if not can_go_on:
            self.collect()
        return batch

    def collect(self) -> None:
        """Read back and postprocess the step in flight, if any."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return
        try:
            result = self.runner.collect(launched)
        except Exception:
            log.exception("engine step failed")
            for chunk in launched.batch.chunks:
                self._fail(chunk.seq, EngineError("internal_error", "the engine step failed"))
            return
        self._observe(launched.batch, result, time.monotonic() - launched.started)
        self.postprocess(launched.batch, result, launched.step_id)

    def _mark_in_flight(self, launched: LaunchedStep) -> bool:
        """Mark the step's streams in flight, and the sampled ones whose next step may feed their token from the
        device. Returns whether the step's results may stay on the device while the next step is launched."""
        step_id, result = launched.step_id, launched.result
        for chunk in launched.batch.chunks:
            chunk.seq.in_flight_step = step_id
        if result.outputs or result.prompt_logprobs or result.sampled:  # read back already: no reason to wait
            return False
        if launched.tokens is None:
            return True
        go_on = True
        for row, seq in enumerate(launched.sample_seqs):
            params = seq.sampling
            # the tokens this stream will have once this step is read: the one of a step still in flight too
            num_out = len(seq.output_ids) + 1 + seq.fed_ahead
            if (params.is_processed or seq.forks or seq.want_state or not (seq.owns_slot or seq.feed_last)):
                go_on = False
            elif num_out < params.max_tokens:
                seq.ahead_row = row
        return go_on

    def _observe(self, batch: ScheduledBatch, result: StepResult, seconds: float) -> None:
        self.metrics.observe_step(batch, seconds)
        if result.replayed:
            self.metrics.graph_steps.inc()
            self.metrics.graph_forward_time.inc(seconds)

    def take_outputs(self) -> dict[str, StepOutputs]:
        self._flush_log()
        by_client: dict[str, StepOutputs] = {}
        for (client, _), out in self._outputs.items():
            if client == INTERNAL:
                continue
            by_client.setdefault(client, StepOutputs()).outputs.append(out)
        for client, replies in self._replies.items():
            by_client.setdefault(client, StepOutputs()).replies.extend(replies)
        for client in self._welcomes:
            by_client.setdefault(client, StepOutputs()).welcome = self.info
        for client, tokens in self._tokens.items():
            if client != INTERNAL:
                by_client.setdefault(client, StepOutputs()).tokens = tokens
        self._outputs, self._replies, self._welcomes, self._tokens = {}, defaultdict(list), set(), {}
        return by_client

    # -- requests ----------------------------------------------------------------------------------------------

    def _add(self, req: Add) -> None:
        key = (req.client, req.rid)
        inputs = torch.from_numpy(req.inputs.numpy().copy())
        session = self.sessions.get(req.session) if req.session is not None else None
        sampling = _sampling(req.sampling, self.eos_id) if req.sampling is not None else None
        if req.n > 1 and (session is not None or sampling is None or req.want_state):
            raise EngineError("invalid_request", "n > 1 is for stateless generation only", "n")
        seq = Sequence(inputs, outputs=tuple(req.outputs), sampling=sampling, want_state=req.want_state,
                       feed_last=session is not None and sampling is not None,
                       keep_last_logits=(session is not None or req.want_state or req.n > 1)
                       and self.model.config.head == "lm",
                       tokenizer=self.tokenizer if session is not None else None, rid=req.rid, client=req.client,
                       session=session, prompt_logprobs=req.prompt_logprobs,
                       seq=req.seq if session is not None else None,
                       final_only=req.final_only and session is None and req.n == 1 and not req.outputs
                       and sampling is not None and sampling.logprobs is None and not sampling.stop)
        if session is None:
            if self.scheduler.num_waiting_for_slot >= self.config.max_queue:
                raise errors.queue_full(self.config.max_queue)
            self.requests[key] = seq
            for i in range(1, req.n):
                seq.forks.append(self._fork_request(seq, i))
            self.scheduler.add(seq)
            return
        if session.is_busy or session.queue:
            if not req.wait_if_busy:
                raise errors.session_busy(session.id)
            self.requests[key] = seq
            session.queue.append(seq)
            return
        self.requests[key] = seq
        self._start_in_session(seq)

    def _fork_request(self, parent: Sequence, index: int) -> Sequence:
        """Sample `index` of an n > 1 request: it waits until the parent's prompt has run (_fork)."""
        seed = parent.sampling.seed
        sampling = dataclasses.replace(parent.sampling, seed=None if seed is None else (seed + index) % 2**63)
        child = Sequence(torch.empty(0, dtype=torch.int64), sampling=sampling, rid=child_rid(parent.rid, index),
                         client=parent.client)
        child.fork_of = parent
        self.requests[(child.client, child.rid)] = child
        return child

    def _fork(self, parent: Sequence) -> None:
        """The parent's prompt has run: each fork starts from a copy of its state and its last logits."""
        state = self.pool.read(parent.slot)  # a copy: the parent's slot moves on
        for child in parent.forks:
            child.initial_state, child.initial_logits = state, parent.initial_logits
            self.scheduler.add(child)
        parent.forks = []
        parent.keep_last_logits = False

    def _drop_forks(self, parent: Sequence, reason: str, error: Error | None = None) -> None:
        """The parent ended before its prompt had run: so do the forks waiting for it."""
        for child in parent.forks:
            self.requests.pop((child.client, child.rid), None)
            child.status = SeqStatus.FINISHED
            out = self._output(child.client, child.rid)
            if error is not None:
                out.error = error
            else:
                out.finish_reason = reason
        parent.forks = []

    def _start_in_session(self, seq: Sequence) -> None:
        session = seq.session
        session.running = seq  # busy from now on: later requests of the session queue behind this one
        if self._must_wait_for_slot(session, seq):
            return
        try:
            if not self._resident(session, seq):
                return  # a replay of its logged inputs runs first; seq waits at the front of the queue
            if seq.num_prompt == 0 and seq.sampling is not None and session.last_logits is None:
                raise EngineError("nothing_to_run", "the session has no previous output to continue from; give a "
                                  "prompt or input_ids", "prompt")
            recorded = session.recorded(seq.seq) if seq.seq is not None else None
        except EngineError as exc:
            session.running = None
            self.requests.pop((seq.client, seq.rid), None)
            self._output(seq.client, seq.rid).error = exc.to_struct()
            seq.status = SeqStatus.FINISHED
            self._next_in_session(session)
            return
        if recorded is not None:
            self._answer_from_record(seq, recorded)
            return
        seq.slot = session.slot
        seq.steps_before = session.steps
        seq.initial_logits = session.last_logits if seq.num_prompt == 0 else None
        self.scheduler.add(seq)

    def _answer_from_record(self, seq: Sequence, steps: int) -> None:
        """A retry of an append already applied: its steps from the record, nothing run. Sent once every write
        queued before it has landed (the original's among them), as the original's answer would have been."""
        session = seq.session
        session.running = None
        self.requests.pop((seq.client, seq.rid), None)
        seq.status = SeqStatus.FINISHED
        answer = RequestOutput(seq.rid, finish_reason="done", steps=steps, replayed=True)
        self._log_waiters.append(_Waiter(seq.client, answer, session))
        self._next_in_session(session)

    def _must_wait_for_slot(self, session: Session, item) -> bool:
        """Park `item` (a request or an operation of a spilled session) while every slot runs something."""
        if session.slot is None and self.pool.num_free == 0 and not self.sessions.spillable(keep=session):
            session.running = item
            self._awaiting_slot.append(item)
            return True
        return False

    def _session_of(self, item) -> Session:
        return item.session if isinstance(item, Sequence) else self.sessions.sessions[item.session]

    def _resident(self, session: Session, then) -> bool:
        """Make the session resident; True when its state is ready now. Else a replay of the inputs logged after
        its snapshot is scheduled, and `then` (a request or an operation) waits at the front of its queue."""
        replay = self.sessions.make_resident(session)
        if replay is None:
            return True
        seq = Sequence(torch.from_numpy(replay.astype(np.int64) if replay.dtype.kind in "iu" else replay.copy()),
                       slot=session.slot, keep_last_logits=self.model.config.head == "lm", session=session,
                       rid=f"replay-{session.id}", client=INTERNAL)
        seq.steps_before = session.steps - len(replay)  # make_resident counted the replayed steps in
        session.running = seq
        session.queue.appendleft(then)
        self.scheduler.add(seq)
        return False

    def _next_in_session(self, session: Session) -> None:
        while session.queue and not session.is_busy and session.id in self.sessions.sessions:
            item = session.queue.popleft()
            if isinstance(item, SessionOp):
                self._session_op(item, queued=True)
            else:
                self._start_in_session(item)

    def _abort(self, seq: Sequence) -> None:
        session = seq.session
        if seq.fork_of is not None and seq in seq.fork_of.forks:  # its parent's prompt is still running
            seq.fork_of.forks.remove(seq)
            seq.status = SeqStatus.FINISHED
            self.requests.pop((seq.client, seq.rid), None)
            self._output(seq.client, seq.rid).finish_reason = "cancelled"
            return
        if seq in self._awaiting_slot:
            self._awaiting_slot.remove(seq)
            session.running = None
            self.requests.pop((seq.client, seq.rid), None)
            self._output(seq.client, seq.rid).finish_reason = "cancelled"
            self._next_in_session(session)
            return
        if session is not None and seq in session.queue:
            session.queue.remove(seq)
            self.requests.pop((seq.client, seq.rid), None)
            self._output(seq.client, seq.rid).finish_reason = "cancelled"
            return
        if seq.seq is not None and seq.num_fed:
            # a numbered append runs to its end once begun: cut short, its retry could neither be answered from
            # the record (it was not all applied) nor applied again (part of it was)
            return
        seq.is_cancelled = True
        self._finish(seq, "cancelled")

    # -- after a step ------------------------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, result: StepResult, step_id: int | None = None) -> None:
        """What a step brought, stream by stream (the scheduler booked their positions when it scheduled it)."""
        now = time.monotonic()
        # counters once per step, not once per token: they cost microseconds each, times hundreds of streams
        self.metrics.prompt_steps.inc(sum(c.num_tokens for c in batch.chunks[batch.num_decodes:]))
        self.metrics.generation_steps.inc(len(result.sampled))
        last_logits, outputs, sampled = result.last_logits, result.outputs, result.sampled
        prompt_logprobs, logprobs = result.prompt_logprobs, result.logprobs
        finished, on_token = SeqStatus.FINISHED, self._on_token  # this loop runs once per stream per step
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.status is finished:
                continue
            if step_id is not None and seq.in_flight_step == step_id:  # not in a later step launched since
                seq.in_flight_step = seq.ahead_row = None
            if last_logits and seq.id in last_logits:
                seq.initial_logits = last_logits[seq.id]
            if outputs and seq.id in outputs:
                arrays = {kind: t.numpy() for kind, t in outputs[seq.id].items()}
                if not all(np.isfinite(a).all() for a in arrays.values()):
                    self._fail(seq, EngineError("non_finite_output", "the model produced NaN or infinity for "
                                                "this input (its state may hold extreme values)"))
                    continue
                self._mark_output(seq, now, chunk.num_tokens)
                out = self._output(seq.client, seq.rid)
                for kind, a in arrays.items():
                    out.outputs[kind] = Array.of(_join(out.outputs.get(kind), a))
            if not chunk.is_decode:  # what only input chunks can bring
                if prompt_logprobs and seq.id in prompt_logprobs:
                    _extend(self._output(seq.client, seq.rid), "prompt_logprobs", prompt_logprobs[seq.id])
                if seq.forks and chunk.start + chunk.num_tokens >= seq.num_prompt:  # the prompt's last chunk
                    self._fork(seq)
            token = sampled.get(seq.id)
            if token is not None and not seq.is_draining:  # (a token sampled past the end, running ahead: dropped)
                on_token(seq, token, now, logprobs.get(seq.id) if logprobs else None)
            elif seq.num_pending == 0 and seq.in_flight_step is None:
                self._finish(seq, seq.finish_reason or "done")

    def _on_token(self, seq: Sequence, token: int, now: float, logprobs: Logprobs | None = None) -> None:
        # the hot path: once per stream per step
        if seq.first_output_time is None:
            self._mark_output(seq, now, 1)
        else:
            seq.num_outputs_after_first += 1
            seq.last_output_time = now
        output_ids = seq.output_ids
        output_ids.append(token)
        params = seq.sampling
        if (seq.detok is not None and seq.detok.add(token)) or token in params.stop_ids:
            reason = "stop"
        elif len(output_ids) >= params.max_tokens:
            reason = "length"
        else:
            reason = None
        if seq.final_only:
            pass  # its finish carries output_ids whole
        elif logprobs is None and (reason is None or seq.feed_last) \
                and not (self._outputs and seq.key in self._outputs):
            # a plain token, its request's first output this step: two list appends, not a RequestOutput
            tokens = self._tokens.get(seq.client)
            if tokens is None:
                tokens = self._tokens[seq.client] = TokenOutputs([], [])
            tokens.rids.append(seq.rid)
            tokens.token_ids.append(token)
        else:
            out = self._output(seq.client, seq.rid)
            out.token_ids.append(token)
            if logprobs is not None:
                _extend(out, "logprobs", logprobs)
        fed_ahead, seq.fed_ahead = seq.fed_ahead, False  # the step in flight feeds it already
        if reason is None:
            if not fed_ahead:
                seq.pending_token = token
        elif seq.feed_last:  # a session's state covers every token it answered with
            if not fed_ahead:
                seq.pending_token = token
            seq.is_draining = True
            seq.finish_reason = reason
        else:
            if fed_ahead:  # the step in flight fed the token past the end: not one of this request's steps
                seq.num_decoded -= 1
            self._finish(seq, reason)

    def _start_from_logits(self, seq: Sequence) -> None:
        if seq.initial_logits is None or seq.sampling is None:
            self._fail(seq, EngineError("nothing_to_run", "no inputs to run"))
            return
        # on the model's device, as its later steps are: a seeded generator and the sampler's tensors live there
        tokens, logprobs = sample(seq.initial_logits[None].to(self.model.device), [seq])
        self._on_token(seq, tokens[0], time.monotonic(), logprobs.get(0))

    def _mark_output(self, seq: Sequence, now: float, n: int) -> None:
        if seq.first_output_time is None:
            self.metrics.time_to_first_output.observe(now - seq.arrival_time)
            seq.first_output_time = now
        else:
            seq.num_outputs_after_first += n
        seq.last_output_time = now

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.forks:
            self._drop_forks(seq, reason)
        out = self._output(seq.client, seq.rid)
        out.finish_reason, out.num_prompt = reason, seq.num_fed
        if seq.final_only:
            out.token_ids = list(seq.output_ids)
        if seq.slot is not None and seq.status is SeqStatus.RUNNING:
            # known without reading the device (a read would wait for the step, and the engine would no longer run
            # ahead of the GPU): a request's own slot started at zero (a fork's at its parent's prompt), a
            # session's at the steps it had when the request started
            if seq.owns_slot:
                out.steps = seq.num_fed + seq.num_decoded + (seq.fork_of.num_prompt if seq.fork_of is not None else 0)
            elif seq.steps_before is not None:
                out.steps = seq.steps_before + seq.num_fed + seq.num_decoded
            else:
                out.steps = self.pool.steps(seq.slot)
            if seq.want_state and reason != "cancelled":
                out.state = save_snapshot(self.pool.read(seq.slot), self.model.config.name,
                                          self.sessions.fingerprint, seq.initial_logits)
        was_running = seq.status is SeqStatus.RUNNING
        self.scheduler.finish(seq, reason)
        self.requests.pop((seq.client, seq.rid), None)
        if reason != "cancelled":
            hops.mark("en.finish")
            self.metrics.e2e_latency.observe(time.monotonic() - seq.arrival_time)
            if seq.num_outputs_after_first:  # one observation per request: its mean time per output step
                self.metrics.time_per_output_step.observe((seq.last_output_time - seq.first_output_time)
                                                          / seq.num_outputs_after_first)
        if seq.session is not None:
            self._session_request_done(seq, out, was_running)

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        out = self._output(seq.client, seq.rid)
        out.error = error.to_struct()
        if seq.forks:
            self._drop_forks(seq, "error", out.error)
        was_running = seq.status is SeqStatus.RUNNING
        self.scheduler.finish(seq, "error")
        self.requests.pop((seq.client, seq.rid), None)
        if seq.session is not None:
            self._session_request_done(seq, out, was_running)

    def _session_request_done(self, seq: Sequence, out: RequestOutput, was_running: bool) -> None:
        session = seq.session
        if session.running is seq:
            session.running = None
        session.last_used = time.monotonic()
        if session.id not in self.sessions.sessions:
            return
        if seq.client == INTERNAL and out.error is not None:
            self._replay_failed(session, out.error)
            return
        if was_running and session.slot is not None:
            steps_before = session.steps
            session.steps = self.pool.steps(session.slot) if out.steps is None else out.steps
            out.steps = session.steps
            if seq.keep_last_logits and seq.initial_logits is not None:
                session.last_logits = seq.initial_logits
            fed = _fed_inputs(seq)
            numbered = seq.seq if out.error is None and out.finish_reason != "cancelled" else None
            if numbered is not None:
                session.record(numbered, session.steps)
            if seq.client != INTERNAL and len(fed):  # its state moved: on disk before the answer goes out
                self._make_durable(session, steps_before, fed, seq.client, out, numbered)
        self._next_in_session(session)

    def _replay_failed(self, session: Session, error: Error) -> None:
        """Its state in the slot is part-replayed: give the slot back (the next use replays from the snapshot
        again) and fail the request that was waiting for the replay."""
        if session.slot is not None:
            self.sessions.spill(session)
        failure = EngineError("session_unrestorable", f"replaying session {session.id}'s logged inputs failed "
                              f"({error.message}); retry", "session").to_struct()
        if session.queue:
            item = session.queue.popleft()
            if isinstance(item, SessionOp):
                self._replies[item.client].append(Reply(item.rid, ok=False, error=failure))
            else:
                self.requests.pop((item.client, item.rid), None)
                self._output(item.client, item.rid).error = failure
        self._next_in_session(session)

    def _make_durable(self, session: Session, steps_before: int, fed: np.ndarray, client: str, answer,
                      seq: int | None = None) -> None:
        """A log record of the inputs, group-committed with the turn's others: the answer waits for it alone, and a
        record needs nothing from the device, so the engine keeps launching steps while the GPU catches up. Once
        the session's log holds `snapshot_every` steps, a snapshot follows in the background (one at a time per
        session; the store's writer waits for its copy off the device); its landing drops the records it covers.
        The answer waits for a snapshot only where a record would not do: a store without a log, or after a
        failed write (records after a gap would not chain)."""
        if not self.store.supports_log or session.needs_snapshot:
            self._hold(self.sessions.persist(session), client, answer, session, snapshot_steps=session.steps)
            return
        record = LogRecord.of(session.id, steps_before, fed, seq)
        session.log.append(record)
        self._log_batch.append(record)
        self._log_waiters.append(_Waiter(client, answer, session))
        if isinstance(answer, RequestOutput):
            self._outputs.pop((client, answer.rid), None)
        if session.is_clean and session.logged_steps >= self.config.snapshot_every:
            # captured now, while the slot holds exactly session.steps; written after the log record (a shared
            # store's snapshot commit empties the session's log, which must by then hold only what it covers)
            self._snapshots.append((session, self.sessions.capture(session)))

    def _flush_log(self) -> None:
        """One log write (one fsync) for every session answer of this turn (with no records: a barrier that answers
        from records wait on)."""
        if self._log_waiters:
            ticket = self.store.append_log(self._log_batch)
            self._held.setdefault(ticket, []).extend(self._log_waiters)
            self._log_batch, self._log_waiters = [], []
        for session, captured in self._snapshots:
            if self.sessions.sessions.get(session.id) is session:  # else deleted this turn: nothing to write
                self._hold(self.sessions.submit(session, captured), INTERNAL, None, session,
                           snapshot_steps=captured.steps)
        self._snapshots = []
        if self.store.supports_log and self.store.log_bytes > self.config.max_log_bytes and self._rotation is None:
            self._rotation = self.store.rotate_log([r for s in self.sessions.sessions.values() for r in s.log])

    # -- session operations ------------------------------------------------------------------------------------

    def _session_op(self, op: SessionOp, queued: bool = False) -> None:
        client, rid = op.client, op.rid
        try:
            if op.op == "list":
                self._replies[client].append(Reply(rid, info={"sessions": self.sessions.listing(),
                                                              "replica": self.replica_id}))
                return
            if op.op == "create":
                session = self.sessions.create(op.snapshot, op.new_session)
                self._hold(self.sessions.persist(session), client, Reply(rid, session=session.id,
                                                                         steps=session.steps), session,
                           snapshot_steps=session.steps)
                return
            session = self.sessions.get(op.session)
            if not queued and (session.is_busy or session.queue) and op.op != "info":
                if not op.wait_if_busy:
                    raise errors.session_busy(session.id)
                session.queue.append(op)
                return
            if op.op in ("snapshot", "fork") and (self._must_wait_for_slot(session, op)
                                                  or not self._resident(session, op)):
                return  # answered once it has a slot and its logged inputs are replayed
            if op.op == "info":
                reply = Reply(rid, session=session.id, steps=session.steps)
            elif op.op == "snapshot":
                reply = Reply(rid, session=session.id, steps=session.steps, data=self.sessions.snapshot(session))
                self.metrics.snapshot_bytes.observe(len(reply.data))
            elif op.op == "fork":
                child = self.sessions.fork(session, op.new_session)
                self._hold(self.sessions.persist(child), client, Reply(rid, session=child.id, steps=child.steps),
                           child, snapshot_steps=child.steps)
                return
            elif op.op == "delete":
                self._hold(self.sessions.delete(session), client, Reply(rid, session=session.id), None)
                return
            else:
                raise EngineError("invalid_request", f"unknown session operation {op.op!r}", "op")
        except EngineError as exc:
            reply = Reply(rid, ok=False, error=exc.to_struct())
        self._replies[client].append(reply)

    def _hold(self, ticket: int, client: str, answer, session: Session | None,
              snapshot_steps: int | None = None) -> None:
        """Send `answer` once the store has the write `ticket` (durability before the answer)."""
        self._held.setdefault(ticket, []).append(_Waiter(client, answer, session, snapshot_steps))
        if isinstance(answer, RequestOutput):
            self._outputs.pop((client, answer.rid), None)

    def _persisted(self, done: Persisted) -> None:
        if done.ticket == self._rotation:
            self._rotation = None
        for waiter in self._held.pop(done.ticket, []):  # none: a write nobody waits for (a removal)
            failure = done.error
            if done.failed and waiter.session is not None:  # a log write that some sessions' records missed
                failure = done.failed.get(waiter.session.id, failure)
            self._release(waiter, failure)

    def _release(self, waiter: "_Waiter", failure: str | None) -> None:
        client, answer, session = waiter.client, waiter.answer, waiter.session
        if session is not None and waiter.snapshot_steps is not None:
            session.writes_in_flight -= 1
            if failure is None:
                self.sessions.snapshot_landed(session, waiter.snapshot_steps)
        if failure is not None and session is not None:
            # records after a gap would not chain: the session's next write is a snapshot, and only one taken from
            # now on covers the gap (a background one captured before the failure does not)
            session.needs_snapshot, session.needs_snapshot_steps = True, session.steps
        if answer is None:  # a background snapshot: the bookkeeping above was all
            return
        if failure is not None:
            error = Error("state_not_persisted", f"{failure}; the session's state in memory includes this "
                          "request, but it would not survive a restart", "session")
            if isinstance(answer, Reply):
                answer.ok, answer.error = False, error
                if session is not None and answer.session == session.id and session.steps == 0 \
                        and session.id in self.sessions.sessions and not session.is_busy:
                    self.sessions.delete(session)  # a session that could never be saved is not created
            else:
                answer.error = error
        if isinstance(answer, Reply):
            self._replies[client].append(answer)
        else:
            self._outputs[(client, answer.rid)] = _merge(self._outputs.get((client, answer.rid)), answer)

    # -- engine-wide -------------------------------------------------------------------------------------------

    def _utility(self, u: Utility) -> Reply:
        if u.name == "metrics":
            self.refresh_metrics()
            return Reply(u.rid, data=self.metrics.render())
        if u.name == "stats":
            return Reply(u.rid, info=self.stats())
        raise EngineError("invalid_request", f"unknown utility {u.name!r}")

    def stats(self) -> dict:
        return {"pid": os.getpid(), "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "waiting_for_slot": self.scheduler.num_waiting_for_slot, "slots_used": self.pool.num_used,
                "slots_total": self.pool.num_total, "sessions_live": self.sessions.num_live,
                "sessions_spilled": self.sessions.num_spilled, "num_steps": self.num_steps,
                "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
                "state_dir": str(self.store.directory), "state_store_error": self.store.error,
                "async_scheduling": self.async_scheduling}

    def refresh_metrics(self) -> None:
        s = self.stats()
        m = self.metrics
        m.requests_running.set(s["running"])
        m.requests_waiting.set(s["waiting"])
        m.slots_used.set(s["slots_used"])
        m.slots_total.set(s["slots_total"])
        m.sessions_live.set(s["sessions_live"])
        m.sessions_spilled.set(s["sessions_spilled"])
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        reserved = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
        m.gpu_memory.labels("allocated").set(allocated)
        m.gpu_memory.labels("reserved").set(reserved)
        variants = compiled_variants()
        grew = sorted(name for name, n in variants.items() if n > self._compiled.get(name, n))
        if grew:  # a step waited for the compiler: a layout class the warm-up missed (runner.warm_up_kernels)
            log.warning("Triton compiled new variants of %s while serving", ", ".join(grew))
        self._compiled = variants
        m.kernels_compiled.set(sum(variants.values()))

    def shutdown(self) -> None:
        """Finish what is queued for the disk; every resident session's last state is already there."""
        self.collect()
        self.store.stop()
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, Persisted):
                self._persisted(message)

    def _output(self, client: str, rid: str) -> RequestOutput:
        out = self._outputs.get((client, rid))
        if out is None:
            out = self._outputs[(client, rid)] = RequestOutput(rid)
        return out


def _sampling(s: Sampling, eos_id: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              seed=s.seed, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                              ignore_eos=s.ignore_eos, logit_bias=dict(s.logit_bias),
                              repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                              frequency_penalty=s.frequency_penalty, min_tokens=s.min_tokens, logprobs=s.logprobs,
                              eos_id=eos_id)
    except ValueError as exc:
        raise EngineError("invalid_field", str(exc), str(exc).split(":")[0]) from None


def _extend(out: RequestOutput, name: str, more: Logprobs) -> None:
    """Add a step's logprobs to what the output holds already this step."""
    current = getattr(out, name)
    if current is None:
        setattr(out, name, Logprobs(list(more.chosen), list(more.top_ids), list(more.top_logprobs)))
    else:
        current.extend(more)


def _join(previous: Array | None, new: np.ndarray) -> np.ndarray:
    return new if previous is None else np.concatenate([previous.numpy(), new])


def _merge(current: RequestOutput | None, held: RequestOutput) -> RequestOutput:
    """A held finish joins whatever the same request has produced since (nothing, as it has finished)."""
    if current is None:
        return held
    current.token_ids = held.token_ids + current.token_ids
    for name in ("finish_reason", "error", "steps", "num_prompt", "state", "replayed"):
        if getattr(held, name) not in (None, 0):
            setattr(current, name, getattr(held, name))
    return current


def _fed_inputs(seq: Sequence) -> np.ndarray:
    """What a request fed into its stream: its inputs, then the generated tokens that were fed back."""
    prompt = seq.inputs[:seq.num_fed].numpy()
    if not seq.num_decoded:
        return prompt
    return np.concatenate([prompt.astype(np.int64), np.asarray(seq.output_ids[:seq.num_decoded], np.int64)])
