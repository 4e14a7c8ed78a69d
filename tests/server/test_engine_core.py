"""The engine core alone, with a fake runner: no HTTP, no sockets, no model arithmetic. Scheduling across steps,
waiting requests, aborts, busy sessions, queue limits and write-through durability."""
from __future__ import annotations

import errno

import numpy as np
import torch

from server.config import ServerConfig
from server.engine.core import EngineCore
from server.engine.protocol import Abort, Add, Array, Sampling, SessionOp, Utility
from server.engine import store as store_module
from server.engine.runner import LaunchedStep, ModelRunner, StepResult
from server.engine.wal import LogWriter
from tests.server.conftest import tiny_lm

VOCAB = 260


class FakeRunner:
    """Advances each slot's step count like the model would; 'logits' of a step is its position in the stream;
    the sampled token is (last fed token + 1) mod vocab, so a generate's tokens are predictable."""

    def __init__(self, pool):
        self.pool = pool
        self.num_runs = 0
        self.fail_next = False
        self.last_sampled = None

    def run(self, batch) -> StepResult:
        return self.collect(self.launch(batch))

    def launch(self, batch) -> LaunchedStep:
        """As ModelRunner.launch: the sampled tokens stay in the step (a host tensor here) until collect()."""
        self.pool.zero_allocated()
        self.num_runs += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        result = StepResult()
        sampled = {}
        for chunk in batch.chunks:
            seq, steps = chunk.seq, self.pool.state.steps
            start = int(steps[seq.slot])
            steps[seq.slot] += chunk.num_tokens
            if chunk.is_decode:
                last = chunk.token if chunk.from_row < 0 else int(self.last_sampled[chunk.from_row])
            else:
                last = int(seq.inputs[chunk.start + chunk.num_tokens - 1])
            if seq.outputs and not chunk.is_decode:
                positions = torch.arange(start, start + chunk.num_tokens, dtype=torch.float32)[:, None]
                result.outputs[seq.id] = {kind: positions for kind in seq.outputs}
            logits = torch.zeros(VOCAB)
            logits[(last + 1) % VOCAB] = 1.0
            if seq.keep_last_logits:
                result.last_logits[seq.id] = logits
            if seq.is_generating and chunk.start + chunk.num_tokens >= seq.num_prompt:
                sampled[seq] = (last + 1) % VOCAB
        step = LaunchedStep(batch, result, list(sampled))
        self.last_sampled = step.tokens = torch.tensor(list(sampled.values()), dtype=torch.long)
        step.host = step.tokens
        return step

    def collect(self, step: LaunchedStep) -> StepResult:
        return ModelRunner.collect(self, step)


def make_core(tmp_path, **config) -> EngineCore:
    config = {"max_num_streams": 4, "max_num_batched_tokens": 8, **config}
    config.setdefault("max_num_prefill_tokens", config["max_num_batched_tokens"])  # one budget, easy to reason on
    config = ServerConfig(**config)
    model = tiny_lm()
    core = EngineCore(model, None, config, str(tmp_path / "sessions"), runner=object())
    core.runner = FakeRunner(core.pool)
    # off at construction (the placeholder runner launches nothing); "auto" runs the fake async, as the GPU would
    core.async_scheduling = config.async_scheduling in (True, "auto")
    return core


def add(core, rid, ids, client="c", **fields):
    core.inbox.put(Add(client, rid, Array.of(np.asarray(ids, dtype=np.int64)), **fields))


def op(core, rid, name, session=None, client="c", **fields):
    core.inbox.put(SessionOp(client, rid, name, session, **fields))


def run_until_quiet(core, max_turns=200) -> dict:
    """Run turns until nothing is left; every output and reply by rid, in order."""
    outputs, replies = {}, {}
    for _ in range(max_turns):
        for batch in core.run_once(timeout=0.01).values():
            for out in batch.request_outputs():
                outputs.setdefault(out.rid, []).append(out)
            for reply in batch.replies:
                replies[reply.rid] = reply
        if not core.has_work() and core.inbox.empty() and not core._held:
            break
    return {"outputs": outputs, "replies": replies}


def finish_of(outs):
    return [o for o in outs if o.finish_reason is not None or o.error is not None][-1]


