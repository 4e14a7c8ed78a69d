"""Python clients for the InfoMamba Serve API (DESIGN.md §5).

    from clients.client import InfoMambaClient

    with InfoMambaClient("http://127.0.0.1:8000", api_key=None) as client:
        print(client.completions("Once upon a time", max_tokens=32)["choices"][0]["text"])
        for text in client.stream_text("Once upon a time", max_tokens=32):
            print(text, end="", flush=True)
        session = client.create_session()
        session.append(input_ids=[1, 2, 3], outputs=["head"])
        blob = session.snapshot()                        # safetensors bytes; resume anywhere:
        resumed = client.create_session(snapshot=blob)

    with client.stream_session() as ws:                  # WS /v1/stream
        ws.append(text="a long document, chunk by chunk")
        for frame in ws.generate(max_tokens=16):
            ...

`AsyncInfoMambaClient` / `AsyncStreamSession` mirror these with `async`/`await`. Responses are the server's JSON
as plain dicts; every error response raises `InfoMambaError` (status, code, field, message, retry_after).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, AsyncIterator, Iterator
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 120.0
# Behind a proxy over several replicas, a request may reach a session's new replica before the old one has handed
# it over (503 session_owned_elsewhere: nothing was applied, so retrying is safe). Retried this long: a dead
# replica's lease TTL (10 s by default) and a little more.
SESSION_MOVE_WAIT = 15.0
# An append numbered with `seq` is answered from the session's record when it was applied before, so every failure
# that leaves its effect unknown may be retried: a broken connection, a proxy's 502/504 for a replica that died
# with the request in flight, the session still busy with the first try, a replica or its store unavailable.
NUMBERED_RETRY_STATUSES = (409, 502, 503, 504)
NUMBERED_RETRY_CODES = ("session_busy", "session_owned_elsewhere", "engine_unavailable", "state_store_unavailable",
                        "no_free_slots", "error")  # "error": a proxy's own (non-JSON) 502/504 page
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


class InfoMambaError(Exception):
    """An error answer from the server: a 4xx/5xx body, an error event inside an SSE stream or an error frame on
    the websocket (these two carry no HTTP status: `status` is 0 there), or a transport failure (status 0, code
    "connection_error")."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        status = f"{self.status} " if self.status else ""
        return f"{status}{self.code}: {self.message}{where}"

    @classmethod
    def from_body(cls, status: int, body: Any, retry_after: float | None = None) -> "InfoMambaError":
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return cls(status, str(error.get("code") or "error"), str(error.get("message") or ""),
                       error.get("field"), retry_after)
        if isinstance(body, dict) and "detail" in body:  # a framework error that bypassed the API's handler
            return cls(status, "error", str(body["detail"]), None, retry_after)
        return cls(status, "error", body if isinstance(body, str) else json.dumps(body), None, retry_after)

    @classmethod
    def from_response(cls, response: httpx.Response) -> "InfoMambaError":
        retry_after = _parse_retry_after(response.headers.get("retry-after"))
        try:
            body = response.json()
        except ValueError:
            body = response.text or response.reason_phrase
        return cls.from_body(response.status_code, body, retry_after)


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise InfoMambaError.from_response(response)
    return response


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _b64(snapshot: bytes | str) -> str:
    return snapshot if isinstance(snapshot, str) else base64.b64encode(snapshot).decode("ascii")


def _drop_none(body: dict) -> dict:
    return {k: v for k, v in body.items() if v is not None}


def _inputs_body(input_ids=None, inputs=None, text=None, outputs=None, seq: int | None = None) -> dict:
    return _drop_none({"input_ids": _to_list(input_ids), "inputs": _to_list(inputs), "text": text,
                       "outputs": list(outputs) if outputs is not None else None, "seq": seq})


