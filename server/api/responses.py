"""Bytes out: JSON through orjson (numpy arrays serialised natively), large bodies encoded off the event loop,
server-sent events, and the contract's error body."""
from __future__ import annotations

import asyncio

import orjson
from fastapi.responses import Response, StreamingResponse

from server.api.errors import APIError

OFF_LOOP_VALUES = 65_536  # answers with more numbers than this are encoded in a worker thread
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class JSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content, option=_OPTIONS)


def dumps(content) -> bytes:
    return orjson.dumps(content, option=_OPTIONS)


async def json_response(content, num_values: int = 0, status_code: int = 200) -> JSON:
    """A JSON answer; one carrying many numbers is encoded in a thread so /health and other streams don't wait."""
    if num_values > OFF_LOOP_VALUES:
        return JSON(await asyncio.to_thread(dumps, content), status_code=status_code)
    return JSON(content, status_code=status_code)


def error_response(error: APIError) -> JSON:
    return JSON(error.body(), status_code=error.status, headers=error.headers())


def sse(data) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else dumps(data)) + b"\n\n"


def sse_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