def test_long_inputs_are_chunked_and_outputs_come_per_step(tmp_path):
    core = make_core(tmp_path)
    add(core, "a", list(range(20)), outputs=["logits"])
    got = run_until_quiet(core)["outputs"]["a"]
    chunks = [o.outputs["logits"].numpy()[:, 0].tolist() for o in got if o.outputs]
    assert [len(c) for c in chunks] == [8, 8, 4]  # the step budget splits the input
    assert sum(chunks, []) == list(range(20))
    assert finish_of(got).finish_reason == "done" and finish_of(got).steps == 20
    assert core.pool.num_used == 0


def test_requests_wait_for_slots_and_are_admitted_in_order(tmp_path):
    core = make_core(tmp_path, max_num_streams=2, max_num_batched_tokens=2)
    for i in range(5):
        add(core, f"r{i}", [1, 2, 3], sampling=Sampling(max_tokens=2, temperature=0))
    core.run_once(timeout=0.01)
    assert core.pool.num_used == 2 and core.scheduler.num_waiting == 3
    outs = run_until_quiet(core)["outputs"]
    finished_order = sorted(outs, key=lambda rid: int(rid[1:]))
    assert all(finish_of(outs[r]).finish_reason == "length" for r in finished_order)
    assert all(sum((o.token_ids for o in outs[r]), []) == [4, 5] for r in outs)
    assert core.pool.num_used == 0


def test_a_final_only_request_sends_nothing_until_its_finish_which_holds_every_token(tmp_path):
    """A non-streamed answer that follows no token (protocol.Add.final_only) costs the engine no per-step message:
    its only output is the finish, with the same tokens as a request that reports each step; a request that asks
    for logprobs, or a session's, is answered step by step whatever it says."""
    core = make_core(tmp_path, max_num_batched_tokens=4)
    sampling = Sampling(max_tokens=5, temperature=0)
    add(core, "each", [7, 8, 9], sampling=sampling)
    add(core, "final", [7, 8, 9], sampling=sampling, final_only=True)
    add(core, "stopped", [7, 8, 9], sampling=Sampling(max_tokens=5, temperature=0, stop_token_ids=[12]),
        final_only=True)
    add(core, "logprobs", [7, 8, 9], sampling=Sampling(max_tokens=3, temperature=0, logprobs=0), final_only=True)
    outs = run_until_quiet(core)["outputs"]
    each = sum((o.token_ids for o in outs["each"]), [])
    assert each == [10, 11, 12, 13, 14] and len([o for o in outs["each"] if o.token_ids]) == 5
    assert len(outs["final"]) == 1 and outs["final"][0].token_ids == each
    assert outs["final"][0].finish_reason == "length" and outs["final"][0].steps == finish_of(outs["each"]).steps
    assert len(outs["stopped"]) == 1 and outs["stopped"][0].token_ids == [10, 11, 12]
    assert outs["stopped"][0].finish_reason == "stop"
    assert len([o for o in outs["logprobs"] if o.token_ids]) == 3
    assert core.pool.num_used == 0


def test_queue_full_is_refused_and_others_are_unharmed(tmp_path):
    core = make_core(tmp_path, max_num_streams=1, max_num_batched_tokens=1, max_queue=1)
    add(core, "r0", [1, 2], sampling=Sampling(max_tokens=1, temperature=0))
    first = core.run_once(timeout=0.01)  # r0 holds the only slot
    assert core.pool.num_used == 1 and not first
    for i in (1, 2):  # r1 waits; the queue is then full for r2
        add(core, f"r{i}", [1, 2], sampling=Sampling(max_tokens=1, temperature=0))
    outs = run_until_quiet(core)["outputs"]
    errors = [r for r in outs if finish_of(outs[r]).error is not None]
    assert errors == ["r2"] and finish_of(outs["r2"]).error.code == "queue_full"
    assert all(finish_of(outs[r]).finish_reason == "length" for r in ("r0", "r1"))


def test_abort_frees_the_slot_and_says_cancelled(tmp_path):
    core = make_core(tmp_path, max_num_batched_tokens=4)
    add(core, "long", list(range(100)))
    core.run_once(timeout=0.01)
    assert core.pool.num_used == 1
    core.inbox.put(Abort("c", "long"))
    outs = run_until_quiet(core)["outputs"]["long"]
    assert finish_of(outs).finish_reason == "cancelled" and core.pool.num_used == 0