def _may_retry(err: "InfoMambaError", numbered: bool, deadline: float) -> bool:
    """Retry a request after `err`? Any request when its session is moving between replicas (nothing was
    applied); a numbered append after any failure of unknown effect. Up to the deadline."""
    if time.monotonic() > deadline:
        return False
    if err.code == "session_owned_elsewhere":
        return True
    return numbered and (err.status == 0 or err.status in NUMBERED_RETRY_STATUSES) and err.code in (
        *NUMBERED_RETRY_CODES, "connection_error")


def _to_list(value):
    """numpy arrays and torch tensors (also inside lists) become nested lists; plain lists pass through."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)) and value and (hasattr(value[0], "tolist") or
                                                       isinstance(value[0], (list, tuple))):
        return [_to_list(v) for v in value]
    return value


def _sse_event(line: str):
    """One `data:` line of an SSE stream: the decoded JSON, None for other lines, StopIteration's marker at [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    event = json.loads(data)
    if isinstance(event, dict) and isinstance(event.get("error"), dict):
        raise InfoMambaError.from_body(0, event)
    return event


_DONE = object()


def chunk_text(chunk: dict) -> str:
    """The new text of one completions or session-generate stream chunk (the final `done` chunk repeats the whole
    text, so it adds none)."""
    if chunk.get("done"):
        return ""
    choices = chunk.get("choices")
    if choices:
        return choices[0].get("text") or ""
    return chunk.get("text") or ""


def ws_url(url: str, session: str | None = None) -> str:
    """The websocket's URL; an existing session's id goes in it too, where a proxy routes by it (docker/nginx)."""
    base = url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return base + "/v1/stream" + (f"?session={quote(session, safe='')}" if session else "")


# --- HTTP, synchronous ------------------------------------------------------------------------------------------

