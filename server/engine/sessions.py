"""Sessions: named streams whose state the engine carries between requests. Owned by the engine loop alone, so
spill, restore, append, generate, fork, snapshot and delete of one session can never interleave: a request that
finds its session busy waits in the session's own queue (websocket pipelining) or is refused.

Durability: every change of a session's state is on disk before the request that made it is answered, as a
snapshot (create, fork) or as a write-ahead log record of the inputs fed since (server/engine/wal.py). A record
needs nothing from the device, so answering an append never waits for the GPU. Once a session has logged
`snapshot_every` steps, a snapshot follows in the background (one at a time per session, nobody waiting for it):
its copy is queued on the device behind the steps that wrote the state, and the store's writer waits for that
copy, not the engine thread. The engine keeps each session's unsnapshotted records in memory too, so a session can give
its slot back at any time without a write (spilling is freeing the slot); coming back, it loads its snapshot and
replays the records after it. A shared store (server/engine/redis_store.py) keeps each session's records itself
and hands them over with the snapshot, so another replica can take the session over.

Idempotent appends: an append may carry the client's sequence number (`seq`, increasing per session). The last
MAX_NUM_APPLIED numbers applied, each with the session's steps after it, travel in the snapshot's metadata and in
the log records, so a retried append (its answer lost with a dying replica, say) is answered from that record
wherever the session is loaded next, instead of being applied twice."""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from model.state import SnapshotError, StreamState, read_snapshot, save_snapshot, snapshot_metadata
from server.engine import errors
from server.engine.errors import EngineError
from server.engine.state_pool import StatePool
from server.engine.store import SessionStore
from server.engine.wal import LogRecord

log = logging.getLogger("infomamba.sessions")
MAX_NUM_APPLIED = 64  # sequence numbers remembered per session: a websocket's frames in flight (api/ws.py) and more
APPLIED_META = "infomamba_applied_seqs"  # stored snapshots' metadata entry: [[seq, steps after], ...]


@dataclass(eq=False)
class Session:
    id: str
    slot: int | None = None  # None: not resident (its state is in the store)
    steps: int = 0
    last_logits: torch.Tensor | None = None  # (vocab,) the last step's logits, to generate without a prompt
    running: object = None  # the request running in it now
    queue: deque = field(default_factory=deque)  # requests waiting their turn, in arrival order
    last_used: float = field(default_factory=time.monotonic)
    writes_in_flight: int = 0  # snapshots submitted to the store and not yet on disk
    log: list[LogRecord] = field(default_factory=list)  # inputs fed since the snapshot on disk, in order
    applied: list[tuple[int, int]] = field(default_factory=list)  # (seq, steps after it) of the last appends
    needs_snapshot: bool = False  # a write of its failed: the stored copy may miss steps that no record will bring
    needs_snapshot_steps: int = 0  # ... and a snapshot of fewer steps than this (captured before) does not bring them

    @property
    def logged_steps(self) -> int:
        return sum(r.num_steps for r in self.log)

    def recorded(self, seq: int) -> int | None:
        """The steps after the append numbered `seq` if it was applied (a retry), None if it is new; an
        EngineError if it can be neither (not above the last applied number, and not remembered)."""
        for number, steps in reversed(self.applied):
            if number == seq:
                return steps
        if self.applied and seq <= self.applied[-1][0]:
            raise EngineError("invalid_seq", f"seq {seq} is not above the session's last applied seq "
                              f"{self.applied[-1][0]} and is not among its last {len(self.applied)} appends; "
                              "number appends with increasing seq", "seq")
        return None

    def record(self, seq: int, steps: int) -> None:
        self.applied.append((seq, steps))
        del self.applied[:-MAX_NUM_APPLIED]

    @property
    def is_busy(self) -> bool:
        return self.running is not None

    @property
    def is_clean(self) -> bool:
        """No snapshot write in flight: the file on disk plus `log` is the session (its slot may go)."""
        return self.writes_in_flight == 0


@dataclass(slots=True)
class Captured:
    """A session's state copied for a snapshot: host tensors, to be read once `ready` has happened (None: now)."""

    steps: int
    state: StreamState
    last_logits: torch.Tensor | None
    metadata: dict[str, str] | None
    ready: torch.cuda.Event | None = None


