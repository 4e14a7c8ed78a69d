"""The one error type of the API: a 4xx (or 503) with the contract's body {"error": {code, message, field}}."""
from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, field: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, code, message, field)