class InfoMambaClient:
    """Every HTTP route of the API. One connection pool; use as a context manager or call close()."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "InfoMambaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, numbered: bool = False, **kwargs) -> httpx.Response:
        deadline = time.monotonic() + SESSION_MOVE_WAIT
        while True:
            try:
                try:
                    return _check(self._http.request(method, path, **kwargs))
                except httpx.TransportError as exc:
                    raise InfoMambaError(0, "connection_error", f"{method} {self.url}{path}: {exc}") from exc
            except InfoMambaError as err:
                if not _may_retry(err, numbered, deadline):
                    raise
                time.sleep(min(err.retry_after or 0.2, 1.0))

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise InfoMambaError.from_response(response)
                for line in response.iter_lines():
                    event = _sse_event(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise InfoMambaError(0, "connection_error", f"POST {self.url}{path}: {exc}") from exc

    # health and metrics
    def health(self) -> dict:
        return _json_or_empty(self._request("GET", "/health"))

    def ready(self) -> dict:
        """The /ready body; raises InfoMambaError (503) while the model is loading."""
        return _json_or_empty(self._request("GET", "/ready"))

    def is_ready(self) -> bool:
        try:
            self.ready()
            return True
        except InfoMambaError:
            return False

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # models
    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["data"]

    # completions
    def completions(self, prompt, model: str | None = None, **fields) -> dict:
        return self._request("POST", "/v1/completions", json=_completion_body(prompt, model, fields, False)).json()

    def stream_completions(self, prompt, model: str | None = None, **fields) -> Iterator[dict]:
        """SSE chunks (OpenAI's text_completion objects) until `data: [DONE]`."""
        return self._stream("/v1/completions", _completion_body(prompt, model, fields, True))

    def stream_text(self, prompt, model: str | None = None, **fields) -> Iterator[str]:
        for chunk in self.stream_completions(prompt, model, **fields):
            text = chunk_text(chunk)
            if text:
                yield text

    # forward
    def forward(self, input_ids=None, inputs=None, text=None, outputs=None, return_state: bool = False) -> dict:
        body = _inputs_body(input_ids, inputs, text, outputs)
        if return_state:
            body["return_state"] = True
        return self._request("POST", "/v1/forward", json=body).json()

    # sessions
    def create_session(self, snapshot: bytes | str | None = None, numbered: bool = False) -> "Session":
        """numbered: the handle numbers its appends (seq 1, 2, ...), so each is retried safely (Session.append)."""
        body = {"snapshot": _b64(snapshot)} if snapshot is not None else {}
        data = self._request("POST", "/v1/sessions", json=body).json()
        return Session(self, data["id"], data.get("steps", 0), next_seq=1 if numbered else None)

    def session(self, session_id: str, steps: int = 0, next_seq: int | None = None) -> "Session":
        """A handle on an existing session (no request is made); next_seq: number its appends from there."""
        return Session(self, session_id, steps, next_seq)

    def sessions(self) -> list[dict]:
        """Every session (with a shared store, every replica's): id, steps, resident here, owner replica."""
        return self._request("GET", "/v1/sessions").json()["data"]

    def append(self, session_id: str, input_ids=None, inputs=None, text=None, outputs=None,
               seq: int | None = None) -> dict:
        """seq: this append's number in the session (increasing). Then a failure of unknown effect (a dropped
        connection, a replica dying behind a proxy) is retried, and an append that was applied already is
        answered from the server's record ("replayed": true, its steps, no outputs) instead of being applied
        again."""
        return self._request("POST", f"/v1/sessions/{session_id}/append", numbered=seq is not None,
                             json=_inputs_body(input_ids, inputs, text, outputs, seq)).json()

    def generate(self, session_id: str, prompt: str | None = None, input_ids=None, **fields) -> dict:
        return self._request("POST", f"/v1/sessions/{session_id}/generate",
                             json=_generate_body(prompt, input_ids, fields, False)).json()

    def stream_generate(self, session_id: str, prompt: str | None = None, input_ids=None, **fields) -> Iterator[dict]:
        return self._stream(f"/v1/sessions/{session_id}/generate", _generate_body(prompt, input_ids, fields, True))

    def snapshot(self, session_id: str) -> bytes:
        return self._request("GET", f"/v1/sessions/{session_id}/snapshot").content

    def fork(self, session_id: str) -> "Session":
        data = self._request("POST", f"/v1/sessions/{session_id}/fork").json()
        return Session(self, data["id"], data.get("steps", 0))

    def delete_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    # websocket
    def stream_session(self, session: str | None = None, snapshot: bytes | str | None = None,
                       **kwargs) -> "StreamSession":
        """Open WS /v1/stream: a new session, an existing one by id, or one resumed from a snapshot."""
        return StreamSession.connect(self.url, self.api_key, session=session, snapshot=snapshot,
                                     timeout=self.timeout, **kwargs)


class _SessionHandle:
    """A session's id and the server's step count, updated from each answer."""

    def __init__(self, client, session_id: str, steps: int = 0, next_seq: int | None = None):
        self.client = client
        self.id = session_id
        self.steps = steps
        self.next_seq = next_seq  # None: appends go unnumbered

    def _number(self) -> int | None:
        seq = self.next_seq
        if seq is not None:
            self.next_seq = seq + 1
        return seq

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, steps={self.steps})"

    def _track(self, data: dict) -> dict:
        if isinstance(data.get("steps"), int):
            self.steps = data["steps"]
        return data


class Session(_SessionHandle):
    """An HTTP session handle; `steps` follows the server's count after each call."""

    def append(self, input_ids=None, inputs=None, text=None, outputs=None) -> dict:
        """Numbered (and so retried safely) when the handle has next_seq."""
        return self._track(self.client.append(self.id, input_ids, inputs, text, outputs, self._number()))

    def generate(self, prompt: str | None = None, input_ids=None, **fields) -> dict:
        return self._track(self.client.generate(self.id, prompt, input_ids, **fields))

    def stream_generate(self, prompt: str | None = None, input_ids=None, **fields) -> Iterator[dict]:
        for chunk in self.client.stream_generate(self.id, prompt, input_ids, **fields):
            self._track(chunk)
            yield chunk

    def snapshot(self) -> bytes:
        return self.client.snapshot(self.id)

    def fork(self) -> "Session":
        return self.client.fork(self.id)

    def delete(self) -> None:
        self.client.delete_session(self.id)


