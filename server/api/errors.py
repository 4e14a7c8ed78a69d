"""The one error type of the API: a 4xx (or 503/507) with the contract's body {"error": {code, message, field}}
plus OpenAI's `type` and `param` (the same as `field`), so OpenAI clients show the message and the parameter; and
the map from engine error codes to HTTP statuses (the engine knows nothing of HTTP)."""
from __future__ import annotations

from server.engine.protocol import Error

ENGINE_STATUS = {
    "queue_full": 429, "too_many_sessions": 429, "no_free_slots": 503, "engine_unavailable": 503,
    "session_busy": 409, "session_unrestorable": 409, "session_not_found": 404, "invalid_snapshot": 422,
    "invalid_field": 422, "non_finite_output": 422, "nothing_to_run": 400, "invalid_request": 400,
    "state_not_persisted": 507, "internal_error": 500, "session_exists": 409, "session_owned_elsewhere": 503,
    "state_store_unavailable": 503, "invalid_seq": 409,
}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_engine(cls, error: Error) -> "APIError":
        return cls(ENGINE_STATUS.get(error.code, 500), error.code, error.message, error.field, error.retry_after)

    def body(self) -> dict:
        return error_body(self.status, self.code, self.message, self.field)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, field: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, code, message, field)


def error_body(status: int, code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field, "type": openai_type(status),
                      "param": field}}


def openai_type(status: int) -> str:
    """OpenAI's error `type` for a status (its clients read it; our `code` says more)."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"