def test_a_failed_step_fails_only_what_ran_and_the_engine_keeps_serving(tmp_path):
    core = make_core(tmp_path)
    core.runner.fail_next = True
    add(core, "a", [1, 2, 3])
    outs = run_until_quiet(core)["outputs"]
    assert finish_of(outs["a"]).error.code == "internal_error"
    add(core, "b", [1, 2, 3])
    assert finish_of(run_until_quiet(core)["outputs"]["b"]).finish_reason == "done"
    assert core.pool.num_used == 0


def test_busy_session_refuses_or_queues_in_order(tmp_path):
    core = make_core(tmp_path, max_num_batched_tokens=4)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    add(core, "a1", list(range(10)), session=sid, outputs=["logits"])
    add(core, "a2", [7], session=sid)  # busy, no waiting: refused
    add(core, "a3", list(range(5)), session=sid, outputs=["logits"], wait_if_busy=True)
    op(core, "snap", "snapshot", sid, wait_if_busy=True)
    got = run_until_quiet(core)
    outs = got["outputs"]
    assert finish_of(outs["a2"]).error.code == "session_busy"
    positions = [o.outputs["logits"].numpy()[:, 0].tolist() for r in ("a1", "a3") for o in outs[r] if o.outputs]
    assert sum(positions, []) == list(range(15))  # a3 ran after a1, in the same stream
    assert finish_of(outs["a3"]).steps == 15
    assert got["replies"]["snap"].steps == 15  # the snapshot waited for both appends


def test_session_answers_wait_for_the_disk_and_report_a_failed_write(tmp_path, monkeypatch):
    core = make_core(tmp_path)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    assert core.store.path(sid).is_file()  # created = on disk before the answer
    add(core, "a", [1, 2, 3], session=sid)
    core.run_once(timeout=0.01)
    if core.running_ahead:  # async scheduling: the step is read back on the next turn
        core.run_once(timeout=0)
    assert core._held and len(core.sessions.get(sid).log) == 1  # the finish waits for its log record
    run_until_quiet(core)
    assert not core._held
    assert [r.array().tolist() for r in core.store.read_log()] == [[1, 2, 3]]
    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "atomic_write", disk_full)
    monkeypatch.setattr(LogWriter, "append", lambda self, data: disk_full(None, data))
    add(core, "b", [4], session=sid)
    outs = run_until_quiet(core)["outputs"]["b"]
    assert finish_of(outs).error.code == "state_not_persisted" and "disk is full" in finish_of(outs).error.message
    assert core.store.error is not None  # /health reports it until a write succeeds again
    op(core, "create2", "create")
    reply = run_until_quiet(core)["replies"]["create2"]
    assert not reply.ok and reply.error.code == "state_not_persisted"
    assert len(core.sessions.sessions) == 1  # a session that could not be saved was not created
    monkeypatch.undo()
    add(core, "c", [5], session=sid)
    assert finish_of(run_until_quiet(core)["outputs"]["c"]).steps == 5 and core.store.error is None
    # after the failed write a record of [5] would not chain to what is stored (step 3): a snapshot was written
    assert core.sessions.get(sid).log == [] and core.store.persisted_sessions()[sid] == 5
    again = make_core(tmp_path)
    again.sessions.pick_up_persisted()
    assert again.sessions.get(sid).steps == 5


def test_idle_sessions_give_their_slots_to_waiting_requests(tmp_path):
    core = make_core(tmp_path, max_num_streams=2, max_num_batched_tokens=2)
    for i in range(2):
        op(core, f"s{i}", "create")
    sids = [r.session for r in run_until_quiet(core)["replies"].values()]
    assert core.pool.num_free == 0
    add(core, "x", [1, 2, 3], sampling=Sampling(max_tokens=2, temperature=0))
    outs = run_until_quiet(core)["outputs"]["x"]
    assert finish_of(outs).finish_reason == "length"
    assert core.sessions.num_spilled >= 1
    add(core, "back", [5], session=sids[0])  # a spilled session comes back into a slot
    assert finish_of(run_until_quiet(core)["outputs"]["back"]).steps == 1