def _json_or_empty(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"status": response.text}
    return body if isinstance(body, dict) else {"status": body}


def _check_fields(fields: dict) -> None:
    unknown = set(fields) - set(SAMPLING_FIELDS) - {"stream_options", "user", "model"}
    if unknown:
        raise TypeError(f"unknown sampling fields: {sorted(unknown)}")


def _completion_body(prompt, model, fields: dict, stream: bool) -> dict:
    _check_fields(fields)
    body = _drop_none({"prompt": _to_list(prompt), "model": model, **fields})
    body["stream"] = stream
    return body


def _generate_body(prompt, input_ids, fields: dict, stream: bool) -> dict:
    _check_fields(fields)
    body = _drop_none({"prompt": prompt, "input_ids": _to_list(input_ids), **fields})
    body["stream"] = stream
    return body


# --- HTTP, asynchronous -----------------------------------------------------------------------------------------

class AsyncInfoMambaClient:
    """The async twin of InfoMambaClient (httpx.AsyncClient); `async with` or `await close()`."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 100):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout,
                                       transport=transport, limits=limits)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncInfoMambaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _request(self, method: str, path: str, numbered: bool = False, **kwargs) -> httpx.Response:
        deadline = time.monotonic() + SESSION_MOVE_WAIT
        while True:
            try:
                try:
                    return _check(await self._http.request(method, path, **kwargs))
                except httpx.TransportError as exc:
                    raise InfoMambaError(0, "connection_error", f"{method} {self.url}{path}: {exc}") from exc
            except InfoMambaError as err:
                if not _may_retry(err, numbered, deadline):
                    raise
                await asyncio.sleep(min(err.retry_after or 0.2, 1.0))

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise InfoMambaError.from_response(response)
                async for line in response.aiter_lines():
                    event = _sse_event(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise InfoMambaError(0, "connection_error", f"POST {self.url}{path}: {exc}") from exc

    async def health(self) -> dict:
        return _json_or_empty(await self._request("GET", "/health"))

    async def ready(self) -> dict:
        return _json_or_empty(await self._request("GET", "/ready"))

    async def is_ready(self) -> bool:
        try:
            await self.ready()
            return True
        except InfoMambaError:
            return False

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models")).json()["data"]

    async def completions(self, prompt, model: str | None = None, **fields) -> dict:
        body = _completion_body(prompt, model, fields, False)
        return (await self._request("POST", "/v1/completions", json=body)).json()

    def stream_completions(self, prompt, model: str | None = None, **fields) -> AsyncIterator[dict]:
        return self._stream("/v1/completions", _completion_body(prompt, model, fields, True))

    async def stream_text(self, prompt, model: str | None = None, **fields) -> AsyncIterator[str]:
        async for chunk in self.stream_completions(prompt, model, **fields):
            text = chunk_text(chunk)
            if text:
                yield text

    async def forward(self, input_ids=None, inputs=None, text=None, outputs=None, return_state: bool = False) -> dict:
        body = _inputs_body(input_ids, inputs, text, outputs)
        if return_state:
            body["return_state"] = True
        return (await self._request("POST", "/v1/forward", json=body)).json()

    async def create_session(self, snapshot: bytes | str | None = None, numbered: bool = False) -> "AsyncSession":
        body = {"snapshot": _b64(snapshot)} if snapshot is not None else {}
        data = (await self._request("POST", "/v1/sessions", json=body)).json()
        return AsyncSession(self, data["id"], data.get("steps", 0), next_seq=1 if numbered else None)

    def session(self, session_id: str, steps: int = 0, next_seq: int | None = None) -> "AsyncSession":
        return AsyncSession(self, session_id, steps, next_seq)

    async def sessions(self) -> list[dict]:
        return (await self._request("GET", "/v1/sessions")).json()["data"]

    async def append(self, session_id: str, input_ids=None, inputs=None, text=None, outputs=None,
                     seq: int | None = None) -> dict:
        body = _inputs_body(input_ids, inputs, text, outputs, seq)
        return (await self._request("POST", f"/v1/sessions/{session_id}/append", numbered=seq is not None,
                                    json=body)).json()

    async def generate(self, session_id: str, prompt: str | None = None, input_ids=None, **fields) -> dict:
        body = _generate_body(prompt, input_ids, fields, False)
        return (await self._request("POST", f"/v1/sessions/{session_id}/generate", json=body)).json()

    def stream_generate(self, session_id: str, prompt: str | None = None, input_ids=None,
                        **fields) -> AsyncIterator[dict]:
        return self._stream(f"/v1/sessions/{session_id}/generate", _generate_body(prompt, input_ids, fields, True))

    async def snapshot(self, session_id: str) -> bytes:
        return (await self._request("GET", f"/v1/sessions/{session_id}/snapshot")).content

    async def fork(self, session_id: str) -> "AsyncSession":
        data = (await self._request("POST", f"/v1/sessions/{session_id}/fork")).json()
        return AsyncSession(self, data["id"], data.get("steps", 0))

    async def delete_session(self, session_id: str) -> None:
        await self._request("DELETE", f"/v1/sessions/{session_id}")

    async def stream_session(self, session: str | None = None, snapshot: bytes | str | None = None,
                             **kwargs) -> "AsyncStreamSession":
        return await AsyncStreamSession.connect(self.url, self.api_key, session=session, snapshot=snapshot,
                                                timeout=self.timeout, **kwargs)


class AsyncSession(_SessionHandle):
    """The async twin of Session."""

    async def append(self, input_ids=None, inputs=None, text=None, outputs=None) -> dict:
        return self._track(await self.client.append(self.id, input_ids, inputs, text, outputs, self._number()))

    async def generate(self, prompt: str | None = None, input_ids=None, **fields) -> dict:
        return self._track(await self.client.generate(self.id, prompt, input_ids, **fields))

    async def stream_generate(self, prompt: str | None = None, input_ids=None, **fields) -> AsyncIterator[dict]:
        async for chunk in self.client.stream_generate(self.id, prompt, input_ids, **fields):
            self._track(chunk)
            yield chunk

    async def snapshot(self) -> bytes:
        return await self.client.snapshot(self.id)

    async def fork(self) -> "AsyncSession":
        return await self.client.fork(self.id)

    async def delete(self) -> None:
        await self.client.delete_session(self.id)


# --- websocket (WS /v1/stream) ----------------------------------------------------------------------------------

def _ws_frame(message) -> dict:
    if isinstance(message, bytes):
        return {"type": "binary", "data": message}
    return json.loads(message)


def _ws_raise(frame: dict) -> None:
    if frame.get("type") == "error":
        error = frame.get("error", frame)
        raise InfoMambaError(0, str(error.get("code") or "error"),
                             str(error.get("message") or ""), error.get("field"))


def _snapshot_bytes(frame: dict, binary: bytes | None) -> bytes:
    for key in ("snapshot", "data", "state"):
        if isinstance(frame.get(key), str):
            return base64.b64decode(frame[key])
    if binary is not None:
        return binary
    raise InfoMambaError(0, "protocol_error", f"snapshot frame without data: {sorted(frame)}")


def binary_append_frame(array, outputs=None, seq: int | None = None) -> bytes:
    """An append as one binary websocket frame: [u32 LE header length][JSON header][little-endian payload].
    Integer arrays go as int32 token ids (steps,), float arrays as float32 vectors (steps, d_input)."""
    import numpy as np

    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        dtype, payload = "int32", array.astype("<i4").reshape(-1)
    elif np.issubdtype(array.dtype, np.floating):
        if array.ndim != 2:
            raise ValueError(f"float inputs must be (steps, d_input), got shape {array.shape}")
        dtype, payload = "float32", array.astype("<f4")
    else:
        raise ValueError(f"expected an integer or float array, got {array.dtype}")
    header = {"type": "append", "dtype": dtype}
    if outputs is not None:
        header["outputs"] = list(outputs)
    if seq is not None:
        header["seq"] = seq
    head = json.dumps(header).encode()
    return len(head).to_bytes(4, "little") + head + np.ascontiguousarray(payload).tobytes()


PIPELINE_WINDOW = 8  # append frames in flight per websocket: enough to hide the round trip, few enough to stop early


class _Pipeline:
    """Which chunk to send next with at most `window` unanswered."""

    def __init__(self, chunks, window: int):
        self._chunks = iter(chunks)
        self.window = max(1, window)
        self.in_flight = 0

    def next_to_send(self):
        if self.in_flight >= self.window:
            return None
        piece = next(self._chunks, None)
        if piece is not None:
            self.in_flight += 1
        return piece

    def answered(self) -> None:
        self.in_flight -= 1


def _append_message(piece, outputs) -> bytes | str:
    if isinstance(piece, str):
        return json.dumps({"type": "append", **_inputs_body(None, None, piece, outputs)})
    return binary_append_frame(piece, outputs)


def _open_frame(session: str | None, snapshot: bytes | str | None) -> dict:
    frame: dict[str, Any] = {"type": "open"}
    if session is not None:
        frame["session"] = session
    if snapshot is not None:
        frame["snapshot"] = _b64(snapshot)
    return frame


class StreamSession:
    """One websocket on /v1/stream bound to a session. An error frame raises InfoMambaError and leaves the
    connection usable. `steps` follows the server's count."""

    def __init__(self, connection, timeout: float = DEFAULT_TIMEOUT):
        self._ws = connection
        self._timeout = timeout
        self.id: str | None = None
        self.steps = 0
        self.opened: dict = {}

    def _set_opened(self, opened: dict) -> None:
        self.opened = opened
        self.id = opened.get("session") or opened.get("id")
        self.steps = opened.get("steps", 0)

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, api_key: str | None = None, session: str | None = None,
                snapshot: bytes | str | None = None, timeout: float = DEFAULT_TIMEOUT,
                max_size: int | None = 64 * 1024 * 1024) -> "StreamSession":
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        try:
            ws = connect(ws_url(url, session), additional_headers=_headers(api_key), open_timeout=timeout,
                         max_size=max_size, compression=None)
            ws.__enter__()  # the connection is ours to close; entering tells websockets >= 16 as much
        except InvalidStatus as exc:
            raise _ws_handshake_error(exc) from exc
        except (OSError, WebSocketException) as exc:
            raise InfoMambaError(0, "connection_error", f"websocket {ws_url(url)}: {exc}") from exc
        ws_session = cls(ws, timeout)
        try:
            ws_session._set_opened(ws_session._request(_open_frame(session, snapshot), "opened"))
        except BaseException:
            ws.close()
            raise
        return ws_session

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, frame: dict) -> None:
        self._ws.send(json.dumps(frame))

    def _recv(self) -> tuple[dict, bytes | None]:
        message = self._ws.recv(timeout=self._timeout)
        frame = _ws_frame(message)
        _ws_raise(frame)
        if isinstance(frame.get("steps"), int):
            self.steps = frame["steps"]
        return frame, (message if isinstance(message, bytes) else None)

    def _request(self, frame: dict, answer: str) -> dict:
        self._send(frame)
        while True:
            reply, _ = self._recv()
            if reply.get("type") == answer:
                return reply

    def append(self, input_ids=None, inputs=None, text=None, outputs=None, seq: int | None = None) -> dict:
        """Feed one chunk; returns the `outputs` frame (per-step results, steps; with seq, "replayed")."""
        return self._request({"type": "append", **_inputs_body(input_ids, inputs, text, outputs, seq)}, "outputs")

    def append_array(self, array, outputs=None, seq: int | None = None) -> dict:
        """Feed one chunk given as a numpy array (int ids or (steps, d_input) floats) in a binary frame."""
        self._ws.send(binary_append_frame(array, outputs, seq))
        while True:
            reply, _ = self._recv()
            if reply.get("type") == "outputs":
                return reply

    def append_many(self, chunks, outputs=None, window: int = PIPELINE_WINDOW) -> Iterator[dict]:
        """Feed chunks (numpy arrays, sent as binary frames, or text) with up to `window` frames in flight;
        yields each chunk's `outputs` frame in order. The server applies them in order, so the result equals
        appending one at a time, without a round trip per chunk. After an error, close the session."""
        pending = _Pipeline(chunks, window)
        while (piece := pending.next_to_send()) is not None:
            self._ws.send(_append_message(piece, outputs))
        while pending.in_flight:
            reply, _ = self._recv()
            if reply.get("type") == "outputs":
                yield reply
                pending.answered()
                while (piece := pending.next_to_send()) is not None:
                    self._ws.send(_append_message(piece, outputs))

    def generate(self, prompt: str | None = None, input_ids=None, **fields) -> Iterator[dict]:
        """`token` frames as they are sampled, then the `done` frame."""
        body = _generate_body(prompt, input_ids, fields, True)
        body.pop("stream")
        self._send({"type": "generate", **body})
        while True:
            frame, _ = self._recv()
            yield frame
            if frame.get("type") == "done":
                return

    def generate_all(self, prompt: str | None = None, input_ids=None, **fields) -> dict:
        """Run generate to the end; returns the `done` frame with the token frames under "tokens"."""
        frames = list(self.generate(prompt, input_ids, **fields))
        done = dict(frames[-1])
        done.setdefault("tokens", [f for f in frames[:-1] if f.get("type") == "token"])
        return done

    def snapshot(self) -> bytes:
        self._send({"type": "snapshot"})
        while True:
            frame, binary = self._recv()
            if frame.get("type") == "snapshot":
                if "snapshot" not in frame and "data" not in frame and binary is None:
                    _, binary = self._recv()  # the blob follows as a binary frame
                return _snapshot_bytes(frame, binary)
            if frame.get("type") == "binary":
                return frame["data"]

    def close(self, delete: bool = False) -> None:
        """Send `close` (delete=True drops the session server-side) and close the socket."""
        try:
            frame = {"type": "close"}
            if delete:
                frame["delete"] = True
            self._send(frame)
        except Exception:  # noqa: BLE001 - the socket may already be gone; closing must not raise
            pass
        finally:
            self._ws.close()


