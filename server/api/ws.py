"""WS /v1/stream: one connection drives one session at a time with frames (DESIGN.md §5).

Client frames (JSON text): open, append, generate, snapshot, close, cancel. Server frames: opened, outputs, token,
done, snapshot, error. An error frame answers the frame that caused it and leaves the connection usable.

Pipelining: a client may send many frames without waiting. Each is submitted to the engine as it arrives (the
engine applies a session's operations in arrival order) and answered in that same order, so a stream of small
chunks costs one round trip in all, not one per chunk. A cancel frame stops every generate sent before it that is
still running (their done frames say finish_reason "cancelled"); a disconnect stops all work at once.

Binary frames carry an append's inputs without JSON number parsing:
    [u32 little-endian n][n bytes: UTF-8 JSON header][payload]
The header is an append frame without input_ids/inputs, plus "dtype": "float32" (inputs, shape (steps, d_input))
or "int32" (input_ids); the payload is that many little-endian values, row-major. With "binary": true in the
header (or in a JSON append frame) the outputs come back as a binary frame of the same layout: a JSON header
{"type": "outputs", "steps", "kinds": {kind: [rows, width]}} and then each kind's float32 values in that order.
"""
from __future__ import annotations

import asyncio
import base64
import struct

import msgspec
import numpy as np
import orjson
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server.api import schemas
from server.api.edge import Edge
from server.api.errors import APIError, bad_request
from server.api.middleware import check_api_key
from server.api.requests import session_call
from server.api.responses import error_response
from server.api.session_ops import create, generate_events, new_session_id, open_generate, start_append
from server.api.validation import loads, parse

_FAST_APPEND = schemas.FAST_DECODERS[schemas.WSAppend]
MAX_IN_FLIGHT = 64  # frames submitted and not yet answered; beyond that the socket's own flow control holds


async def serve_websocket(edge: Edge, websocket: WebSocket) -> None:
    authorization = websocket.headers.get("authorization", "")
    if not authorization and websocket.query_params.get("api_key"):
        authorization = "Bearer " + websocket.query_params["api_key"]  # browsers can't set headers on websockets
    error = check_api_key(edge, authorization)
    if error is None and not edge.is_ready:
        error = edge.not_ready()
    if error is not None:
        edge.metrics.count_request("/v1/stream", error.status)
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.accept()
    edge.metrics.count_request("/v1/stream", 101)
    await Connection(edge, websocket).serve()