def test_session_limit_holds_for_simultaneous_creates(tmp_path):
    core = make_core(tmp_path, max_num_sessions=3)
    for i in range(10):
        op(core, f"s{i}", "create")
    replies = run_until_quiet(core)["replies"].values()
    assert sum(r.ok for r in replies) == 3
    assert {r.error.code for r in replies if not r.ok} == {"too_many_sessions"}


def test_stats_and_metrics_utilities(tmp_path):
    core = make_core(tmp_path)
    core.inbox.put(Utility("c", "u1", "stats"))
    core.inbox.put(Utility("c", "u2", "metrics"))
    replies = run_until_quiet(core)["replies"]
    assert replies["u1"].info["slots_total"] == 4
    assert b"infomamba:state_slots_total" in replies["u2"].data


def test_logged_inputs_survive_a_crash_and_replay_on_first_use(tmp_path):
    core = make_core(tmp_path)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    for i, n in enumerate((3, 5, 2)):
        add(core, f"a{i}", list(range(n)), session=sid, wait_if_busy=True)
    run_until_quiet(core)
    assert core.sessions.get(sid).logged_steps == 10 and len(core.store.read_log()) >= 1
    # a crash: no shutdown, nothing more written; a new engine on the same directory
    again = make_core(tmp_path)
    assert again.sessions.pick_up_persisted() == 1
    assert again.sessions.get(sid).steps == 10 and again.sessions.get(sid).slot is None
    runs_before = again.runner.num_runs
    add(again, "more", [9], session=sid)
    outs = run_until_quiet(again)["outputs"]
    assert finish_of(outs["more"]).steps == 11  # the snapshot (0 steps) + 10 replayed + 1
    assert again.runner.num_runs > runs_before + 1 and set(outs) == {"more"}  # the replay ran and said nothing


def test_long_logs_become_snapshots_and_rotation_compacts(tmp_path):
    core = make_core(tmp_path, snapshot_every=12, max_log_bytes=200)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    for i in range(6):
        add(core, f"a{i}", [1, 2, 3, 4, 5], session=sid)
        run_until_quiet(core)
    session = core.sessions.get(sid)
    assert session.logged_steps < 12  # a snapshot took the log over
    segments = sorted(p.name for p in core.store.directory.glob("wal-*.log"))
    assert len(segments) == 1 and segments[0] != "wal-00000001.log"  # rotated, the old segments gone
    again = make_core(tmp_path)
    again.sessions.pick_up_persisted()
    assert again.sessions.get(sid).steps == 30


def test_a_failed_replay_fails_the_waiting_request_and_the_next_one_replays_again(tmp_path):
    core = make_core(tmp_path)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    add(core, "a", list(range(6)), session=sid)
    run_until_quiet(core)
    again = make_core(tmp_path)  # after a crash
    again.sessions.pick_up_persisted()
    again.runner.fail_next = True  # the replay's step fails
    add(again, "b", [1], session=sid)
    outs = run_until_quiet(again)["outputs"]
    assert finish_of(outs["b"]).error.code == "session_unrestorable"
    session = again.sessions.get(sid)
    assert session.steps == 6 and session.slot is None  # nothing half-replayed was kept
    add(again, "c", [1], session=sid)
    assert finish_of(run_until_quiet(again)["outputs"]["c"]).steps == 7


def test_a_slow_disk_writes_the_newest_snapshot_of_a_session_and_reports_every_ticket(tmp_path, monkeypatch):
    from server.engine.store import SessionStore, _Job

    model = tiny_lm()
    written = []
    real_write = store_module.atomic_write
    monkeypatch.setattr(store_module, "atomic_write", lambda path, data: (written.append(path.name),
                                                                          real_write(path, data)))
    store = SessionStore(tmp_path, "tiny-lm", model.fingerprint(), lambda done: None)
    states = [model.empty_state(1) for _ in range(4)]
    for i, state in enumerate(states):
        state.steps[0] = 10 * (i + 1)
    # queued while the writer was busy: a, a, b, a, then a delete of b and a newer snapshot of b
    jobs = [_Job(1, "a", states[0]), _Job(2, "a", states[1]), _Job(3, "b", states[2]), _Job(4, "a", states[3]),
            _Job(5, "b", None), _Job(6, "b", states[0])]
    done = store._apply_batch(jobs)
    assert [d.ticket for d in done] == [3, 1, 2, 4, 5, 6]  # a's older tickets reported when its newest landed
    assert all(d.error is None for d in done)
    assert written == ["b.state.safetensors", "a.state.safetensors", "b.state.safetensors"]
    assert store.persisted_sessions() == {"a": 40, "b": 10}


