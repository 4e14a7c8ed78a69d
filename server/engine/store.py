"""The state dir: each session's latest snapshot as one file, and the write-ahead log of the inputs fed since
(server/engine/wal.py), written by one writer thread so the engine loop never waits on a disk. Snapshot writes are
atomic (temporary file, fsync, rename, fsync of the directory); every job is applied in the order it was
submitted, so a later snapshot never loses to an earlier one and a delete is never undone by a queued write."""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model.state import SnapshotError, StreamState, save_snapshot, snapshot_metadata
from server.engine import wal
from server.engine.wal import LogRecord, LogWriter, fsync_dir

log = logging.getLogger("infomamba.store")
SNAPSHOT_SUFFIX = ".state.safetensors"
TMP_SUFFIX = ".tmp"


@dataclass(slots=True)
class Persisted:
    """A write (or delete) has reached the disk, or failed with `error`."""

    ticket: int
    session: str
    error: str | None = None
    failed: dict[str, str] | None = None  # a log write that went through for some sessions only: sid -> why not


@dataclass(slots=True)
class _Job:
    ticket: int
    session: str
    state: StreamState | None  # None: delete the session's file (unless `log` is set)
    last_logits: torch.Tensor | None = None
    metadata: dict[str, str] | None = None  # the session's own bookkeeping, kept in the snapshot (sessions.APPLIED_META)
    log: bytes | None = None  # encoded log records to append
    rotate: bool = False  # start a new log segment with `log` in it, drop the old segments
    ready: torch.cuda.Event | None = None  # `state` is a copy from the device, valid once this event has happened

    @property
    def is_append(self) -> bool:
        return bool(self.log) and not self.rotate


