"""POST /v1/forward: per-step outputs of whole sequences, in one batch."""
from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request

from server.api import schemas
from server.api.errors import APIError, bad_request
from server.api.openapi import body, errors
from server.api.requests import collect, submit, unless_disconnected
from server.api.responses import json_response
from server.api.validation import loads, parse

router = APIRouter()


@router.post("/v1/forward", openapi_extra=body(schemas.ForwardRequest), responses=errors(413, 422))
async def forward(request: Request):
    edge = request.app.state.edge
    check = edge.validator
    req = parse(schemas.ForwardRequest, loads(await request.body()))
    given = [name for name in ("input_ids", "inputs", "text") if getattr(req, name) is not None]
    if len(given) != 1:
        raise bad_request("give exactly one of input_ids, inputs or text", given[1] if given else "input_ids")
    field = given[0]
    texts = [req.text] if isinstance(req.text, str) else req.text
    sequences = req.input_ids if req.input_ids is not None else req.inputs if req.inputs is not None else texts
    if not sequences:
        raise bad_request("give at least one sequence", field)
    if len(sequences) > edge.config.max_batch_sequences:
        raise APIError(413, "too_many_sequences", f"{len(sequences)} sequences exceed max_batch_sequences "
                       f"({edge.config.max_batch_sequences})", field)
    kinds = check.output_kinds(req.outputs)
    arrays = []
    for i, seq in enumerate(sequences):
        array = check.inputs(**{field: seq}, index=i)
        if array.shape[0] == 0:
            raise bad_request("a sequence needs at least one step", f"{field}[{i}]")
        arrays.append(array)
    total = sum(a.shape[0] for a in arrays)
    check.output_budget(total, kinds)
    streams = [await submit(edge, a, outputs=list(kinds), want_state=req.return_state) for a in arrays]
    try:
        done = await unless_disconnected(request, asyncio.gather(*(collect(s) for s in streams)))
    finally:
        for s in streams:
            s.cancel()
    is_classify = edge.model.head == "classify"
    results = []
    for got in done:
        result = got.joined(kinds, is_classify)
        result["steps"] = got.final.steps
        if req.return_state:
            result["state"] = base64.b64encode(got.final.state).decode()
        results.append(result)
    body = {"results": results, "usage": {"prompt_tokens": total, "total_tokens": total}}
    width = sum(edge.model.d_model if k == "hidden" else edge.model.d_head_output for k in kinds)
    return await json_response(body, num_values=total * width)