def test_n_samples_fork_the_state_after_the_prompt_and_cancel_with_it(tmp_path):
    core = make_core(tmp_path)  # 4 slots, 8 input steps per engine step: the prompt takes three steps
    sampling = Sampling(max_tokens=3, temperature=0)
    add(core, "a", list(range(20)), sampling=sampling, n=3)
    outs = run_until_quiet(core)["outputs"]
    for rid in ("a", "a.1", "a.2"):  # each sample continues from the prompt's state (20 steps), then 2 decodes
        assert sum((o.token_ids for o in outs[rid]), []) == [20, 21, 22]
        assert finish_of(outs[rid]).finish_reason == "length" and finish_of(outs[rid]).steps == 22
    assert core.metrics.registry.get_sample_value("infomamba:prompt_tokens_total") == 20  # the prompt ran once
    assert core.pool.num_used == 0
    add(core, "b", list(range(20)), sampling=sampling, n=3)
    core.run_once(timeout=0.01)
    core.inbox.put(Abort("c", "b.2"))  # a fork cancelled while the prompt runs never starts
    outs = run_until_quiet(core)["outputs"]
    assert finish_of(outs["b.2"]).finish_reason == "cancelled" and not sum((o.token_ids for o in outs["b.2"]), [])
    assert sum((o.token_ids for o in outs["b.1"]), []) == [20, 21, 22]
    add(core, "d", list(range(20)), sampling=sampling, n=2)
    core.run_once(timeout=0.01)
    core.inbox.put(Abort("c", "d"))  # the prompt's request cancelled: its forks go with it
    outs = run_until_quiet(core)["outputs"]
    assert finish_of(outs["d.1"]).finish_reason == "cancelled" and finish_of(outs["d"]).finish_reason == "cancelled"
    assert core.pool.num_used == 0 and not core.requests


def make_real_core(tmp_path, **config) -> EngineCore:
    """The engine with the real runner and model (tiny, on the CPU), for tests of what the state holds."""
    config = ServerConfig(**{"max_num_streams": 4, "max_num_batched_tokens": 64, **config})
    return EngineCore(tiny_lm(), None, config, str(tmp_path / "sessions"))


