"""OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/completions (plain and streamed)."""
from __future__ import annotations

import asyncio
import secrets
import time

import numpy as np
from fastapi import APIRouter, Request

from server.api import schemas
from server.api.errors import APIError, bad_request
from server.api.openapi import body, errors
from server.api.requests import Finish, Token, finish_plain, generate, started, submit, unless_disconnected
from server.api.responses import JSON, sse, sse_response
from server.api.validation import loads, parse

router = APIRouter()


def model_card(edge) -> dict:
    info = edge.engine.info
    return {"id": edge.model_name, "object": "model", "created": 0, "owned_by": "infomamba",
            "config": info.config, "fingerprint": info.fingerprint,
            "state_bytes_per_stream": info.state_bytes_per_stream}


@router.get("/v1/models")
async def models(request: Request):
    return JSON({"object": "list", "data": [model_card(request.app.state.edge)]})


@router.get("/v1/models/{model_id:path}", responses=errors(404))
async def model(model_id: str, request: Request):
    edge = request.app.state.edge
    if model_id != edge.model_name:
        raise APIError(404, "model_not_found", f"model {model_id!r} is not served here (try {edge.model_name!r})",
                       "model")
    return JSON(model_card(edge))


@router.post("/v1/completions", openapi_extra=body(schemas.CompletionRequest), responses=errors(404, 413, 422, 429))
async def completions(request: Request):
    edge = request.app.state.edge
    req = parse(schemas.CompletionRequest, loads(await request.body()))
    if req.model is not None and req.model != edge.model_name:
        raise APIError(404, "model_not_found", f"model {req.model!r} is not served here (try {edge.model_name!r})",
                       "model")
    prompts = completion_prompts(edge, req.prompt)
    if len(prompts) > edge.config.max_batch_sequences:
        raise APIError(413, "too_many_sequences", f"{len(prompts)} prompts exceed max_batch_sequences", "prompt")
    samplings = [edge.validator.sampling(req, ids.shape[0]) for ids in prompts]
    streams = []
    try:
        for ids, sampling in zip(prompts, samplings):
            streams.append(await submit(edge, ids, sampling=sampling))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    runs = [generate(edge, s, sampling, engine_checks_stop=False) for s, sampling in zip(streams, samplings)]
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    num_prompt = sum(ids.shape[0] for ids in prompts)
    base = {"id": rid, "object": "text_completion", "created": created, "model": edge.model_name}
    if req.stream:
        try:
            for s in streams:
                await started(s)
        except APIError:
            for s in streams:
                s.cancel()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(completion_events(runs, base, num_prompt, include_usage))
    if not any(s.stop for s in samplings):  # nothing to watch token by token: collect ids, decode once
        for run in runs:
            await run.aclose()
        finishes = await unless_disconnected(request, asyncio.gather(*(finish_plain(edge, s) for s in streams)))
    else:
        finishes = await unless_disconnected(request, asyncio.gather(*(_last(run) for run in runs)))
    choices = [{"index": i, "text": f.text if f.text is not None else "", "logprobs": None,
                "finish_reason": f.reason, "token_ids": f.ids} for i, f in enumerate(finishes)]
    generated = sum(len(f.ids) for f in finishes)
    return JSON({**base, "choices": choices, "usage": {"prompt_tokens": num_prompt, "completion_tokens": generated,
                                                       "total_tokens": num_prompt + generated}})


async def _last(run) -> Finish:
    async for event in run:
        if isinstance(event, Finish):
            return event
    raise APIError(500, "internal_error", "the request ended without finishing")


def completion_prompts(edge, prompt) -> list[np.ndarray]:
    check = edge.validator
    if edge.model.vocab_size is None:
        raise bad_request("completions need a token model", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        lists = [check.encode(t, "prompt" if len(texts) == 1 else f"prompt[{i}]") for i, t in enumerate(texts)]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        lists = prompt
    else:
        lists = [prompt]
    arrays = []
    for i, ids in enumerate(lists):
        field = "prompt" if len(lists) == 1 else f"prompt[{i}]"
        array = check.token_ids(ids, field)
        if array.shape[0] == 0:
            raise bad_request("the prompt is empty", field)
        arrays.append(array)
    return arrays


async def completion_events(runs, base: dict, num_prompt: int, include_usage: bool):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, run):
        try:
            async for event in run:
                await queue.put((index, event))
        except APIError as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    generated, open_count = 0, len(runs)
    try:
        while open_count:
            index, event = await queue.get()
            if event is None:
                open_count -= 1
            elif isinstance(event, Token):
                generated += event.id is not None
                yield sse({**base, "choices": [{"index": index, "text": event.text, "logprobs": None,
                                                "finish_reason": None,
                                                "token_ids": [event.id] if event.id is not None else []}]})
            elif isinstance(event, Finish):
                yield sse({**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": event.reason}]})
            elif isinstance(event, APIError):
                yield sse(event.body())
        if include_usage:
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": num_prompt, "completion_tokens": generated,
                                                        "total_tokens": num_prompt + generated}})
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        for run in runs:
            await run.aclose()
