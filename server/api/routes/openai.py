"""OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/completions (plain and streamed)."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request

from server.api import plain_stream, samples, schemas
from server.api.errors import APIError, bad_request
from server.api.logprobs import completion_logprobs, prompt_entries, text_offsets
from server.api.openapi import body, errors
from server.api.requests import Finish, Token, Tokens
from server.api.responses import JSON, Chunks, EventStream, hole, sse, sse_response
from server.api.validation import parse_body

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
    check_model(edge, model_id)
    return JSON(model_card(edge))


@router.post("/v1/completions", openapi_extra=body(schemas.CompletionRequest), responses=errors(404, 413, 422, 429))
async def completions(request: Request):
    edge = request.app.state.edge
    req = parse_body(schemas.CompletionRequest, await request.body())
    check_model(edge, req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of equal to n, which returns every sample)",
                          "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(422, "invalid_field", "max_tokens 0 generates nothing: it is for echo (the prompt, with its "
                       "logprobs when asked)", "max_tokens")
    prompts = completion_prompts(edge, req.prompt)
    check_num_choices(edge, len(prompts), req.n)
    samplings = [_sampling(edge, req, ids.shape[0]) for ids in prompts]
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    per_token = any(s is None or s.stop for s in samplings) or req.logprobs is not None
    is_plain = plain_stream.is_plain(req.n, len(prompts), req.logprobs is not None) and samplings[0] is not None
    if req.stream and is_plain:
        return await plain_completion(edge, req, prompts[0], samplings[0])
    runs = await samples.start(edge, prompts, samplings, req.n, echo_logprobs, is_streamed=req.stream,
                               final_only=not req.stream and not per_token)
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    num_prompt = sum(ids.shape[0] for ids in prompts)
    base = {"id": rid, "object": "text_completion", "created": created, "model": edge.model_name}
    echoes = [Echo.of(edge.tokenizer, ids, req.echo, req.logprobs is not None) for ids in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(completion_events(edge, runs, req.n, echoes, base, num_prompt, include_usage,
                                              req.logprobs is not None))
    finishes = await samples.finish_all(edge, request, runs, per_token)
    choices = []
    for k, f in enumerate(finishes):
        echo = echoes[k // req.n]
        text = f.text if f.text is not None else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = echo.logprobs(edge.tokenizer, finishes[k - k % req.n].prompt_logprobs)
            more = completion_logprobs(edge.tokenizer, f.ids, f.logprobs, f.offsets, echo.offset)
            for key, values in more.items():
                logprobs[key] += values
        choices.append({"index": k, "text": echo.text + text, "logprobs": logprobs, "finish_reason": _reason(f.reason),
                        "token_ids": f.ids})
    generated = sum(len(f.ids) for f in finishes)
    return JSON({**base, "choices": choices, "usage": samples.usage(num_prompt, generated)})


def _sampling(edge, req: schemas.CompletionRequest, num_prompt: int):
    """The prompt's sampling, or None for max_tokens 0 (echo: the prompt is fed, nothing generated)."""
    if req.max_tokens:
        return edge.validator.sampling(req, num_prompt, logprobs=req.logprobs, num_samples=req.n)
    edge.validator.lm_head("max_tokens")
    edge.validator.steps(num_prompt, "prompt")
    return None


def check_model(edge, model: str | None) -> None:
    if model is not None and model != edge.model_name:
        raise APIError(404, "model_not_found", f"model {model!r} is not served here (try {edge.model_name!r})",
                       "model")


def check_num_choices(edge, num_prompts: int, n: int) -> None:
    if num_prompts * n > edge.config.max_batch_sequences:
        raise APIError(413, "too_many_sequences", f"{num_prompts} prompts x n = {n} samples exceed "
                       f"max_batch_sequences ({edge.config.max_batch_sequences})", "n" if n > 1 else "prompt")


def _reason(reason: str) -> str:
    return "length" if reason == "done" else reason  # "done": a prompt fed with max_tokens 0


