"""OpenAI chat completions: the messages rendered with the model's chat template, then generated like a
completion (plain or streamed as chat.completion.chunk events)."""
from __future__ import annotations

import secrets
import time

import numpy as np
from fastapi import APIRouter, Request

from server.api import plain_stream, samples, schemas
from server.api.errors import APIError, bad_request
from server.api.logprobs import chat_logprobs
from server.api.openapi import body, errors
from server.api.requests import Finish, Token, Tokens
from server.api.responses import JSON, Chunks, EventStream, hole, sse, sse_response
from server.api.routes.openai import check_model, check_num_choices
from server.api.validation import loads, parse

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=body(schemas.ChatCompletionRequest),
             responses=errors(404, 413, 422, 429))
async def chat_completions(request: Request):
    edge = request.app.state.edge
    req = parse(schemas.ChatCompletionRequest, loads(await request.body()))
    check_model(edge, req.model)
    if edge.chat_template is None:
        why = edge.chat_template_error or ("its directory has no chat template (tokenizer_config.json's "
                                           "chat_template or chat_template.jinja)")
        raise APIError(400, "no_chat_template", f"model {edge.model_name!r} cannot chat: {why}; use "
                       "/v1/completions with a prompt instead", "messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    ids = prompt_ids(edge, req)
    check_num_choices(edge, 1, req.n)
    # without a limit a recurrent model could generate forever: the request's step limit shares it out
    max_tokens = req.max_completion_tokens or req.max_tokens or max(
        1, (edge.config.max_request_steps - len(ids)) // req.n)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling = edge.validator.sampling(req, len(ids), max_tokens=max_tokens, logprobs=logprobs, num_samples=req.n)
    per_token = bool(sampling.stop) or bool(req.logprobs)
    if req.stream and plain_stream.is_plain(req.n, 1, bool(req.logprobs)):
        return await plain_chat(edge, req, ids, sampling)
    runs = await samples.start(edge, [ids], [sampling], req.n, is_streamed=req.stream,
                               final_only=not req.stream and not per_token)
    base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": edge.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(chat_events(edge, runs, base, len(ids), include_usage, req.logprobs))
    finishes = await samples.finish_all(edge, request, runs, per_token)
    choices = [{"index": k, "message": {"role": "assistant", "content": f.text if f.text is not None else ""},
                "logprobs": chat_logprobs(edge.tokenizer, f.ids, f.logprobs) if req.logprobs else None,
                "finish_reason": f.reason} for k, f in enumerate(finishes)]
    generated = sum(len(f.ids) for f in finishes)
    return JSON({**base, "object": "chat.completion", "choices": choices,
                 "usage": samples.usage(len(ids), generated)})


def prompt_ids(edge, req: schemas.ChatCompletionRequest) -> np.ndarray:
    messages = []
    for message in req.messages:
        fields = message.model_dump(exclude_none=False)
        if isinstance(message.content, list):  # text parts (the only kind of part a text model takes): joined
            fields["content"] = "".join(part.text for part in message.content)
        messages.append(fields)
    text = edge.chat_template.render(messages, req.add_generation_prompt)
    ids = edge.validator.token_ids(edge.validator.encode(text, "messages"), "messages")
    if ids.shape[0] == 0:
        raise bad_request("the chat template rendered these messages as empty text", "messages")
    return ids


async def plain_chat(edge, req: schemas.ChatCompletionRequest, ids: np.ndarray, sampling) -> EventStream:
    """A streamed chat of one choice without logprobs, through plain_stream."""
    stream, = await samples.submit_choices(edge, [ids], [sampling], 1, is_streamed=True)
    base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": edge.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = plain_chat_chunks(base, include_usage, len(ids))
    return sse_response(plain_stream.events(edge, stream, tuple(sampling.stop), chunks))


def plain_chat_chunks(base: dict, include_usage: bool, num_prompt: int) -> plain_stream.PlainChunks:
    """The chunks chat_events writes for one choice without logprobs."""
    base = {**base, "object": "chat.completion.chunk"}
    encode = Chunks(base)
    return plain_stream.PlainChunks(
        token_parts=encode.template({"index": 0, "delta": {"content": hole("text")}, "logprobs": None,
                                     "finish_reason": None}, "text"),
        finish=lambda reason: encode({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}),
        end=lambda num_sent: samples.closing(base, include_usage, num_prompt, num_sent),
        opening=_role_chunk(encode, 0))


def _role_chunk(encode: Chunks, index: int) -> bytes:
    """Each choice opens with the assistant's role, as OpenAI's streams do."""
    return encode({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None})


async def chat_events(edge, runs, base: dict, num_prompt: int, include_usage: bool, wants_logprobs: bool):
    base = {**base, "object": "chat.completion.chunk"}
    encode = Chunks(base)
    generated = 0
    for k in range(len(runs)):
        yield _role_chunk(encode, k)
    async for index, event in samples.merged(runs):
        if isinstance(event, Tokens):
            generated += len(event.ids)
            yield encode({"index": index, "delta": {"content": event.text}, "logprobs": None, "finish_reason": None})
        elif isinstance(event, Token):
            generated += event.id is not None
            logprobs = None
            if wants_logprobs:
                found = [event.logprob] if event.id is not None else []
                logprobs = chat_logprobs(edge.tokenizer, [event.id] if event.id is not None else [], found)
            yield encode({"index": index, "delta": {"content": event.text}, "logprobs": logprobs,
                          "finish_reason": None})
        elif isinstance(event, Finish):
            yield encode({"index": index, "delta": {}, "logprobs": None, "finish_reason": event.reason})
        elif isinstance(event, APIError):
            yield sse(event.body())
    yield samples.closing(base, include_usage, num_prompt, generated)