def test_a_long_append_is_logged_frame_by_frame_and_a_restart_replays_it_exactly(tmp_path):
    """Issue 14: frames larger than the state were each snapshotted (a copy off the GPU, a sync, per frame). Now
    every frame is answered on its log record, snapshots follow every snapshot_every logged steps, and an engine
    started on the same directory replays the log to the same state."""
    from model.state import state_nbytes_per_stream

    config = dict(max_num_prefill_tokens=4096, snapshot_every=2048)
    core = make_real_core(tmp_path, **config)
    frame, num_frames = 1024, 5
    # the old rule's case: the frame's ids (int64 in the engine) outweigh the state
    assert frame * 8 >= state_nbytes_per_stream(core.model.config, core.model.dtype)
    writes, records = [], []
    real_write, real_append = core.store.write, core.store.append_log
    core.store.write = lambda sid, *args, **kw: (writes.append(sid), real_write(sid, *args, **kw))[1]
    core.store.append_log = lambda batch: (records.extend(batch), real_append(batch))[1]
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, VOCAB, frame) for _ in range(num_frames)]
    for i, ids in enumerate(frames):
        add(core, f"f{i}", ids, session=sid, wait_if_busy=True)
    outs = run_until_quiet(core)["outputs"]
    assert [finish_of(outs[f"f{i}"]).steps for i in range(num_frames)] == [frame * (i + 1) for i in range(5)]
    assert [r.steps_before for r in records] == [frame * i for i in range(num_frames)]  # each frame, logged
    # the create's snapshot, then one each time the log reached 2048 steps (after frames 2 and 4), not one a frame
    assert writes == [sid] * 3
    assert core.sessions.get(sid).logged_steps == frame and core.store.persisted_sessions()[sid] == 4 * frame

    again = make_real_core(tmp_path, **config)  # a crash: nothing more written; a new engine, same directory
    again.sessions.pick_up_persisted()
    assert again.sessions.get(sid).steps == num_frames * frame
    for engine in (core, again):
        add(engine, "more", [7, 8, 9], session=sid, outputs=["logits"])
    got = [run_until_quiet(engine)["outputs"]["more"] for engine in (core, again)]
    assert finish_of(got[0]).steps == finish_of(got[1]).steps == num_frames * frame + 3
    logits = [np.concatenate([o.outputs["logits"].numpy() for o in outs if o.outputs]) for outs in got]
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)
    states = [engine.pool.read(engine.sessions.get(sid).slot).tensors() for engine in (core, again)]
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_a_background_snapshot_holds_no_answer_and_runs_one_at_a_time(tmp_path):
    from server.engine.store import Persisted

    core = make_core(tmp_path, snapshot_every=4)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    deferred = []  # snapshot writes that never land until the test says so

    def write(sid, state, last_logits, metadata=None, ready=None):
        core.store._tickets += 1
        deferred.append((core.store._tickets, int(state.steps[0])))
        return core.store._tickets

    core.store.write = write

    def no_device_reads(slot):
        raise AssertionError("a session request's steps are counted on the host, not read from the device")

    core.pool.steps = no_device_reads
    for i in range(4):
        add(core, f"a{i}", [1, 2, 3], session=sid, wait_if_busy=True)
    finished = {}
    for _ in range(50):
        for batch in core.run_once(timeout=0.01).values():
            finished.update({o.rid: o for o in batch.request_outputs() if o.finish_reason or o.error})
        if len(finished) == 4:
            break
    assert [finished[f"a{i}"].steps for i in range(4)] == [3, 6, 9, 12]  # answered on their log records alone
    assert all(finished[f"a{i}"].error is None for i in range(4))
    session = core.sessions.get(sid)
    assert deferred == [(deferred[0][0], 6)] and session.writes_in_flight == 1  # one at a time, taken at step 6
    assert session.logged_steps == 12
    assert session not in core.sessions.spillable()  # its slot stays until the snapshot lands
    core.handle(Persisted(deferred[0][0], sid))
    assert session.writes_in_flight == 0 and [r.steps_before for r in session.log] == [6, 9]


def test_only_a_snapshot_captured_after_a_failed_write_clears_the_need_for_one():
    from server.engine.sessions import Session, SessionTable

    session = Session("s", needs_snapshot=True, needs_snapshot_steps=10)
    SessionTable.snapshot_landed(None, session, 6)  # a background snapshot taken before the failure
    assert session.needs_snapshot
    SessionTable.snapshot_landed(None, session, 10)
    assert not session.needs_snapshot


def test_queued_log_appends_share_one_fsync_and_a_snapshot_waits_for_its_device_copy(tmp_path, monkeypatch):
    from server.engine import wal
    from server.engine.store import SessionStore, _Job
    from server.engine.wal import LogRecord

    model = tiny_lm()
    order = []
    real_append = LogWriter.append
    monkeypatch.setattr(LogWriter, "append", lambda self, data: (order.append("fsync"), real_append(self, data)))
    real_write = store_module.atomic_write
    monkeypatch.setattr(store_module, "atomic_write", lambda path, data: (order.append("snapshot"),
                                                                          real_write(path, data)))

    class Event:  # stands in for the CUDA event after the copy off the device
        def synchronize(self):
            order.append("waited")

    store = SessionStore(tmp_path, "tiny-lm", model.fingerprint(), lambda done: None)
    records = [LogRecord.of("a", 3 * i, np.arange(3)) for i in range(4)]
    jobs = [_Job(i + 1, "", None, log=wal.encode([r])) for i, r in enumerate(records[:3])]
    jobs += [_Job(4, "a", model.empty_state(1), ready=Event()), _Job(5, "", None, log=wal.encode(records[3:]))]
    done = store._apply_batch(jobs)
    assert [d.ticket for d in done] == [1, 2, 3, 4, 5] and all(d.error is None for d in done)
    assert order == ["fsync", "waited", "snapshot", "fsync"]  # three appends in one write
    assert [r.steps_before for r in store.read_log()] == [0, 3, 6, 9]