class AsyncStreamSession:
    def __init__(self, connection, timeout: float = DEFAULT_TIMEOUT):
        self._ws = connection
        self._timeout = timeout
        self.id: str | None = None
        self.steps = 0
        self.opened: dict = {}

    _set_opened = StreamSession._set_opened

    @classmethod
    async def connect(cls, url: str = DEFAULT_URL, api_key: str | None = None, session: str | None = None,
                      snapshot: bytes | str | None = None, timeout: float = DEFAULT_TIMEOUT,
                      max_size: int | None = 64 * 1024 * 1024) -> "AsyncStreamSession":
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        try:
            ws = await connect(ws_url(url, session), additional_headers=_headers(api_key), open_timeout=timeout,
                               max_size=max_size, compression=None)
        except InvalidStatus as exc:
            raise _ws_handshake_error(exc) from exc
        except (OSError, WebSocketException) as exc:
            raise InfoMambaError(0, "connection_error", f"websocket {ws_url(url)}: {exc}") from exc
        ws_session = cls(ws, timeout)
        try:
            ws_session._set_opened(await ws_session._request(_open_frame(session, snapshot), "opened"))
        except BaseException:
            await ws.close()
            raise
        return ws_session

    async def __aenter__(self) -> "AsyncStreamSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _recv(self) -> tuple[dict, bytes | None]:
        import asyncio

        message = await asyncio.wait_for(self._ws.recv(), self._timeout)
        frame = _ws_frame(message)
        _ws_raise(frame)
        if isinstance(frame.get("steps"), int):
            self.steps = frame["steps"]
        return frame, (message if isinstance(message, bytes) else None)

    async def _request(self, frame: dict, answer: str) -> dict:
        await self._ws.send(json.dumps(frame))
        while True:
            reply, _ = await self._recv()
            if reply.get("type") == answer:
                return reply

    async def append(self, input_ids=None, inputs=None, text=None, outputs=None, seq: int | None = None) -> dict:
        return await self._request({"type": "append", **_inputs_body(input_ids, inputs, text, outputs, seq)},
                                   "outputs")

    async def append_array(self, array, outputs=None, seq: int | None = None) -> dict:
        await self._ws.send(binary_append_frame(array, outputs, seq))
        while True:
            reply, _ = await self._recv()
            if reply.get("type") == "outputs":
                return reply

    async def append_many(self, chunks, outputs=None, window: int = PIPELINE_WINDOW) -> AsyncIterator[dict]:
        """As StreamSession.append_many."""
        pending = _Pipeline(chunks, window)
        while (piece := pending.next_to_send()) is not None:
            await self._ws.send(_append_message(piece, outputs))
        while pending.in_flight:
            reply, _ = await self._recv()
            if reply.get("type") == "outputs":
                yield reply
                pending.answered()
                while (piece := pending.next_to_send()) is not None:
                    await self._ws.send(_append_message(piece, outputs))

    async def generate(self, prompt: str | None = None, input_ids=None, **fields) -> AsyncIterator[dict]:
        body = _generate_body(prompt, input_ids, fields, True)
        body.pop("stream")
        await self._ws.send(json.dumps({"type": "generate", **body}))
        while True:
            frame, _ = await self._recv()
            yield frame
            if frame.get("type") == "done":
                return

    async def generate_all(self, prompt: str | None = None, input_ids=None, **fields) -> dict:
        frames = [f async for f in self.generate(prompt, input_ids, **fields)]
        done = dict(frames[-1])
        done.setdefault("tokens", [f for f in frames[:-1] if f.get("type") == "token"])
        return done

    async def snapshot(self) -> bytes:
        await self._ws.send(json.dumps({"type": "snapshot"}))
        while True:
            frame, binary = await self._recv()
            if frame.get("type") == "snapshot":
                if "snapshot" not in frame and "data" not in frame and binary is None:
                    _, binary = await self._recv()
                return _snapshot_bytes(frame, binary)
            if frame.get("type") == "binary":
                return frame["data"]

    async def close(self, delete: bool = False) -> None:
        try:
            frame = {"type": "close"}
            if delete:
                frame["delete"] = True
            await self._ws.send(json.dumps(frame))
        except Exception:  # noqa: BLE001 - the socket may already be gone; closing must not raise
            pass
        finally:
            await self._ws.close()


def _ws_handshake_error(exc) -> InfoMambaError:
    """A refused websocket upgrade (401, 429, ...) carries the API's error body."""
    response = exc.response
    try:
        body = json.loads(response.body or b"")
    except ValueError:
        body = (response.body or b"").decode("utf-8", "replace") or response.reason_phrase
    retry_after = _parse_retry_after(response.headers.get("Retry-After"))
    return InfoMambaError.from_body(response.status_code, body, retry_after)
