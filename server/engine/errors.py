"""Errors of the engine core. They say what went wrong in the engine's terms; the edge (server/api/errors.py)
maps each code to an HTTP status and a websocket error frame."""
from __future__ import annotations

from server.engine.protocol import Error


class EngineError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.retry_after = code, message, field, retry_after

    def to_struct(self) -> Error:
        return Error(self.code, self.message, self.field, self.retry_after)


def queue_full(limit: int) -> EngineError:
    return EngineError("queue_full", f"the request queue is full ({limit} waiting); retry later", retry_after=1)


def session_not_found(sid: str) -> EngineError:
    return EngineError("session_not_found", f"no session {sid!r}", "session")


def session_busy(sid: str) -> EngineError:
    return EngineError("session_busy", f"session {sid!r} is running another request", "session")


def no_free_slots() -> EngineError:
    return EngineError("no_free_slots", "every state slot is held by a running request; retry later", retry_after=1)


def too_many_sessions(limit: int) -> EngineError:
    return EngineError("too_many_sessions", f"the server holds its maximum of {limit} sessions; delete some or "
                       "retry later", retry_after=5)