class WriterThread:
    """One thread applying queued jobs in submission order; `None` in `_jobs` stops it after the jobs before it.
    Subclasses set `_jobs` (a queue) and `_thread = None`, and define `_run`."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="infomamba-store", daemon=True)
        self._thread.start()

    def _finish_writes(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class SessionStore(WriterThread):
    def __init__(self, directory: str | Path, model_name: str, fingerprint: str,
                 on_done: Callable[[Persisted], None]):
        self.directory = Path(directory)
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.on_done = on_done
        self.error: str | None = None  # the last write failure, until a write succeeds again
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._tickets = 0
        self._thread: threading.Thread | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.wal = LogWriter(self.directory)
        for tmp in self.directory.glob("*" + TMP_SUFFIX):  # a crash mid-write leaves only these behind
            tmp.unlink(missing_ok=True)
        self.error = self.check_writable()

    def stop(self) -> None:
        """Finish every queued write, then stop."""
        self._finish_writes()
        self.wal.close()

    def path(self, sid: str) -> Path:
        return self.directory / (sid + SNAPSHOT_SUFFIX)

    def check_writable(self) -> str | None:
        probe = self.directory / (".probe" + TMP_SUFFIX)
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            return describe(exc, self.directory)
        return None

    # -- engine thread -----------------------------------------------------------------------------------------

    def write(self, sid: str, state: StreamState, last_logits: torch.Tensor | None,
              metadata: dict[str, str] | None = None, ready: torch.cuda.Event | None = None) -> int:
        """Queue a snapshot of one stream (a CPU copy the caller will not touch again; with `ready`, one still
        being copied from the device, which the writer waits for); returns its ticket."""
        return self._submit(_Job(0, sid, state, last_logits, metadata, ready=ready))

    def delete(self, sid: str) -> int:
        return self._submit(_Job(0, sid, None))

    def append_log(self, records: list[LogRecord]) -> int:
        """Queue log records (group commit: one fsync for all); returns the ticket. No records: a barrier, done
        once every write queued before it is."""
        return self._submit(_Job(0, "", None, log=wal.encode(records)))

    def rotate_log(self, carried: list[LogRecord]) -> int:
        return self._submit(_Job(0, "", None, log=wal.encode(carried), rotate=True))

    @property
    def log_bytes(self) -> int:
        """Size of the newest log segment (read from the engine thread: approximate)."""
        return self.wal.size

    def read_log(self) -> list[LogRecord]:
        return wal.read_all(self.directory)

    def _submit(self, job: _Job) -> int:
        self._tickets += 1
        job.ticket = self._tickets
        if self._thread is None:  # not started (unit tests, shutdown): write inline
            self.on_done(self._apply(job))
        else:
            self._jobs.put(job)
        return job.ticket

    supports_log = True  # answers may wait on a write-ahead log record instead of a whole snapshot

    def read(self, sid: str) -> bytes:
        return self.path(sid).read_bytes()

    def load(self, sid: str) -> tuple[bytes, list[LogRecord] | None]:
        """The session's snapshot, and the log records after it where the store keeps them per session (None
        here: the engine holds every session's records in memory since start)."""
        return self.read(sid), None

    def lookup(self, sid: str) -> int | None:
        """A session not picked up at start: none here (every file in the directory was)."""
        return None

    def list_sessions(self) -> None:
        """None: the engine's own table lists every session (a shared store lists the cluster's)."""
        return None

    def release(self, sid: str) -> None:
        """The session left the pool; only a shared store (server/engine/redis_store.py) has a lease to hand back."""

    def persisted_sessions(self) -> dict[str, int]:
        """Session id -> steps, for every snapshot in the directory (read from the headers only)."""
        found = {}
        for path in sorted(self.directory.glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[:-len(SNAPSHOT_SUFFIX)]
            try:
                with open(path, "rb") as f:
                    head = f.read(8)
                    head += f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
                found[sid] = int(snapshot_metadata(head).get("steps", 0))
            except (OSError, SnapshotError, ValueError) as exc:
                log.warning("ignoring unreadable session file %s: %s", path, exc)
        return found

    # -- writer thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while batch[-1] is not None:  # everything queued by now, in order
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for done in self._apply_batch([job for job in batch if job is not None]):
                self.on_done(done)
            if batch[-1] is None:
                return

    def _apply_batch(self, jobs: list[_Job]) -> list[Persisted]:
        """Apply jobs in order, except that a session's snapshot followed in the batch by a newer one of the same
        session (no delete of it between) is not written: the newer one covers it, and both are reported once it
        lands. When the disk is slower than the engine (a long stream appending 64K-id frames), the writer then keeps
        up by writing the latest state instead of every intermediate one, and log appends queued one after another
        go to the disk in one write with one fsync."""
        superseded: dict[int, int] = {}  # index of a skipped snapshot -> index of the one that covers it
        latest: dict[str, int] = {}
        for i, job in enumerate(jobs):
            if job.log is not None or job.rotate:
                continue
            if job.state is not None and job.session in latest:
                superseded[latest[job.session]] = i
            latest[job.session] = i
            if job.state is None:  # a delete: earlier snapshots are not covered by anything after it
                latest.pop(job.session)
        waiting: dict[int, list[int]] = {}  # index of a written job -> the skipped ones it covers directly
        results = []
        i = 0
        while i < len(jobs):
            job = jobs[i]
            if i in superseded:
                waiting.setdefault(superseded[i], []).append(i)
                i += 1
                continue
            if job.is_append:  # log appends queued one after another: one write, one fsync for all
                end = i + 1
                while end < len(jobs) and jobs[end].is_append:
                    end += 1
                if end - i > 1:
                    done = self._apply(_Job(job.ticket, "", None, log=b"".join(j.log for j in jobs[i:end])))
                    results += [Persisted(j.ticket, j.session, done.error) for j in jobs[i:end]]
                    i = end
                    continue
            done = self._apply(job)
            stack, covered = [i], []
            while stack:
                for skipped in waiting.pop(stack.pop(), []):
                    covered.append(skipped)
                    stack.append(skipped)
            # the jobs this one covers are reported first, in the order they were submitted
            results += [Persisted(jobs[j].ticket, jobs[j].session, done.error) for j in sorted(covered)]
            results.append(done)
            i += 1
        return results

    def _apply(self, job: _Job) -> Persisted:
        path = self.path(job.session)
        try:
            if job.rotate:
                self.wal.rotate(job.log)
            elif job.log:
                self.wal.append(job.log)
            elif job.log is not None:
                return Persisted(job.ticket, job.session)  # a barrier: the jobs before it are done
            elif job.state is None:
                path.unlink(missing_ok=True)
            else:
                if job.ready is not None:
                    job.ready.synchronize()  # this thread waits for the device's copy, never the engine's
                data = save_snapshot(job.state, self.model_name, self.fingerprint, job.last_logits, job.metadata)
                atomic_write(path, data)
        except OSError as exc:
            self.error = describe(exc, self.directory)
            log.error("session %s: %s", job.session, self.error)
            return Persisted(job.ticket, job.session, self.error)
        if job.state is not None or job.log is not None:
            self.error = None  # a write went through: the store works again
        return Persisted(job.ticket, job.session)


def atomic_write(path: Path, data: bytes) -> None:
    """Whole file or nothing: a crash or a full disk leaves the previous version, never a partial one."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def describe(exc: OSError, directory: Path) -> str:
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno, exc.strerror or str(exc))
    return f"cannot write to the state dir {directory}: {reason}"
