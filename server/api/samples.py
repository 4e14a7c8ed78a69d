"""The choices of an OpenAI answer, shared by completions and chat: every prompt's n samples submitted (the prompt
runs once and its state is copied for the others), then collected whole, or merged into one stream of events."""
from __future__ import annotations

import asyncio

import numpy as np

from server.api.errors import APIError
from server.api.requests import (Finish, finish_plain, generate, started, submit, submit_samples,
                                 unless_disconnected)
from server.api.responses import sse
from server.engine.client import RequestStream
from server.engine.protocol import Sampling


async def start(edge, prompts: list[np.ndarray], samplings: list[Sampling | None], n: int,
                prompt_logprobs: int | None = None, is_streamed: bool = False, final_only: bool = False) -> list:
    """The runs (generate()) of every choice, prompt-major: choice k is sample k % n of prompt k // n. A sampling
    of None feeds the prompt only (for its logprobs). final_only: the answer follows no token (finish_all without
    per_token), so single samples ask the engine for their tokens with the finish only (protocol.Add.final_only)."""
    streams = await submit_choices(edge, prompts, samplings, n, prompt_logprobs, is_streamed, final_only)
    runs = [generate(edge, s, samplings[k // n], engine_checks_stop=False,
                     join_ready=is_streamed and prompt_logprobs is None and samplings[k // n] is not None
                     and samplings[k // n].logprobs is None)
            for k, s in enumerate(streams)]
    return list(zip(streams, runs))


async def submit_choices(edge, prompts: list[np.ndarray], samplings: list[Sampling | None], n: int,
                         prompt_logprobs: int | None = None, is_streamed: bool = False,
                         final_only: bool = False) -> list[RequestStream]:
    """start()'s streams, before any run follows them. Streamed, an error the engine answers at once (a full
    queue) becomes the answer's status."""
    streams = []
    try:
        for ids, sampling in zip(prompts, samplings):
            if sampling is None:
                for _ in range(n):
                    streams.append(await submit(edge, ids, prompt_logprobs=prompt_logprobs))
            else:
                streams += await submit_samples(edge, ids, sampling=sampling, n=n, prompt_logprobs=prompt_logprobs,
                                                final_only=final_only and n == 1)
        if is_streamed:
            for s in streams:
                await started(s)
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


async def finish_all(edge, request, started_runs: list, per_token: bool) -> list[Finish]:
    """Every choice run to its end. per_token: follow each token (stop strings, logprobs); else collect ids and
    decode once."""
    if per_token:
        works = [_last(run) for _, run in started_runs]
    else:
        for _, run in started_runs:
            await run.aclose()
        works = [finish_plain(edge, stream) for stream, _ in started_runs]
    if len(works) == 1:  # (the work itself: a wrapper would be one more frame to resume per engine output)
        return [await unless_disconnected(request, works[0])]
    return await unless_disconnected(request, asyncio.gather(*works))


async def _last(run) -> Finish:
    async for event in run:
        if isinstance(event, Finish):
            return event
    raise APIError(500, "internal_error", "the request ended without finishing")


async def merged(started_runs: list):
    """(choice index, event) as each choice produces them; an error is an APIError event; None ends a choice."""
    if len(started_runs) == 1:  # the common case: the one choice's events as they come, with no task or queue
        run = started_runs[0][1]
        try:
            try:
                async for event in run:
                    yield 0, event
            except APIError as exc:
                yield 0, exc
            yield 0, None
        finally:
            await run.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, run):
        try:
            async for event in run:
                await queue.put((index, event))
        except APIError as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, run)) for i, (_, run) in enumerate(started_runs)]
    open_count = len(tasks)
    try:
        while open_count:
            index, event = await queue.get()
            open_count -= event is None
            yield index, event
    finally:
        for t in tasks:
            t.cancel()
        for _, run in started_runs:
            await run.aclose()


def usage(num_prompt: int, num_generated: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated}


def closing(base: dict, include_usage: bool, num_prompt: int, num_generated: int) -> bytes:
    """What ends a streamed answer: the usage chunk when asked, then [DONE]."""
    if not include_usage:
        return sse("[DONE]")
    return sse({**base, "choices": [], "usage": usage(num_prompt, num_generated)}) + sse("[DONE]")
