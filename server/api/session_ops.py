"""Session operations as both doors (HTTP routes and websocket frames) use them. The engine serialises the
operations of one session; `wait_if_busy` queues behind a running one (websocket pipelining) instead of a 409."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from server.api.edge import Edge
from server.api.errors import bad_request
from server.api.requests import Finish, Token, collect, generate, session_call, submit
from server.api.validation import decode_b64
from server.engine.client import RequestStream
from server.engine.protocol import Sampling

__all__ = ["append", "create", "generate_events", "generate_result", "new_session_id", "open_generate",
           "session_call", "start_append"]

# A proxy in front of several replicas (docker/nginx) routes a session's requests by its id; for a request that
# creates a session it picks the id, routes by it, and sends it in this header, so the session is created on the
# replica its later requests will reach.
NEW_SESSION_HEADER = "x-infomamba-new-session-id"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def new_session_id(headers) -> str | None:
    value = headers.get(NEW_SESSION_HEADER)
    if value is None:
        return None
    if not _SESSION_ID.fullmatch(value):
        raise bad_request(f"{NEW_SESSION_HEADER}: expected 8 to 64 of A-Z a-z 0-9 _ -", NEW_SESSION_HEADER,
                          code="invalid_field")
    return value


async def create(edge: Edge, snapshot_b64: str | None, new_session: str | None = None):
    snapshot = decode_b64(snapshot_b64, "snapshot") if snapshot_b64 is not None else None
    return await session_call(edge, "create", snapshot=snapshot, new_session=new_session)


async def start_append(edge: Edge, sid: str, inputs: np.ndarray, kinds: tuple[str, ...], wait_if_busy: bool = False,
                       seq: int | None = None):
    """Submit an append now; returns a coroutine that waits for its answer. Appends started in order are applied
    in that order. With `seq`, the answer says whether it was applied now or before (`replayed`: a retry, answered
    from the session's record with the steps after it and no outputs)."""
    numbered = {} if seq is None else {"seq": seq}
    if inputs.shape[0] == 0:
        info = session_call(edge, "info", sid)

        async def empty():
            return {"results": {k: [] for k in kinds}, "steps": (await info).steps,
                    **({**numbered, "replayed": False} if numbered else {})}
        return empty()
    edge.validator.output_budget(inputs.shape[0], kinds)
    stream = await submit(edge, inputs, outputs=list(kinds), session=sid, wait_if_busy=wait_if_busy, seq=seq)

    async def answer():
        got = await collect(stream)
        return {"results": got.joined(kinds, edge.model.head == "classify"), "steps": got.final.steps,
                **({**numbered, "replayed": got.final.replayed} if numbered else {})}
    return answer()


async def append(edge: Edge, sid: str, inputs: np.ndarray, kinds: tuple[str, ...], seq: int | None = None) -> dict:
    return await (await start_append(edge, sid, inputs, kinds, seq=seq))


@dataclass
class GenerateRun:
    stream: RequestStream
    sampling: Sampling
    num_prompt: int


async def open_generate(edge: Edge, sid: str, req, wait_if_busy: bool = False) -> GenerateRun:
    if req.prompt is not None and req.input_ids is not None:
        raise bad_request("give prompt or input_ids, not both", "prompt")
    if req.prompt is not None or req.input_ids is not None:
        inputs = edge.validator.inputs(req.input_ids, None, req.prompt)
    else:
        inputs = np.zeros(0, dtype=np.int64)
    sampling = edge.validator.sampling(req, inputs.shape[0])
    stream = await submit(edge, inputs, sampling=sampling, session=sid, wait_if_busy=wait_if_busy)
    return GenerateRun(stream, sampling, inputs.shape[0])


async def generate_events(edge: Edge, run: GenerateRun):
    """("token", {"token", "text"}) for each token, then ("done", the result)."""
    async for event in generate(edge, run.stream, run.sampling, engine_checks_stop=True):
        if isinstance(event, Token):
            yield "token", {"token": event.id, "text": event.text}
        elif isinstance(event, Finish):
            yield "done", result_of(run, event)


async def generate_result(edge: Edge, run: GenerateRun) -> dict:
    async for kind, body in generate_events(edge, run):
        if kind == "done":
            return body
    raise RuntimeError("a generate ended without finishing")


def result_of(run: GenerateRun, finish: Finish) -> dict:
    n = len(finish.ids)
    return {"ids": finish.ids, "text": finish.text, "finish_reason": finish.reason, "steps": finish.output.steps,
            "usage": {"prompt_tokens": run.num_prompt, "completion_tokens": n, "total_tokens": run.num_prompt + n}}
