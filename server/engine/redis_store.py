"""Sessions in Redis, shared by every replica (`--state-store redis://...`): the same interface as the state dir's
SessionStore (server/engine/store.py), plus ownership, so that a session is advanced by one replica at a time and
continues on another when its replica dies.

Keys (one hash tag per session, so a session's keys stay together):
    {prefix}:{<sid>}:state   hash: blob (the key of the current snapshot), steps, version, owner
    {prefix}:{<sid>}:blob:<replica>:<n>   a snapshot (safetensors bytes)
    {prefix}:{<sid>}:log     list: the inputs fed since that snapshot, one msgpack LogRecord each (wal.py)
    {prefix}:{<sid>}:lease   the owning replica's id, with a TTL (SET NX PX); renewed while the session is resident
    {prefix}:{<sid>}:wanted  another replica asked for the session (the owner hands it over when it is idle)
    {prefix}:sessions        hash: sid -> steps, for listing

Ownership: a replica takes a session's lease when it loads it (the lease is free, expired, or already its own) and
keeps it while the session is resident; spilling, deleting and shutting down release it. A request for a session
whose lease another replica holds is refused with 503 + Retry-After (the lease's remaining time) and marks the
session wanted, so its owner hands it over at its next renewal if it is idle. A dead replica's leases expire after
`--state-lease-ttl` seconds; its sessions then continue elsewhere from their last acknowledged state.

The log: as with the state dir (server/engine/wal.py), an acknowledged append or generate needs only its inputs in
the store, not the whole state: the engine hands the store one record per answered request (a few bytes a step),
and the records of one engine step go to Redis in one pipelined round trip (group commit), each appended to its
session's list by a Lua script under the same checks as a snapshot. A snapshot is written every --snapshot-every
logged steps (and at create and fork); its commit empties the session's list, which by then holds only records the
snapshot covers (one writer thread applies a replica's writes in submission order). A replica taking a session
over reads its snapshot and list in one script and replays the records.

Fencing: every change of a session bumps its stored version. A snapshot is uploaded under a key of its own (a
plain SET: handing a large argument to Lua costs a copy), then committed with a Lua script that checks, inside
Redis, that the lease is this replica's (or free) and that the stored version is the one this replica loaded or
last wrote, and only then points the session at the new blob (dropping the old one). Both go in one round trip. A
log record is appended under the same check. A write from a replica that lost the session in between (a pause
longer than the lease, a network split) is refused (and its blob dropped), never applied.

Writes run on one thread, in submission order, so the engine loop never waits on the network. sync mode (the
default) reports a write done once Redis has it, and the engine answers only then; async mode reports it at once,
so an answer can precede its write by the writer's queue (milliseconds): a crash loses those acknowledged steps.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import torch

from model.state import StreamState, save_snapshot
from server.engine import errors, wal
from server.engine.errors import EngineError
from server.engine.store import Persisted, WriterThread
from server.engine.wal import LogRecord

log = logging.getLogger("infomamba.store")
MAX_SESSION_ID = 128

# KEYS: state, lease, index, new blob, log. ARGV: me, expected version, lease ms, steps, sid.
_COMMIT = """
local owner = redis.call('GET', KEYS[2])
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if (owner and owner ~= ARGV[1]) or version ~= tonumber(ARGV[2]) then
    redis.call('DEL', KEYS[4])
    if owner and owner ~= ARGV[1] then return {-1, owner} end
    return {-2, tostring(version)}
