"""Running requests from a frontend: submit to the engine, then turn its step outputs into what routes answer
with: per-step output arrays, or generated tokens with their text (detokenizing and stop strings happen here)."""
from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from server.api.edge import Edge
from server.api.errors import APIError
from server.detokenizer import Detokenizer
from server.engine.client import EngineDead, RequestStream
from server.engine.protocol import Array, Logprobs, RequestOutput, Sampling


async def submit(edge: Edge, inputs: np.ndarray, **fields) -> RequestStream:
    return (await submit_samples(edge, inputs, **fields))[0]


async def submit_samples(edge: Edge, inputs: np.ndarray, **fields) -> list[RequestStream]:
    """One request; with n > 1 in fields, its n samples' streams (the prompt runs once)."""
    try:
        return await edge.engine.add_samples(edge.engine.new_add(inputs=Array.of(inputs), **fields))
    except EngineDead:
        raise edge.not_ready() from None


async def started(stream: RequestStream) -> RequestStream:
    """Wait for a request's first output: an error the engine answers at once (unknown session, full queue)
    becomes the HTTP status of a streamed answer instead of a broken stream."""
    first = await stream.peek()
    if first.error is not None:
        stream.cancel()
        raise APIError.from_engine(first.error)
    return stream


async def session_call(edge: Edge, op: str, session: str | None = None, snapshot: bytes | None = None,
                       wait_if_busy: bool = False, new_session: str | None = None):
    try:
        reply = await edge.engine.session_op(op, session, snapshot, wait_if_busy, new_session)
    except EngineDead:
        raise edge.not_ready() from None
    if not reply.ok:
        raise APIError.from_engine(reply.error)
    return reply


@dataclass
class Collected:
    outputs: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    final: RequestOutput | None = None

    def joined(self, kinds: tuple[str, ...], is_classify: bool) -> dict:
        """kind -> (steps, width) array, or [] when nothing was produced; a classify head keeps its last row."""
        result = {}
        for kind in kinds:
            parts = self.outputs.get(kind)
            if not parts:
                result[kind] = []
            elif kind == "head" and is_classify:
                result[kind] = parts[-1][-1]
            else:
                result[kind] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return result


async def collect(stream: RequestStream) -> Collected:
    """A request without generation, run to its end; raises APIError on an engine error."""
    got = Collected()
    try:
        async for out in stream:
            for kind, array in out.outputs.items():
                got.outputs[kind].append(array.numpy())
            if out.error is not None:
                raise APIError.from_engine(out.error)
            if out.finish_reason is not None:
                got.final = out
    finally:
        stream.cancel()
    return got


TokenLogprob = tuple[float, list[int], list[float]]  # the token's logprob, the top alternatives' ids and logprobs


@dataclass
class Token:
    id: int | None  # None: a last piece of text held back until the end
    text: str
    logprob: TokenLogprob | None = None  # when the request asked for logprobs
    offset: int = 0  # where the token's text starts in the generated text (when logprobs were asked)
    prompt_logprobs: Logprobs | None = None  # on a request's first event, when it asked for them


@dataclass
class Tokens:
    """Several plain tokens in one event: those a frontend found already waiting when it fell behind its engine
    (generate's join_ready), answered as one chunk."""

    ids: list[int]
    text: str


@dataclass
class Finish:
    reason: str
    output: RequestOutput
    text: str | None  # the whole generated text (None without a tokenizer)
    ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    prompt_logprobs: Logprobs | None = None


async def finish_plain(edge: Edge, stream: RequestStream) -> Finish:
    """A generation without stop strings, run to its end: ids as they come, the text decoded once."""
    ids: list[int] = []
    try:
        while outs := await stream.ready():
            for out in outs:
                if out.error is not None:
                    raise APIError.from_engine(out.error)
                ids += out.token_ids
                if out.finish_reason is not None:
                    text = _whole_text(edge.tokenizer, ids)
                    return Finish(out.finish_reason, out, text, ids)
    finally:
        stream.cancel()
    raise APIError(500, "internal_error", "the request ended without finishing")


def _whole_text(tokenizer, ids: list[int]) -> str | None:
    if tokenizer is None:
        return None
    detok = Detokenizer(tokenizer, ())
    detok.add_many(ids)
    return detok.flush()


async def generate(edge: Edge, stream: RequestStream, sampling: Sampling | None, engine_checks_stop: bool,
                   join_ready: bool = False):
    """Tokens with their text as they come, then one Finish. Stop strings cut the text here; for stateless
    requests a stop string also ends the request (the engine is told to stop), while a session's engine checks
    them itself so its state ends exactly at the stop. sampling None: a request that only feeds its prompt (for
    the prompt's logprobs).

    join_ready (no logprobs of any kind): the tokens of outputs that were already waiting when the last one was
    read come as one Tokens event. A frontend that falls behind its engine (many streams on one CPU) so answers a
    backlog with one chunk, where a chunk a token would keep it behind; one that keeps up answers each token as it
    comes. Nothing is held while the stream waits for the engine."""
    stop = tuple(sampling.stop) if sampling is not None else ()
    detok = Detokenizer(edge.tokenizer, stop) if edge.tokenizer is not None else None
    done = Finish("", None, None, [])  # filled as tokens come
    prompt_logprobs: Logprobs | None = None
    stopped = sent_any = False
    held: list[int] = []  # join_ready: tokens whose text goes out with a later one's
    try:
        async for out in stream:
            if out.error is not None:
                raise APIError.from_engine(out.error)
            if out.prompt_logprobs is not None:
                prompt_logprobs = _joined(prompt_logprobs, out.prompt_logprobs)
            for j, token in enumerate(out.token_ids):
                if stopped:
                    break
                done.ids.append(token)
                offset = len(detok.text) if detok is not None else 0
                logprob = None
                if out.logprobs is not None:
                    logprob = (out.logprobs.chosen[j], out.logprobs.top_ids[j], out.logprobs.top_logprobs[j])
                    done.logprobs.append(logprob)
                    done.offsets.append(offset)
                stopped = detok.add(token) if detok is not None else False
                is_last = stopped or (out.finish_reason is not None and j == len(out.token_ids) - 1)
                if join_ready and not is_last:
                    held.append(token)
                    continue
                text = detok.delta(is_final=is_last) if detok is not None else ""
                if held:
                    held.append(token)
                    yield Tokens(held, text)
                    held = []
                else:
                    yield Token(token, text, logprob, offset, None if sent_any else prompt_logprobs)
                sent_any = True
            if held and not stream.has_ready():  # nothing more at hand: what is held goes out now
                text = detok.delta(is_final=False) if detok is not None else ""
                yield Tokens(held, text) if len(held) > 1 else Token(held[0], text)
                held, sent_any = [], True
            if (stopped and not engine_checks_stop) or out.finish_reason is not None:
                if stopped and not engine_checks_stop:
                    stream.cancel()
                elif detok is not None and (tail := detok.delta(is_final=True)):
                    yield Token(None, tail)
                done.reason = "stop" if stopped else out.finish_reason
                done.output, done.prompt_logprobs = out, prompt_logprobs
                done.text = detok.text if detok is not None else None
                yield done
                return
    finally:
        stream.cancel()


def _joined(current: Logprobs | None, more: Logprobs) -> Logprobs:
    if current is None:
        return more
    current.extend(more)
    return current


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def unless_disconnected(request, work):
    """Await `work`, cancelling it (and so its engine requests) if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(lambda _: task.cancel())  # a no-op once the work is done
    try:
        return await task
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watch.cancel()


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
