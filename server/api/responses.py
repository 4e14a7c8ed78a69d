"""Bytes out: JSON through orjson (numpy arrays serialised natively), large bodies encoded off the event loop,
server-sent events, and the contract's error body."""
from __future__ import annotations

import asyncio

import orjson
from fastapi.responses import Response

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


def hole(name: str) -> str:
    """A value that Chunks.template leaves open, to be filled with `name`'s JSON per chunk."""
    return "\0" + name


class Chunks:
    """The SSE events `{**base, "choices": [choice]}` of one streamed answer, as sse() writes them, with the
    base's bytes encoded once instead of per token."""

    def __init__(self, base: dict):
        assert base, "the prefix below needs a key before choices"
        self.prefix = b"data: " + dumps(base)[:-1] + b',"choices":['

    def __call__(self, choice: dict) -> bytes:
        return self.prefix + dumps(choice) + b"]}\n\n"

    def template(self, choice: dict, *holes: str) -> list[bytes]:
        """A chunk's bytes cut where the choice holds hole(name) for each of `holes`, in that order: joined with
        those values' JSON in between, they are what __call__ writes for the choice with them. A token's chunk is
        so written without a dict per token, with the keys, order and layout the dict gives."""
        rest = self(choice)
        parts = []
        for name in holes:
            head, rest = rest.split(dumps(hole(name)), 1)
            parts.append(head)
        return parts + [rest]


_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                (b"content-type", b"text/event-stream; charset=utf-8")]  # as StreamingResponse wrote them


class EventStream(Response):
    """A streamed answer of server-sent events, as StreamingResponse sends it (and like it, stopped when the client
    goes away), without its task group per answer: the events are sent from the request's own task while one
    watcher task waits for the disconnect and cancels it."""

    status_code = 200
    background = None

    def __init__(self, events):  # a Response (FastAPI sends those as they are) with nothing of its own to render
        self.events = events
        self.raw_headers = _SSE_HEADERS

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        is_gone = False

        async def watch():
            nonlocal is_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            is_gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not is_gone:
                raise
            if hasattr(task, "uncancel"):  # (Python 3.11+ counts cancels) ours, for the disconnect: the answer ends
                task.uncancel()
        finally:
            watcher.cancel()
            await self.events.aclose()


def sse_response(events) -> EventStream:
    return EventStream(events)