def test_a_steps_slots_start_on_16_bytes_whatever_the_batch():
    # Triton compiles a kernel variant per pointer alignment (kernels.packing.aligned)
    from server.engine.runner import ModelRunner
    from server.engine.state_pool import StatePool

    model = tiny_lm()
    runner = ModelRunner(model, StatePool(model, 8), cuda_graphs=False)
    for n in range(1, 7):
        starts = list(range(n + 1))
        _, cu_seqlens, slots = runner._to_device([torch.zeros(n, dtype=torch.long)], starts, list(range(n)))
        assert slots.storage_offset() % 4 == 0
        assert cu_seqlens.tolist() == starts and slots.tolist() == list(range(n))


def test_the_loop_sends_a_steps_outputs_while_the_next_step_runs_and_at_once_when_idle(tmp_path, monkeypatch):
    from server.engine.process import EngineLoop

    core = make_core(tmp_path, async_scheduling=False)  # each step read back at once (async: the test below)
    runner = core.runner
    plain_run = runner.run

    def run(batch):  # as ModelRunner: the hook fires once the step is launched, before its results are read
        runner.while_launched()
        return plain_run(batch)

    runner.run = run
    loop = EngineLoop(core, f"ipc://{tmp_path}/engine.sock")
    assert runner.while_launched == loop._send_pending
    sent = []  # (steps finished when sent, the rids with outputs in it)
    monkeypatch.setattr(loop, "_send", lambda by_client: sent.append(
        (runner.num_runs, sorted(o.rid for out in by_client.values() for o in out.request_outputs()))))
    core.handle(Add("c", "a", Array.of(np.array([5], np.int64)), sampling=Sampling(max_tokens=3, temperature=0)))
    for _ in range(5):
        loop.turn()
    # step 1's token goes out once step 2 is launched (one step finished), step 2's during step 3, and step 3's
    # (the last) at once: the engine is idle then, and its loop may sleep
    assert [s for s in sent if s[1]] == [(1, ["a"]), (2, ["a"]), (3, ["a"])]
    assert not core.has_work()
    loop.close()


def test_async_scheduling_launches_each_step_before_reading_the_last_and_the_loop_sends_at_once(tmp_path,
                                                                                               monkeypatch):
    from server.engine.process import EngineLoop

    core = make_core(tmp_path)
    runner = core.runner
    loop = EngineLoop(core, f"ipc://{tmp_path}/engine.sock")
    sent = []  # (steps launched when sent, the rids with outputs in it)
    monkeypatch.setattr(loop, "_send", lambda by_client: sent.append(
        (runner.num_runs, sorted(o.rid for out in by_client.values() for o in out.request_outputs()))))
    core.handle(Add("c", "a", Array.of(np.array([5], np.int64)), sampling=Sampling(max_tokens=3, temperature=0)))
    for _ in range(5):
        loop.turn()
    # step N's token is read and sent once step N + 1 is launched; the last step is read on the turn after it,
    # when nothing is left to launch
    assert [s for s in sent if s[1]] == [(2, ["a"]), (3, ["a"]), (3, ["a"])]
    assert not core.has_work()
    loop.close()


def test_the_runner_is_given_the_schedulers_token_budget_which_covers_every_streams_decode(tmp_path, monkeypatch):
    """With an auto-sized pool (max_num_streams 0), max_num_batched_tokens below its streams grows to cover one
    decode each; the runner sizes its prefill graphs by what the scheduler will really hand it (the configured 16
    left no graph bucket, and on a GPU the engine then failed at start)."""
    from server.engine import core as core_module
    from server.engine.prefill_graphs import buckets

    seen = {}

    class Recording:
        def __init__(self, model, pool, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(core_module, "ModelRunner", Recording)
    config = ServerConfig(max_num_streams=0, max_num_batched_tokens=16)
    core = EngineCore(tiny_lm(), None, config, str(tmp_path / "sessions"))
    streams = core.pool.num_total
    assert streams >= 64 and core.scheduler.max_num_batched_tokens == streams
    assert seen["max_num_batched_tokens"] == streams
    assert buckets(64, 16) == [] and buckets(64, streams)  # the configured budget alone fits no bucket