class SessionTable:
    def __init__(self, pool: StatePool, model, store: SessionStore, max_num_sessions: int, ttl: float):
        self.pool = pool
        self.config = model.config
        self.dtype = model.dtype
        self.fingerprint = model.fingerprint()
        self.store = store
        self.max_num_sessions = max_num_sessions
        self.ttl = ttl
        self.sessions: dict[str, Session] = {}

    @property
    def num_live(self) -> int:
        return sum(1 for s in self.sessions.values() if s.slot is not None)

    @property
    def num_spilled(self) -> int:
        return len(self.sessions) - self.num_live

    def pick_up_persisted(self) -> int:
        """Register every session the store holds, with the logged inputs after its snapshot (restored lazily on
        first use); then compact the log to just those records."""
        for sid, steps in self.store.persisted_sessions().items():
            self.sessions[sid] = Session(sid, steps=steps)
        by_session = defaultdict(list)
        for record in self.store.read_log():
            by_session[record.session].append(record)
        for sid, records in by_session.items():
            session = self.sessions.get(sid)
            if session is not None:  # else a deleted session's
                session.log = chained(sid, records, session.steps)
                session.steps += session.logged_steps
        if self.store.supports_log:
            self.store.rotate_log([r for s in self.sessions.values() for r in s.log])
        return len(self.sessions)

    def get(self, sid: str | None) -> Session:
        session = self.sessions.get(sid) if sid is not None else None
        if session is None and sid is not None:
            session = self.adopt(sid)
        if session is None:
            raise errors.session_not_found(str(sid))
        return session

    def adopt(self, sid: str) -> Session | None:
        """A session this replica does not know but a shared store holds (it was created or last served by
        another replica): register it, spilled; its first use loads it (and takes its lease)."""
        steps = self.store.lookup(sid)
        if steps is None:
            return None
        if len(self.sessions) >= self.max_num_sessions:
            raise errors.too_many_sessions(self.max_num_sessions)
        session = self.sessions[sid] = Session(sid, steps=steps)
        return session

    def relinquish(self, sid: str) -> None:
        """The shared store wants this session gone from here (another replica asked for it, or this one lost
        its lease): give its slot back if it is idle; its stored copy is current."""
        session = self.sessions.get(sid)
        if session is None or session.slot is None:
            self.store.release(sid)
        elif not session.is_busy and not session.queue and session.is_clean:
            self.spill(session)

    def listing(self) -> list[dict]:
        """Every session, by id: its steps, whether this replica holds it in a slot, and with a shared store the
        replica holding its lease (None: none; the next request for it loads it wherever it lands)."""
        shared = self.store.list_sessions()
        if shared is None:
            return [{"id": s.id, "steps": s.steps, "resident": s.slot is not None}
                    for s in sorted(self.sessions.values(), key=lambda s: s.id)]
        for entry in shared:
            here = self.sessions.get(entry["id"])
            entry["resident"] = here is not None and here.slot is not None
            if entry["resident"]:  # this replica's count may be ahead of the store's in async mode
                entry["steps"] = max(entry["steps"], here.steps)
        return shared

    def new_id(self, proposed: str | None) -> str:
        """A fresh session id, or the one a proxy proposed (so the session is created where it will be routed)."""
        if proposed is None:
            return secrets.token_hex(12)
        if proposed in self.sessions or self.store.lookup(proposed) is not None:
            raise EngineError("session_exists", f"session {proposed!r} exists already", "session")
        return proposed

    # -- state ---------------------------------------------------------------------------------------------

    def create(self, snapshot: bytes | None, sid: str | None = None) -> Session:
        if len(self.sessions) >= self.max_num_sessions:
            raise errors.too_many_sessions(self.max_num_sessions)
        sid = self.new_id(sid)
        state, last_logits = self.parse(snapshot, "snapshot") if snapshot is not None else (None, None)
        slot = self.allocate()
        if state is not None:
            self.pool.write(slot, state)
        session = Session(sid, slot=slot, steps=int(state.steps[0]) if state is not None else 0,
                          last_logits=last_logits)
        self.sessions[session.id] = session
        return session

    def fork(self, source: Session, sid: str | None = None) -> Session:
        if len(self.sessions) >= self.max_num_sessions:
            raise errors.too_many_sessions(self.max_num_sessions)
        sid = self.new_id(sid)
        slot = self.allocate(keep=source)  # the source is resident and replayed (the engine sees to it)
        self.pool.copy(source.slot, slot)
        child = Session(sid, slot=slot, steps=source.steps,
                        last_logits=None if source.last_logits is None else source.last_logits.clone())
        self.sessions[child.id] = child
        return child

    def delete(self, session: Session) -> int:
        """Forget the session; returns the store ticket of its file's removal."""
        del self.sessions[session.id]
        if session.slot is not None:
            self.pool.free(session.slot)
            session.slot = None
        return self.store.delete(session.id)

    def snapshot(self, session: Session) -> bytes:
        """The session's state as a snapshot blob (it must be resident and replayed)."""
        return save_snapshot(self.pool.read(session.slot), self.config.name, self.fingerprint, session.last_logits)

    def persist(self, session: Session) -> int:
        """Queue a snapshot of the session's current state; returns the store ticket. Once it lands
        (snapshot_landed), the log records it covers are dropped."""
        return self.submit(session, self.capture(session))

    def capture(self, session: Session) -> "Captured":
        """The session's state (it must be resident) copied for a snapshot, without waiting for the device (the
        store's writer waits for the copy); a write in flight from now on, so the slot stays until it lands."""
        session.writes_in_flight += 1
        state, (last,), ready = self.pool.read_to_host(session.slot, session.last_logits)
        metadata = {APPLIED_META: json.dumps(session.applied)} if session.applied else None
        return Captured(session.steps, state, last, metadata, ready)

    def submit(self, session: Session, captured: "Captured") -> int:
        """Queue the snapshot write of a capture; returns the store ticket."""
        return self.store.write(session.id, captured.state, captured.last_logits, captured.metadata,
                                ready=captured.ready)

    def snapshot_landed(self, session: Session, steps: int) -> None:
        session.log = [r for r in session.log if r.steps_before >= steps]
        if steps >= session.needs_snapshot_steps:
            session.needs_snapshot = False

    def make_resident(self, session: Session) -> np.ndarray | None:
        """Bring a spilled session back into a slot (reading the store, which keeps its copy). Returns the logged
        inputs after the snapshot, which the caller must feed before anything else, or None."""
        if session.slot is not None:
            return None
        try:
            data, records = self.store.load(session.id)
        except OSError as exc:
            raise EngineError("session_unrestorable", f"session {session.id} could not be read: {exc}",
                              "session") from None
        state, last_logits = self.parse(data, "session", code="session_unrestorable")
        steps = int(state.steps[0])
        if records is not None:  # the shared store's records are the session's (another replica may have fed it)
            session.log = chained(session.id, records, steps)
        slot = self.allocate(keep=session)
        self.pool.write(slot, state)
        session.slot, session.last_logits = slot, last_logits
        pending = [r for r in session.log if r.steps_before >= steps]
        session.steps = steps + sum(r.num_steps for r in pending)
        session.applied = _applied(snapshot_metadata(data).get(APPLIED_META), pending)
        return np.concatenate([r.array() for r in pending]) if pending else None

    def parse(self, data: bytes, field: str, code: str = "invalid_snapshot"):
        try:
            return read_snapshot(data, self.config, self.fingerprint, device="cpu", dtype=self.dtype)
        except SnapshotError as exc:
            raise EngineError(code, str(exc), field) from None

    # -- slots ---------------------------------------------------------------------------------------------

    def allocate(self, keep: Session | None = None) -> int:
        """A zeroed slot, taking one from the least recently used idle session if the pool is full."""
        slot = self.pool.allocate()
        if slot is None:
            if not self.spill_lru(1, keep=keep):
                raise errors.no_free_slots()
            slot = self.pool.allocate()
        return slot

    def spill(self, session: Session) -> None:
        self.pool.free(session.slot)
        session.slot = None
        # loading it back reads them from the snapshot (and its replay); held here they may hold device memory
        session.last_logits = None
        self.store.release(session.id)

    def spillable(self, keep: Session | None = None) -> list[Session]:
        return [s for s in self.sessions.values()
                if s.slot is not None and not s.is_busy and not s.queue and s.is_clean and s is not keep]

    def spill_lru(self, n: int, keep: Session | None = None) -> int:
        """Give back up to n slots of idle sessions, least recently used first; returns how many."""
        idle = sorted(self.spillable(keep), key=lambda s: s.last_used)[:n]
        for session in idle:
            self.spill(session)
        return len(idle)

    def spill_expired(self, now: float) -> int:
        expired = [s for s in self.spillable() if now - s.last_used > self.ttl]
        for session in expired:
            self.spill(session)
        return len(expired)


def chained(sid: str, records: list[LogRecord], steps: int) -> list[LogRecord]:
    """The records that continue a snapshot at `steps`, each starting where the one before ended."""
    kept = []
    for record in records:
        if record.steps_before < steps:
            continue  # a snapshot holds it already
        if record.steps_before > steps:
            log.error("session %s: the log skips from step %d to %d; it resumes at %d", sid, steps,
                      record.steps_before, steps)
            break
        kept.append(record)
        steps += record.num_steps
    return kept


def _applied(stored: str | None, records: list[LogRecord]) -> list[tuple[int, int]]:
    """A loaded session's remembered sequence numbers: its snapshot's, then its replayed records'."""
    try:
        applied = [(int(seq), int(steps)) for seq, steps in json.loads(stored)] if stored else []
    except (ValueError, TypeError) as exc:  # checksummed with the snapshot, so only a bug of ours gets here
        log.error("ignoring a stored snapshot's unreadable sequence numbers: %s", exc)
        applied = []
    applied += [(r.seq, r.steps_before + r.num_steps) for r in records if r.seq is not None]
    return applied[-MAX_NUM_APPLIED:]