@dataclass
class Echo:
    """What echo puts before a prompt's choices: its text, and (with logprobs) its tokens' logprobs and offsets.
    offset: where the generated text starts in prompt + generated text (logprobs' text_offset counts from the
    prompt's start, echoed or not, as OpenAI's do)."""

    ids: list[int]
    text: str
    offset: int
    offsets: list[int]
    is_echoed: bool

    @classmethod
    def of(cls, tokenizer, ids: np.ndarray, is_echoed: bool, wants_offsets: bool) -> "Echo":
        if not (is_echoed or wants_offsets):
            return cls([], "", 0, [], False)
        text, offsets = text_offsets(tokenizer, ids.tolist())
        return cls(ids.tolist(), text if is_echoed else "", len(text), offsets, is_echoed)

    def logprobs(self, tokenizer, prompt_logprobs) -> dict:
        if not self.is_echoed:
            return completion_logprobs(tokenizer, [], [], [])
        return completion_logprobs(tokenizer, self.ids, prompt_entries(prompt_logprobs, len(self.ids)), self.offsets)


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


async def plain_completion(edge, req: schemas.CompletionRequest, ids: np.ndarray, sampling) -> EventStream:
    """A streamed completion of one choice without logprobs, through plain_stream."""
    stream, = await samples.submit_choices(edge, [ids], [sampling], 1, is_streamed=True)
    base = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": edge.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    echo = Echo.of(edge.tokenizer, ids, req.echo, wants_offsets=False)
    chunks = plain_completion_chunks(base, include_usage, ids.shape[0], echo.text)
    return sse_response(plain_stream.events(edge, stream, tuple(sampling.stop), chunks))


def plain_completion_chunks(base: dict, include_usage: bool, num_prompt: int, echo_text: str
                            ) -> plain_stream.PlainChunks:
    """The chunks completion_events writes for one choice without logprobs."""
    encode = Chunks(base)
    return plain_stream.PlainChunks(
        token_parts=encode.template({"index": 0, "text": hole("text"), "logprobs": None, "finish_reason": None,
                                     "token_ids": hole("ids")}, "text", "ids"),
        finish=lambda reason: encode({"index": 0, "text": "", "logprobs": None,
                                      "finish_reason": _reason(reason)}),
        end=lambda num_sent: samples.closing(base, include_usage, num_prompt, num_sent),
        first_text=echo_text)


async def completion_events(edge, runs, n: int, echoes: list[Echo], base: dict, num_prompt: int,
                            include_usage: bool, wants_logprobs: bool):
    """SSE chunks of every choice as they come. A choice's first chunk carries its echo; with logprobs, a fork's
    events wait until its prompt's first sample has brought the prompt's logprobs."""
    generated = 0
    encode = Chunks(base)
    prompt_logprobs: dict[int, object] = {}  # prompt -> its logprobs, once its first sample has said
    held: dict[int, list] = {}  # prompt -> its forks' events, while they wait for that
    is_opened: set[int] = set()  # choices whose echo went out

    def chunks(index: int, event):
        nonlocal generated
        prompt, echo = index // n, echoes[index // n]
        text, logprobs = "", None
        if index not in is_opened:
            is_opened.add(index)
            text = echo.text
            if wants_logprobs:
                logprobs = echo.logprobs(edge.tokenizer, prompt_logprobs.get(prompt))
        if isinstance(event, Token):
            generated += event.id is not None
            if wants_logprobs:
                ids, found = ([event.id], [event.logprob]) if event.id is not None else ([], [])
                more = completion_logprobs(edge.tokenizer, ids, found, [event.offset] * len(ids), echo.offset)
                logprobs = more if logprobs is None else {k: v + more[k] for k, v in logprobs.items()}
            yield encode({"index": index, "text": text + event.text, "logprobs": logprobs, "finish_reason": None,
                          "token_ids": [event.id] if event.id is not None else []})
        elif isinstance(event, Tokens):
            generated += len(event.ids)
            yield encode({"index": index, "text": text + event.text, "logprobs": None, "finish_reason": None,
                          "token_ids": event.ids})
        elif isinstance(event, Finish):
            if text or logprobs:
                yield encode({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None,
                              "token_ids": []})
            yield encode({"index": index, "text": "", "logprobs": None, "finish_reason": _reason(event.reason)})
        elif isinstance(event, APIError):
            yield sse(event.body())

    async for index, event in samples.merged(runs):
        if event is None:
            continue
        prompt = index // n
        if wants_logprobs and echoes[prompt].is_echoed and prompt not in prompt_logprobs:
            if index % n:
                held.setdefault(prompt, []).append((index, event))
                continue
            prompt_logprobs[prompt] = getattr(event, "prompt_logprobs", None)
            for data in chunks(index, event):
                yield data
            for waiting in held.pop(prompt, []):
                for data in chunks(*waiting):
                    yield data
            continue
        for data in chunks(index, event):
            yield data
    yield samples.closing(base, include_usage, num_prompt, generated)
