"""Sessions over HTTP: create (optionally from a snapshot), append, generate, snapshot, fork, delete. The engine
owns every session; these routes and the websocket are two doors to the same operations (server/api/session_ops)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api import schemas
from server.api.openapi import body, errors
from server.api.errors import APIError
from server.api.requests import started, unless_disconnected
from server.api.responses import JSON, json_response, sse, sse_response
from server.api.session_ops import (append, create, generate_events, generate_result, new_session_id, open_generate,
                                    session_call)
from server.api.validation import loads, parse, parse_body

router = APIRouter()


@router.get("/v1/sessions", responses=errors(503))
async def list_sessions(request: Request):
    """Every session: this replica's, or with a shared store (--state-store) every replica's, each with the replica
    holding it (`owner`)."""
    reply = await session_call(request.app.state.edge, "list")
    return JSON({"object": "list", "data": reply.info["sessions"], "replica": reply.info.get("replica")})


@router.post("/v1/sessions", status_code=201, openapi_extra=body(schemas.SessionCreateRequest, required=False),
             responses=errors(422, 429, 507))
async def create_session(request: Request):
    raw = await request.body()
    req = parse(schemas.SessionCreateRequest, loads(raw) if raw.strip() else {})
    reply = await create(request.app.state.edge, req.snapshot, new_session_id(request.headers))
    return JSON({"id": reply.session, "steps": reply.steps}, status_code=201)


@router.post("/v1/sessions/{sid}/append", openapi_extra=body(schemas.AppendRequest),
             responses=errors(404, 409, 413, 422, 507))
async def append_route(sid: str, request: Request):
    edge = request.app.state.edge
    req = parse_body(schemas.AppendRequest, await request.body())
    kinds = edge.validator.output_kinds(req.outputs)
    inputs = edge.validator.inputs(req.input_ids, req.inputs, req.text)
    result = await unless_disconnected(request, append(edge, sid, inputs, kinds, req.seq))
    width = sum(edge.model.d_model if k == "hidden" else edge.model.d_head_output for k in kinds)
    return await json_response(result, num_values=inputs.shape[0] * width)


@router.post("/v1/sessions/{sid}/generate", openapi_extra=body(schemas.GenerateRequest),
             responses=errors(404, 409, 413, 422, 507))
async def generate_route(sid: str, request: Request):
    edge = request.app.state.edge
    req = parse(schemas.GenerateRequest, loads(await request.body()))
    run = await open_generate(edge, sid, req)
    if req.stream:
        await started(run.stream)

        async def events():
            try:
                async for kind, body in generate_events(edge, run):
                    yield sse(body if kind != "done" else {"done": True, **body})
            except APIError as exc:
                yield sse(exc.body())
            yield sse("[DONE]")
        return sse_response(events())
    return JSON(await unless_disconnected(request, generate_result(edge, run)))


@router.get("/v1/sessions/{sid}/snapshot", responses={200: {"content": {"application/octet-stream": {}}},
                                                       **errors(404, 409)})
async def snapshot(sid: str, request: Request):
    reply = await session_call(request.app.state.edge, "snapshot", sid)
    return Response(reply.data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{sid}.safetensors"',
                             "X-Session-Steps": str(reply.steps)})


@router.post("/v1/sessions/{sid}/fork", status_code=201, responses=errors(404, 409, 429, 507))
async def fork(sid: str, request: Request):
    reply = await session_call(request.app.state.edge, "fork", sid, new_session=new_session_id(request.headers))
    return JSON({"id": reply.session, "steps": reply.steps}, status_code=201)


@router.delete("/v1/sessions/{sid}", status_code=204, responses=errors(404, 409))
async def delete(sid: str, request: Request):
    await session_call(request.app.state.edge, "delete", sid)
    return Response(status_code=204)
