"""WS /v1/stream: one connection drives one session at a time with frames (DESIGN.md §5).

Client frames (JSON text): open, append, generate, snapshot, close, cancel. Server frames: opened, outputs, token,
done, snapshot, error. An error frame answers the frame that caused it and leaves the connection usable.
While a generate runs the connection keeps reading: a cancel frame stops it (its done frame then says
finish_reason "cancelled"), other frames wait their turn, and a disconnect stops the work at once.

Binary frames carry an append's inputs without JSON number parsing:
    [u32 little-endian n][n bytes: UTF-8 JSON header][payload]
The header is an append frame without input_ids/inputs, plus "dtype": "float32" (inputs, shape (steps, d_input))
or "int32" (input_ids); the payload is that many little-endian values, row-major.
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct

import torch
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server import schemas
from server.errors import APIError, bad_request


async def serve_websocket(server, websocket: WebSocket) -> None:
    from server.app import check_api_key, error_response

    authorization = websocket.headers.get("authorization", "")
    if not authorization and websocket.query_params.get("api_key"):
        authorization = "Bearer " + websocket.query_params["api_key"]  # browsers can't set headers on websockets
    error = check_api_key(server, authorization)
    if error is None and not server.is_ready:
        error = APIError(503, "not_ready", "the model is loading; retry later", retry_after=2)
    if error is not None:
        server.metrics.http_requests.labels("/v1/stream", str(error.status)).inc()
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.accept()
    server.metrics.http_requests.labels("/v1/stream", "101").inc()
    conn = Connection(server, websocket)
    try:
        while not conn.disconnected:
            message = conn.pending.pop(0) if conn.pending else await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            kind = "?"
            try:
                frame, tensor = decode_message(server, message)
                kind = frame.type
                keep_open = await conn.handle(frame, tensor)
                server.metrics.http_requests.labels(f"/v1/stream:{kind}", "200").inc()
                if not keep_open:
                    await websocket.close(1000)
                    break
            except APIError as exc:
                server.metrics.http_requests.labels(f"/v1/stream:{kind}", str(exc.status)).inc()
                await websocket.send_json({"type": "error", **exc.body()})
    except WebSocketDisconnect:
        pass
    finally:
        if websocket.client_state == WebSocketState.CONNECTED:
            try:
                await websocket.close(1000)
            except RuntimeError:
                pass


def decode_message(server, message: dict):
    from server.app import parse

    limit = server.config.max_ws_frame_bytes
    tensor = None
    if message.get("bytes") is not None:
        data = message["bytes"]
        if len(data) > limit:
            raise APIError(413, "frame_too_large", f"the frame exceeds max_ws_frame_bytes ({limit})")
        if len(data) < 4:
            raise bad_request("binary frame too short for its header length", "binary")
        n = struct.unpack("<I", data[:4])[0]
        if 4 + n > len(data):
            raise bad_request("binary frame header length runs past the frame", "binary")
        header = _json(data[4:4 + n])
        if not isinstance(header, dict) or header.get("type", "append") != "append":
            raise bad_request("a binary frame's header must be an append frame", "type")
        dtype = header.pop("dtype", "float32")
        payload = data[4 + n:]
        tensor = binary_tensor(server, dtype, payload)
        header["type"] = "append"
        data_obj = header
    else:
        text = message.get("text") or ""
        if len(text) > limit:
            raise APIError(413, "frame_too_large", f"the frame exceeds max_ws_frame_bytes ({limit})")
        data_obj = _json(text.encode())
    if not isinstance(data_obj, dict):
        raise bad_request("a frame is a JSON object", "type")
    model_cls = schemas.WS_FRAMES.get(data_obj.get("type"))
    if model_cls is None:
        raise bad_request(f"unknown frame type {data_obj.get('type')!r}; expected one of "
                          f"{', '.join(schemas.WS_FRAMES)}", "type")
    return parse(model_cls, data_obj), tensor


def _json(data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, "invalid_json", f"the frame is not valid JSON: {exc}") from None


def binary_tensor(server, dtype: str, payload: bytes) -> torch.Tensor:
    config = server.model.config
    if dtype == "float32":
        if config.d_input is None:
            raise bad_request("this model takes token ids; send dtype int32", "dtype")
        width = 4 * config.d_input
        if len(payload) % width:
            raise APIError(422, "wrong_feature_width", f"payload of {len(payload)} bytes is not a whole number of "
                           f"float32 steps of width {config.d_input}", "inputs")
        tensor = torch.frombuffer(bytearray(payload), dtype=torch.float32).reshape(-1, config.d_input).clone()
        if not torch.isfinite(tensor).all():
            raise APIError(422, "invalid_field", "inputs hold NaN or infinity", "inputs")
    elif dtype == "int32":
        if config.vocab_size is None:
            raise bad_request("this model takes float vectors; send dtype float32", "dtype")
        if len(payload) % 4:
            raise bad_request("int32 payload length is not a multiple of 4", "input_ids")
        tensor = torch.frombuffer(bytearray(payload), dtype=torch.int32).to(torch.int64)
        bad = ((tensor < 0) | (tensor >= config.vocab_size)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise APIError(422, "token_out_of_vocabulary", f"token id {int(tensor[i])} is outside the vocabulary",
                           f"input_ids[{i}]")
    else:
        raise bad_request(f"dtype must be float32 or int32, got {dtype!r}", "dtype")
    from server.app import check_steps

    check_steps(server, tensor.shape[0], "inputs")
    return tensor


class Connection:
    MAX_PENDING = 64  # frames read ahead while a generate runs; beyond that the socket's own flow control holds

    def __init__(self, server, websocket: WebSocket):
        self.server = server
        self.ws = websocket
        self.session_id: str | None = None
        self.pending: list[dict] = []  # messages read during a generate, handled after it in order
        self.disconnected = False

    def _session(self) -> str:
        if self.session_id is None:
            raise bad_request("no open session on this connection; send an open frame first", "type")
        return self.session_id

    async def handle(self, frame, tensor) -> bool:
        from server.app import (append_tensor, decode_b64, note_generate_done, output_kinds, session_append,
                                session_generate_open)

        sessions = self.server.sessions
        if frame.type == "open":
            if frame.session is not None and frame.snapshot is not None:
                raise bad_request("give session or snapshot, not both", "session")
            if frame.session is not None:
                session = sessions.get(frame.session)
            else:
                snapshot = decode_b64(frame.snapshot, "snapshot") if frame.snapshot is not None else None
                session = await sessions.create(snapshot)
            self.session_id = session.id
            await self.ws.send_json({"type": "opened", "session": session.id, "steps": session.steps})
        elif frame.type == "append":
            sid = self._session()
            if tensor is not None:
                if frame.input_ids is not None or frame.inputs is not None or frame.text is not None:
                    raise bad_request("a binary frame carries its inputs in the payload", "inputs")
                kinds = output_kinds(self.server, frame.outputs)
                result = await append_tensor(self.server, sid, tensor, kinds)
            else:
                result = await session_append(self.server, sid, frame)
            await self.ws.send_json({"type": "outputs", **result})
        elif frame.type == "generate":
            session, stream = await session_generate_open(self.server, self._session(), frame)
            try:
                await self._generate(session, stream, note_generate_done)
            finally:
                stream.cancel()
                sessions.release(session)
        elif frame.type == "cancel":
            raise APIError(409, "nothing_to_cancel", "no generate is running on this connection", "type")
        elif frame.type == "snapshot":
            sid = self._session()
            data = await sessions.snapshot(sid)
            await self.ws.send_json({"type": "snapshot", "session": sid, "snapshot": base64.b64encode(data).decode(),
                                     "steps": sessions.get(sid).steps})
        elif frame.type == "close":
            if frame.delete and self.session_id is not None:
                await sessions.delete(self.session_id)
            self.session_id = None
            return False
        return True

    async def _generate(self, session, stream, note_generate_done) -> None:
        """Send a generate's token frames, reading the socket meanwhile for a cancel frame or a disconnect."""
        tokens, events = [], stream.__aiter__()
        next_event = asyncio.ensure_future(events.__anext__())
        incoming = asyncio.ensure_future(self.ws.receive())
        try:
            while True:
                # once cancelled, or with the read-ahead full, only the generate is awaited
                waiting = {next_event} if incoming is None else {next_event, incoming}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if incoming in done:
                    message, incoming = incoming.result(), None
                    if message["type"] == "websocket.disconnect":
                        self.disconnected = True
                        return  # the caller's finally cancels the work and frees the session
                    if _is_cancel(message):
                        # the engine stops the stream between steps and answers with its done event, which
                        # carries the session's step count and last logits as the state now stands
                        stream.engine.abort(stream.seq)
                    else:
                        self.pending.append(message)
                        if len(self.pending) < self.MAX_PENDING:
                            incoming = asyncio.ensure_future(self.ws.receive())
                if next_event in done:
                    try:
                        event = next_event.result()
                    except StopAsyncIteration:
                        return
                    if event[0] == "token":
                        tokens.append(event[1])
                        await self.ws.send_json({"type": "token", "id": event[1], "text": event[2]})
                    elif event[0] == "done":
                        await self._send_done(session, stream, tokens, event[1], note_generate_done)
                        return
                    elif event[0] == "error":
                        raise event[1]
                    next_event = asyncio.ensure_future(events.__anext__())
        finally:
            next_event.cancel()
            if incoming is not None:
                if incoming.done() and not incoming.cancelled():
                    self.pending.append(incoming.result())  # read but not handled: keep its place
                else:
                    incoming.cancel()

    async def _send_done(self, session, stream, tokens, info, note_generate_done) -> None:
        note_generate_done(session, info)
        text = stream.seq.detok.text if self.server.tokenizer is not None and stream.seq.detok is not None else None
        await self.ws.send_json({"type": "done", "ids": tokens, "text": text, "finish_reason": info["finish_reason"],
                                 "steps": session.steps})


def _is_cancel(message: dict) -> bool:
    text = message.get("text")
    if not text or len(text) > 256:
        return False
    try:
        return json.loads(text).get("type") == "cancel"
    except (ValueError, AttributeError):
        return False