end
local old = redis.call('HGET', KEYS[1], 'blob')
if old then redis.call('DEL', old) end
redis.call('DEL', KEYS[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'blob', KEYS[4], 'steps', ARGV[4], 'version', version + 1, 'owner', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[4])
return {version + 1, ARGV[1]}
"""
# KEYS: state, lease, index, log. ARGV: me, expected version, lease ms, steps after, record, sid, steps before.
# -> {version} | {-1, owner} | {-2, version} | {-3, stored steps}; version 0: the session is gone (deleted through
# another replica); -3: the record would not continue the stored steps (an earlier write of this session failed)
_APPEND = """
local owner = redis.call('GET', KEYS[2])
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if owner and owner ~= ARGV[1] then return {-1, owner} end
if version ~= tonumber(ARGV[2]) or version == 0 then return {-2, tostring(version)} end
local steps = redis.call('HGET', KEYS[1], 'steps') or '0'
if tonumber(steps) ~= tonumber(ARGV[7]) then return {-3, steps} end
redis.call('RPUSH', KEYS[4], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'steps', ARGV[4], 'version', version + 1, 'owner', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[4])
return {version + 1}
"""
# KEYS: state, lease, wanted, log. ARGV: me, lease ms.
# -> {1, snapshot, version, log records} | {0} (no such session) | {-1, owner, pttl}
_ACQUIRE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
    return {-1, owner, redis.call('PTTL', KEYS[2])}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3])
local v = redis.call('HMGET', KEYS[1], 'blob', 'version')
return {1, redis.call('GET', v[1]), v[2], redis.call('LRANGE', KEYS[4], 0, -1)}
"""
# KEYS: lease, wanted. ARGV: me, lease ms. -> 0 lost, 1 renewed, 2 renewed and wanted elsewhere
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1 + redis.call('EXISTS', KEYS[2])
"""
# KEYS: lease. ARGV: me.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: state, lease, wanted, index, log. ARGV: me, sid. -> 1 deleted | {-1, owner}
_DELETE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return {-1, owner} end
local blob = redis.call('HGET', KEYS[1], 'blob')
if blob then redis.call('DEL', blob) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('HDEL', KEYS[4], ARGV[2])
return 1
"""


@dataclass(slots=True)
class Relinquish:
    """To the engine: give up the resident copy of `session` if it is idle (another replica wants it, or this
    replica's lease on it is gone)."""

    session: str
    reason: str


@dataclass(slots=True)
class _Job:
    kind: str  # write | log | delete | release
    ticket: int
    session: str  # "" for a log job (its records name their sessions)
    state: StreamState | None = None
    last_logits: torch.Tensor | None = None
    metadata: dict[str, str] | None = None
    records: list[LogRecord] | None = None
    ready: torch.cuda.Event | None = None  # `state` is a copy from the device, valid once this event has happened

    @property
    def sessions(self) -> list[str]:
        return [r.session for r in self.records] if self.records is not None else [self.session]


class RedisSessionStore(WriterThread):
    def __init__(self, url: str, model_name: str, fingerprint: str, on_done: Callable[[object], None], *,
                 mode: str = "sync", lease_ttl: float = 10.0, replica_id: str | None = None,
                 prefix: str = "infomamba", metrics=None):
        import redis

        self._redis_errors = (redis.ConnectionError, redis.TimeoutError)
        self.url = url
        self.directory = redact(url)  # what /health and the logs show: the URL without its password
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.on_done = on_done  # Persisted for each write/delete, Relinquish when a session should go
        self.is_async = mode == "async"
        self.lease_ms = int(lease_ttl * 1000)
        self.renew_interval = min(lease_ttl / 3, 1.0)
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.prefix = prefix
        self.metrics = metrics
        self.error: str | None = None
        # short timeouts: the engine thread reads from here, and a dead Redis must not stall it for long
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=1, health_check_interval=10)
        self._commit = self.redis.register_script(_COMMIT)
        self._append = self.redis.register_script(_APPEND)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._delete = self.redis.register_script(_DELETE)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._tickets = 0
        self._blobs = 0  # numbers this process's uploaded snapshots; the random part keeps a restarted replica of
        self._blob_prefix = f"{self.replica_id}:{secrets.token_hex(4)}"  # the same id off its predecessor's blobs
        self._thread: threading.Thread | None = None
        self._versions: dict[str, int] = {}  # sid -> the stored version this replica's copy is based on
        self._held: set[str] = set()  # sessions whose lease this replica holds (writer thread and engine thread)
        self._lost: set[str] = set()  # leases lost while resident: the engine is told to drop its copy
        self._pending: Counter = Counter()  # sid -> jobs queued and not applied (reads wait for them)
        self._idle = threading.Condition()
        self._next_renew = 0.0
        self._down_until = 0.0  # after a failed call from the engine thread, fail fast until then
        self.error = self.check_writable()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    supports_log = True  # answers may wait on a log record instead of a whole snapshot
    log_bytes = 0  # each session's list is emptied by its next snapshot: nothing to rotate

    def read_log(self) -> list:
        """Nothing to pick up at start (see persisted_sessions); a session's records come with its snapshot."""
        return []

    def rotate_log(self, carried: list[LogRecord]) -> int:
        return self.append_log([])

    def stop(self) -> None:
        """Finish every queued write, then hand back every lease (the sessions' last states are in Redis)."""
        self._finish_writes()
        held, self._held = list(self._held), set()
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for sid in held:
                    self._release(keys=[self._key(sid, "lease")], args=[self.replica_id], client=pipe)
                pipe.execute()
        except self._redis_errors as exc:
            log.warning("could not release %d session leases (they expire in %.0f s): %s", len(held),
                        self.lease_ms / 1000, exc)
        self.redis.close()

    def check_writable(self) -> str | None:
        try:
            self.redis.set(f"{self.prefix}:probe:{self.replica_id}", b"x", px=10_000)
        except self._redis_errors as exc:
            return f"cannot reach the state store {self.directory}: {exc}"
        except Exception as exc:  # noqa: BLE001 - auth, read-only replica, out of memory: all say why
            return f"cannot write to the state store {self.directory}: {exc}"
        return None

    # -- engine thread -----------------------------------------------------------------------------------------

    def write(self, sid: str, state: StreamState, last_logits: torch.Tensor | None,
              metadata: dict[str, str] | None = None, ready: torch.cuda.Event | None = None) -> int:
        """Queue a snapshot of one stream (a CPU copy the caller will not touch again; with `ready`, one still
        being copied from the device, which the writer waits for); returns its ticket."""
        return self._submit(_Job("write", 0, sid, state, last_logits, metadata, ready=ready))

    def append_log(self, records: list[LogRecord]) -> int:
        """Queue this engine step's log records (one round trip for all); returns the ticket. No records: a
        barrier, done once every write queued before it is."""
        return self._submit(_Job("log", 0, "", records=records))

    def delete(self, sid: str) -> int:
        return self._submit(_Job("delete", 0, sid))

    def release(self, sid: str) -> None:
        """The session left this replica's pool (spilled): let another replica take it."""
        if sid in self._held or sid in self._lost or self._pending[sid]:
            self._submit(_Job("release", 0, sid))

    def lookup(self, sid: str) -> int | None:
        """Steps of a session this replica does not know, if the store has it (resume anywhere)."""
        if len(sid) > MAX_SESSION_ID:
            return None
        self._check_up()
        try:
            steps = self.redis.hget(self._key(sid, "state"), "steps")
        except self._redis_errors as exc:
            raise self._unavailable(exc) from None
        return None if steps is None else int(steps)

    def load(self, sid: str) -> tuple[bytes, list[LogRecord]]:
        """The session's last stored snapshot and the log records after it, taking its lease: this replica owns
        the session from now on."""
        self._wait_applied(sid)
        self._check_up()
        t0 = time.monotonic()
        try:
            got = self._acquire(keys=[self._key(sid, "state"), self._key(sid, "lease"), self._key(sid, "wanted"),
                                      self._key(sid, "log")], args=[self.replica_id, self.lease_ms])
        except self._redis_errors as exc:
            raise self._unavailable(exc) from None
        if got[0] == -1:
            # Retry-After 1: an idle session is handed over at the owner's next renewal (at most a second away)
            raise EngineError("session_owned_elsewhere", f"session {sid!r} is resident on replica "
                              f"{got[1].decode()}; it moves here once that replica hands it over (when it is idle) "
                              f"or its lease expires (in {math.ceil(int(got[2]) / 1000)} s)", "session",
                              retry_after=1)
        if got[0] == 0:  # deleted through another replica since this one last saw it
            raise errors.session_not_found(sid)
        if sid not in self._held and self.metrics is not None:
            self.metrics.store_sessions_taken.inc()
        self._held.add(sid)
        self._lost.discard(sid)
        self._versions[sid] = int(got[2])
        if self.metrics is not None:
            self.metrics.store_reads.inc()
            self.metrics.store_read_time.observe(time.monotonic() - t0)
        return got[1], [wal.unpack(r) for r in got[3]]

    def read(self, sid: str) -> bytes:
        """The session's last stored snapshot (its lease taken, as load)."""
        return self.load(sid)[0]

    def persisted_sessions(self) -> dict[str, int]:
        """Nothing to pick up at start: replicas find the store's sessions on demand (lookup), so no replica
        registers every session of the cluster."""
        return {}

    def list_sessions(self) -> list[dict]:
        """Every session in the store: id, steps, and the replica holding its lease (None: none holds it)."""
        self._check_up()
        try:
            steps = {k.decode(): int(v) for k, v in self.redis.hgetall(f"{self.prefix}:sessions").items()}
            sids = sorted(steps)
            owners = self.redis.mget([self._key(sid, "lease") for sid in sids]) if sids else []
        except self._redis_errors as exc:
            raise self._unavailable(exc) from None
        return [{"id": sid, "steps": steps[sid], "owner": None if owner is None else owner.decode()}
                for sid, owner in zip(sids, owners)]

    def _submit(self, job: _Job) -> int:
        if job.kind != "release":
            self._tickets += 1
            job.ticket = self._tickets
        if job.kind in ("write", "log") and self.is_async:
            self.on_done(Persisted(job.ticket, job.session))  # acknowledged now; the write follows
        with self._idle:
            self._pending.update(job.sessions)
        if self._thread is None:  # not started (unit tests, shutdown): apply inline
            self._apply(job)
        else:
            self._jobs.put(job)
        return job.ticket

    def _wait_applied(self, sid: str, timeout: float = 30.0) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._pending[sid] == 0, timeout)

    def _key(self, sid: str, kind: str) -> str:
        return f"{self.prefix}:{{{sid}}}:{kind}"

    def _check_up(self) -> None:
        """The engine thread calls Redis itself (lookups, loads); while Redis is down, each call would stall every
        stream for the connect timeout, so calls fail at once for a second after a failure."""
        if time.monotonic() < self._down_until:
            raise self._unavailable(None)

    def _unavailable(self, exc: Exception | None) -> EngineError:
        if exc is not None:
            self._down_until = time.monotonic() + 1.0
            self.error = f"cannot reach the state store {self.directory}: {exc}"
        reason = self.error or f"cannot reach the state store {self.directory}"
        return EngineError("state_store_unavailable", reason + "; sessions are unavailable until it is back "
                           "(stateless requests still work)", "session", retry_after=2)

    # -- writer thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=max(0.0, self._next_renew - time.monotonic()))
            except queue.Empty:
                job = False
            if job is None:
                return
            if job:
                self._apply(job)
            if time.monotonic() >= self._next_renew:
                self._next_renew = time.monotonic() + self.renew_interval
                self._renew_leases()

    def _apply(self, job: _Job) -> None:
        failed = None
        try:
            if job.kind == "write":
                error = self._apply_write(job)
            elif job.kind == "log":
                failed = self._apply_log(job)
                error = None
            elif job.kind == "delete":
                error = self._apply_delete(job)
            else:
                self._release(keys=[self._key(job.session, "lease")], args=[self.replica_id])
                self._held.discard(job.session)
                self._lost.discard(job.session)
                error = None
        except self._redis_errors as exc:
            error = self.error = f"cannot reach the state store {self.directory}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed write is reported, never lost silently
            error = self.error = f"the state store {self.directory} refused a write: {exc}"
        finally:
            with self._idle:
                self._pending.subtract(job.sessions)
                for sid in set(job.sessions):
                    if self._pending[sid] <= 0:
                        self._pending.pop(sid)
                self._idle.notify_all()
        if error is not None:
            log.error("session %s: %s", job.session or "(log)", error)
            if self.metrics is not None:
                (self.metrics.store_log_writes if job.kind == "log" else self.metrics.store_writes).labels(
                    "error").inc()
        if job.kind != "release":
            if self.is_async and job.kind in ("write", "log"):
                return  # acknowledged at submission; a failure shows in /health and the logs
            self.on_done(Persisted(job.ticket, job.session, error, failed))

    def _apply_write(self, job: _Job) -> str | None:
        t0 = time.monotonic()
        if job.ready is not None:
            job.ready.synchronize()  # this thread waits for the device's copy, never the engine's
        data = save_snapshot(job.state, self.model_name, self.fingerprint, job.last_logits, job.metadata)
        sid = job.session
        self._blobs += 1
        blob = self._key(sid, f"blob:{self._blob_prefix}:{self._blobs}")
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(blob, data)
            self._commit(keys=[self._key(sid, "state"), self._key(sid, "lease"), f"{self.prefix}:sessions", blob,
                               self._key(sid, "log")],
                         args=[self.replica_id, self._versions.get(sid, 0), self.lease_ms,
                               int(job.state.steps[0]), sid], client=pipe)
            got = pipe.execute()[1]
        if got[0] < 0:
            return self._fenced(sid, got, self._versions.get(sid, 0))
        self._versions[sid] = int(got[0])
        self._held.add(sid)
        self.error = None
        if self.metrics is not None:
            self.metrics.store_writes.labels("ok").inc()
            self.metrics.store_write_bytes.inc(len(data))
            self.metrics.store_write_time.observe(time.monotonic() - t0)
        return None

    def _apply_log(self, job: _Job) -> dict[str, str] | None:
        """Every record in one round trip, each appended under its session's lease and version check; returns
        the sessions whose record was refused, with why."""
        if not job.records:
            return None
        t0 = time.monotonic()
        expected = {}  # sid -> the version its next record must find (records of one session chain)
        nbytes = 0
        with self.redis.pipeline(transaction=False) as pipe:
            for record in job.records:
                sid = record.session
                version = expected.get(sid, self._versions.get(sid, 0))
                expected[sid] = version + 1
                packed = wal.pack(record)
                nbytes += len(packed)
                self._append(keys=[self._key(sid, "state"), self._key(sid, "lease"), f"{self.prefix}:sessions",
                                   self._key(sid, "log")],
                             args=[self.replica_id, version, self.lease_ms, record.steps_before + record.num_steps,
                                   packed, sid, record.steps_before], client=pipe)
            answers = pipe.execute()
        failed = {}
        for record, got in zip(job.records, answers):
            sid = record.session
            if sid in failed:
                continue  # its earlier record was refused: so is every later one
            if got[0] == -3:  # still this replica's; its next change must be a snapshot (the engine sees to it)
                failed[sid] = (f"session {sid}: the state store holds it up to step {got[1].decode()}, and this "
                               f"record starts at step {record.steps_before} (an earlier write failed)")
            elif got[0] < 0:
                failed[sid] = self._fenced(sid, got, self._versions.get(sid, 0))
            else:
                self._versions[sid] = int(got[0])
                self._held.add(sid)
        self.error = None
        if self.metrics is not None:
            self.metrics.store_log_writes.labels("ok").inc(len(job.records) - len(failed))
            self.metrics.store_log_write_bytes.inc(nbytes)
            self.metrics.store_log_write_time.observe(time.monotonic() - t0)
        return failed or None

    def _fenced(self, sid: str, got: list, expected: int) -> str:
        """A write the store refused: this replica no longer owns the session (the engine is told to drop it)."""
        self._held.discard(sid)
        self._lost.add(sid)
        if self.metrics is not None:
            self.metrics.store_fenced.inc()
        if got[0] == -1:
            return f"session {sid} is now owned by replica {got[1].decode()}: this replica's write was refused"
        if got[1] == b"0":
            return f"session {sid} was deleted from the state store: this replica's write was refused"
        return (f"session {sid} changed in the state store since this replica loaded it (version "
                f"{got[1].decode()}, expected {expected}): this replica's write was refused")

    def _apply_delete(self, job: _Job) -> str | None:
        sid = job.session
        got = self._delete(keys=[self._key(sid, "state"), self._key(sid, "lease"), self._key(sid, "wanted"),
                                 f"{self.prefix}:sessions", self._key(sid, "log")], args=[self.replica_id, sid])
        self._held.discard(sid)
        self._versions.pop(sid, None)
        if isinstance(got, list):
            return f"session {sid} is owned by replica {got[1].decode()}: delete it there (or after its lease expires)"
        return None

    def _renew_leases(self) -> None:
        held = list(self._held)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for sid in held:
                    self._renew(keys=[self._key(sid, "lease"), self._key(sid, "wanted")],
                                args=[self.replica_id, self.lease_ms], client=pipe)
                pipe.ping()
                answers = pipe.execute()[:-1]
        except self._redis_errors as exc:
            self.error = f"cannot reach the state store {self.directory}: {exc}"
            return
        if self.error is not None and self.error.startswith("cannot reach"):
            self.error = None
        for sid, answer in zip(held, answers):
            if answer == 0 and sid in self._held:
                log.warning("session %s: lease lost (another replica took it over)", sid)
                self._held.discard(sid)
                self._lost.add(sid)
            elif answer == 2:
                self.on_done(Relinquish(sid, "wanted"))
        for sid in list(self._lost):
            self.on_done(Relinquish(sid, "lost"))


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(config, state_dir: str, model_name: str, fingerprint: str, on_done, metrics=None):
    """The store that --state-store names: Redis, or (unset) the state dir."""
    if config.state_store is None:
        from server.engine.store import SessionStore

        return SessionStore(state_dir, model_name, fingerprint, on_done)
    return RedisSessionStore(config.state_store, model_name, fingerprint, on_done, mode=config.state_store_mode,
                             lease_ttl=config.state_lease_ttl, replica_id=config.replica_id, metrics=metrics)