class Connection:
    def __init__(self, edge: Edge, websocket: WebSocket):
        self.edge = edge
        self.ws = websocket
        self.session_id: str | None = None
        self.answers: asyncio.Queue = asyncio.Queue(MAX_IN_FLIGHT)  # (kind, awaitable or value), in frame order
        self.generates: list = []  # generate runs submitted and not finished

    async def serve(self) -> None:
        sender = asyncio.create_task(self._send_answers())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if not await self._on_message(message):
                    await self.answers.put(("close", None))
                    await sender
                    return
        except WebSocketDisconnect:
            pass
        finally:
            for run in self.generates:
                run.stream.cancel()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self._drop_unsent()
            if self.ws.client_state == WebSocketState.CONNECTED:
                try:
                    await self.ws.close(1000)
                except RuntimeError:
                    pass

    def _drop_unsent(self) -> None:
        while not self.answers.empty():
            kind, item = self.answers.get_nowait()
            if asyncio.iscoroutine(item):
                item.close()
            elif kind == "generate":
                item.stream.cancel()

    async def _on_message(self, message: dict) -> bool:
        """Submit one frame's work and queue its answer; False after a close frame."""
        kind = "?"
        try:
            frame, array = self._decode(message)
            kind = frame.type
            if frame.type == "close":
                await self.answers.put(("closing", frame))
                return False
            await self._submit(frame, array)
            self.edge.metrics.count_request(f"/v1/stream:{kind}", 200)
        except APIError as exc:
            self.edge.metrics.count_request(f"/v1/stream:{kind}", exc.status)
            await self.answers.put(("frame", {"type": "error", **exc.body()}))
        return True

    async def _submit(self, frame, array) -> None:
        edge = self.edge
        if frame.type == "open":
            if frame.session is not None and frame.snapshot is not None:
                raise bad_request("give session or snapshot, not both", "session")
            # /v1/stream?session=ID names the session in the URL, where a proxy can route by it
            session = frame.session or (self.ws.query_params.get("session") if frame.snapshot is None else None)
            if session is not None:
                reply = await session_call(edge, "info", session)
            else:
                reply = await create(edge, frame.snapshot, new_session_id(self.ws.headers))
            self.session_id = reply.session
            await self.answers.put(("frame", {"type": "opened", "session": reply.session, "steps": reply.steps}))
        elif frame.type == "append":
            sid = self._session()
            kinds = edge.validator.output_kinds(frame.outputs)
            if array is None:
                array = edge.validator.inputs(frame.input_ids, frame.inputs, frame.text)
            elif frame.input_ids is not None or frame.inputs is not None or frame.text is not None:
                raise bad_request("a binary frame carries its inputs in the payload", "inputs")
            answer = await start_append(edge, sid, array, kinds, wait_if_busy=True, seq=frame.seq)
            await self.answers.put(("outputs-binary" if frame.binary else "outputs", answer))
        elif frame.type == "generate":
            run = await open_generate(edge, self._session(), frame, wait_if_busy=True)
            self.generates.append(run)
            await self.answers.put(("generate", run))
        elif frame.type == "cancel":
            if not self.generates:
                raise APIError(409, "nothing_to_cancel", "no generate is running on this connection", "type")
            for run in self.generates:
                run.stream.abort()
        elif frame.type == "snapshot":
            sid = self._session()
            await self.answers.put(("snapshot", session_call(edge, "snapshot", sid, wait_if_busy=True)))

    async def _send_answers(self) -> None:
        while True:
            kind, item = await self.answers.get()
            try:
                if kind == "frame":
                    await self._send_json(item)
                elif kind == "outputs":
                    await self._send_json({"type": "outputs", **await item})
                elif kind == "outputs-binary":
                    await self.ws.send_bytes(binary_outputs(await item))
                elif kind == "generate":
                    await self._stream_generate(item)
                elif kind == "snapshot":
                    reply = await item
                    await self._send_json({"type": "snapshot", "session": reply.session, "steps": reply.steps,
                                           "snapshot": base64.b64encode(reply.data).decode()})
                elif kind == "closing":
                    if item.delete and self.session_id is not None:
                        await session_call(self.edge, "delete", self.session_id, wait_if_busy=True)
                    self.session_id = None
                elif kind == "close":
                    await self.ws.close(1000)
                    return
            except APIError as exc:
                await self._send_json({"type": "error", **exc.body()})

    async def _stream_generate(self, run) -> None:
        try:
            async for kind, body in generate_events(self.edge, run):
                if kind == "token":
                    await self._send_json({"type": "token", "id": body["token"], "text": body["text"]})
                else:
                    await self._send_json({"type": "done", "ids": body["ids"], "text": body["text"],
                                           "finish_reason": body["finish_reason"], "steps": body["steps"]})
        finally:
            self.generates.remove(run)

    async def _send_json(self, body: dict) -> None:
        await self.ws.send_text(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY).decode())

    def _session(self) -> str:
        if self.session_id is None:
            raise bad_request("no open session on this connection; send an open frame first", "type")
        return self.session_id

    def _decode(self, message: dict):
        limit = self.edge.config.max_ws_frame_bytes
        array = None
        if message.get("bytes") is not None:
            data = message["bytes"]
            if len(data) > limit:
                raise APIError(413, "frame_too_large", f"the frame exceeds max_ws_frame_bytes ({limit})")
            if len(data) < 4:
                raise bad_request("binary frame too short for its header length", "binary")
            n = struct.unpack("<I", data[:4])[0]
            if 4 + n > len(data):
                raise bad_request("binary frame header length runs past the frame", "binary")
            header = loads(data[4:4 + n], "the frame's header")
            if not isinstance(header, dict) or header.get("type", "append") != "append":
                raise bad_request("a binary frame's header must be an append frame", "type")
            dtype = header.pop("dtype", "float32")
            array = self._binary_inputs(dtype, data[4 + n:])
            header["type"] = "append"
            obj = header
        else:
            text = message.get("text") or ""
            if len(text) > limit:
                raise APIError(413, "frame_too_large", f"the frame exceeds max_ws_frame_bytes ({limit})")
            raw = text.encode("utf-8", "surrogatepass")
            try:  # the common frame, an append, through its msgspec mirror (schemas.FAST_DECODERS)
                return _FAST_APPEND.decode(raw), None
            except msgspec.MsgspecError:
                pass
            obj = loads(raw, "the frame")
        if not isinstance(obj, dict):
            raise bad_request("a frame is a JSON object", "type")
        model_cls = schemas.WS_FRAMES.get(obj.get("type"))
        if model_cls is None:
            raise bad_request(f"unknown frame type {obj.get('type')!r}; expected one of "
                              f"{', '.join(schemas.WS_FRAMES)}", "type")
        return parse(model_cls, obj), array

    def _binary_inputs(self, dtype: str, payload: bytes) -> np.ndarray:
        check, model = self.edge.validator, self.edge.model
        if not payload:
            raise bad_request("the binary frame has no payload (no steps to append)", "inputs")
        if dtype == "float32":
            if model.d_input is None:
                raise bad_request("this model takes token ids; send dtype int32", "dtype")
            width = 4 * model.d_input
            if len(payload) % width:
                raise APIError(422, "wrong_feature_width", f"payload of {len(payload)} bytes is not a whole number "
                               f"of float32 steps of width {model.d_input}", "inputs")
            array = np.frombuffer(payload, dtype="<f4").reshape(-1, model.d_input)
            check.finite(array, "inputs")
        elif dtype == "int32":
            if model.vocab_size is None:
                raise bad_request("this model takes float vectors; send dtype float32", "dtype")
            if len(payload) % 4:
                raise bad_request("int32 payload length is not a multiple of 4", "input_ids")
            array = check.token_ids(np.frombuffer(payload, dtype="<i4"), "input_ids")
        else:
            raise bad_request(f"dtype must be float32 or int32, got {dtype!r}", "dtype")
        check.steps(array.shape[0], "inputs")
        return array


def binary_outputs(result: dict) -> bytes:
    """An outputs answer as one binary frame: a JSON header, then each kind's float32 values (row-major)."""
    arrays = {k: np.asarray(v, dtype="<f4") for k, v in result["results"].items()}
    numbered = {k: result[k] for k in ("seq", "replayed") if k in result}
    header = orjson.dumps({"type": "outputs", "steps": result["steps"], **numbered,
                           "kinds": {k: list(a.shape) for k, a in arrays.items()}})
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays.values())
