"""Sessions: named streams that own a state slot while resident, spill to disk as snapshots when idle past the
TTL (or when the pool needs their slot), come back transparently on next use, and persist across restarts."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.state import SnapshotError, read_snapshot, save_snapshot
from server.engine import AsyncEngine
from server.errors import APIError
from server.metrics import Metrics

log = logging.getLogger("infomamba.sessions")
SNAPSHOT_SUFFIX = ".state.safetensors"
META_SUFFIX = ".meta.json"


@dataclass(eq=False)
class Session:
    id: str
    slot: int | None = None  # None: spilled to disk
    steps: int = 0
    last_logits: torch.Tensor | None = None  # (vocab,) the last step's logits, to generate without a prompt
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class SessionManager:
    """Runs in the event loop; every touch of the state pool goes through the engine thread (AsyncEngine.call)."""

    def __init__(self, engine: AsyncEngine, state_dir: Path, max_num_sessions: int, ttl: float,
                 metrics: Metrics | None = None):
        self.engine = engine
        self.pool = engine.engine.pool
        self.model = engine.engine.model
        self.fingerprint = self.model.fingerprint()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_num_sessions = max_num_sessions
        self.ttl = ttl
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._lock = asyncio.Lock()  # slot allocation and spills

    @property
    def num_live(self) -> int:
        return sum(1 for s in self.sessions.values() if s.slot is not None)

    @property
    def num_spilled(self) -> int:
        return sum(1 for s in self.sessions.values() if s.slot is None)

    # -- persistence -----------------------------------------------------------------------------------------

    def pick_up_persisted(self) -> int:
        """Register every session a previous run left in state_dir (restored lazily on first use)."""
        for path in sorted(self.state_dir.glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[:-len(SNAPSHOT_SUFFIX)]
            meta = self._read_meta(sid)
            self.sessions[sid] = Session(sid, slot=None, steps=int(meta.get("steps", 0)))
        return len(self.sessions)

    def _paths(self, sid: str) -> tuple[Path, Path]:
        return self.state_dir / (sid + SNAPSHOT_SUFFIX), self.state_dir / (sid + META_SUFFIX)

    def _read_meta(self, sid: str) -> dict:
        try:
            return json.loads(self._paths(sid)[1].read_text())
        except (OSError, ValueError):
            return {}

    async def spill(self, session: Session) -> None:
        """Write the session's state to disk and give its slot back."""
        if session.slot is None:
            return
        slot = session.slot
        t0 = time.monotonic()
        data = await self.engine.call(lambda: self._save(session, slot))
        snap_path, meta_path = self._paths(session.id)
        _atomic_write(snap_path, data)
        meta = {"steps": session.steps}
        _atomic_write(meta_path, json.dumps(meta).encode())
        await self.engine.call(lambda: self.pool.free(slot))
        session.slot = None
        if self.metrics:
            self.metrics.snapshot_bytes.observe(len(data))
            self.metrics.snapshot_save_time.observe(time.monotonic() - t0)

    async def _restore(self, session: Session) -> None:
        snap_path, meta_path = self._paths(session.id)
        t0 = time.monotonic()
        try:
            data = snap_path.read_bytes()
            state, last_logits = read_snapshot(data, self.model.config, self.fingerprint, device="cpu",
                                               dtype=self.model.dtype)
        except (OSError, SnapshotError) as exc:
            raise APIError(409, "session_unrestorable", f"session {session.id} could not be restored: {exc}",
                           "session") from None
        slot = await self._allocate()
        await self.engine.call(lambda: self.pool.write(slot, state))
        session.slot = slot
        session.last_logits = last_logits
        snap_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        if self.metrics:
            self.metrics.snapshot_bytes.observe(len(data))
            self.metrics.snapshot_restore_time.observe(time.monotonic() - t0)

    def _save(self, session: Session, slot: int) -> bytes:
        # The last logits travel with the state, so a resumed session generates without a new prompt.
        return save_snapshot(self.pool.read(slot), self.model.config.name, self.fingerprint, session.last_logits)

    async def _allocate(self) -> int:
        """A zeroed slot, spilling the least recently used idle session if the pool is full."""
        while True:
            slot = await self.engine.call(self.pool.allocate)
            if slot is not None:
                return slot
            idle = [s for s in self.sessions.values() if s.slot is not None and not s.busy]
            if not idle:
                raise APIError(503, "no_free_slots", "every state slot is in use; retry later", retry_after=1)
            await self.spill(min(idle, key=lambda s: s.last_used))

    async def reap(self) -> None:
        """Spill sessions idle past the TTL, and idle sessions whose slots requests are waiting for."""
        async with self._lock:
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.slot is not None and not session.busy and now - session.last_used > self.ttl:
                    await self.spill(session)
            starved = self.engine.engine.counts()["waiting_for_slot"]
            while starved > 0 and self.pool.num_free == 0:
                idle = [s for s in self.sessions.values() if s.slot is not None and not s.busy]
                if not idle:
                    break
                await self.spill(min(idle, key=lambda s: s.last_used))
                starved -= 1

    async def persist_all(self) -> int:
        async with self._lock:
            live = [s for s in self.sessions.values() if s.slot is not None]
            for session in live:
                await self.spill(session)
            return len(live)

    # -- API operations --------------------------------------------------------------------------------------

    async def create(self, snapshot: bytes | None = None) -> Session:
        if len(self.sessions) >= self.max_num_sessions:
            raise APIError(429, "too_many_sessions", f"the server holds its maximum of {self.max_num_sessions} "
                           "sessions; delete some or retry later", retry_after=5)
        state, last_logits = None, None
        if snapshot is not None:
            try:
                t0 = time.monotonic()
                state, last_logits = read_snapshot(snapshot, self.model.config, self.fingerprint, device="cpu",
                                                   dtype=self.model.dtype)
                if self.metrics:
                    self.metrics.snapshot_restore_time.observe(time.monotonic() - t0)
                    self.metrics.snapshot_bytes.observe(len(snapshot))
            except SnapshotError as exc:
                raise APIError(422, "invalid_snapshot", str(exc), "snapshot") from None
        async with self._lock:
            slot = await self._allocate()
        if state is not None:
            await self.engine.call(lambda: self.pool.write(slot, state))
        session = Session(secrets.token_hex(12), slot=slot, steps=int(state.steps[0]) if state is not None else 0,
                          last_logits=last_logits)
        self.sessions[session.id] = session
        return session

    def get(self, sid: str) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise APIError(404, "session_not_found", f"no session {sid!r}", "session")
        return session

    async def acquire(self, sid: str) -> Session:
        """The session, resident and marked busy (one request at a time per session)."""
        session = self.get(sid)
        if session.busy:
            raise APIError(409, "session_busy", f"session {sid!r} is running another request", "session")
        session.busy = True
        try:
            if session.slot is None:
                async with self._lock:
                    if session.slot is None:
                        await self._restore(session)
        except BaseException:
            session.busy = False
            raise
        return session

    def release(self, session: Session) -> None:
        session.busy = False
        session.last_used = time.monotonic()

    async def snapshot(self, sid: str) -> bytes:
        session = await self.acquire(sid)
        try:
            t0 = time.monotonic()
            slot = session.slot
            data = await self.engine.call(lambda: self._save(session, slot))
            if self.metrics:
                self.metrics.snapshot_bytes.observe(len(data))
                self.metrics.snapshot_save_time.observe(time.monotonic() - t0)
            return data
        finally:
            self.release(session)

    async def fork(self, sid: str) -> Session:
        if len(self.sessions) >= self.max_num_sessions:
            raise APIError(429, "too_many_sessions", f"the server holds its maximum of {self.max_num_sessions} "
                           "sessions", retry_after=5)
        source = await self.acquire(sid)
        try:
            async with self._lock:
                slot = await self._allocate()
            src = source.slot
            await self.engine.call(lambda: self.pool.copy(src, slot))
            child = Session(secrets.token_hex(12), slot=slot, steps=source.steps,
                            last_logits=None if source.last_logits is None else source.last_logits.clone())
            self.sessions[child.id] = child
            return child
        finally:
            self.release(source)

    async def delete(self, sid: str) -> None:
        session = self.get(sid)
        if session.busy:
            raise APIError(409, "session_busy", f"session {sid!r} is running a request", "session")
        del self.sessions[sid]
        if session.slot is not None:
            slot, session.slot = session.slot, None
            await self.engine.call(lambda: self.pool.free(slot))
        for path in self._paths(sid):
            path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
