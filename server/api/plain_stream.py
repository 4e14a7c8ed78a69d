"""The common streamed answer, one choice without logprobs (completions and chat): the engine's outputs straight to
SSE bytes in one generator. The general path (requests.generate, samples.merged, the route's events) takes three
generators, an event object and a dict per token, and at 256 streams a frontend's CPU is what limits SSE. The bytes
are the general path's with join_ready: the tokens of outputs already waiting go out as one chunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import orjson

from server.api.errors import APIError
from server.api.responses import sse
from server.detokenizer import Detokenizer
from server.engine.client import RequestStream


@dataclass(slots=True)
class PlainChunks:
    """What one streamed answer's chunks are made of."""

    token_parts: list[bytes]  # a token chunk cut at its text and (completions) ids holes: Chunks.template's parts
    finish: Callable[[str], bytes]  # the finish chunk, from the engine's finish reason
    end: Callable[[int], bytes]  # what closes the answer (the usage chunk when asked, [DONE]), from the tokens sent
    opening: bytes = b""  # chunks before the first token's (chat's role)
    first_text: str = ""  # text before the first token's (completions' echo)

    def __post_init__(self):
        if len(self.token_parts) not in (2, 3):
            raise ValueError("token_parts: a chunk cut at its text hole, and maybe its ids hole after it")

    def token(self, text: str, ids: list[int]) -> bytes:
        parts = self.token_parts
        if len(parts) == 2:
            return parts[0] + orjson.dumps(text) + parts[1]
        return parts[0] + orjson.dumps(text) + parts[1] + orjson.dumps(ids) + parts[2]


def is_plain(n: int, num_prompts: int, wants_logprobs: bool) -> bool:
    """Whether a streamed request takes events() rather than the general path."""
    return n == 1 and num_prompts == 1 and not wants_logprobs


async def events(edge, stream: RequestStream, stop: tuple[str, ...], chunks: PlainChunks):
    """SSE bytes of one stateless generation (a stop string ends the request here). Chunks made without waiting
    (the opening with the first token's, the last token's with the finish, usage and [DONE]) go out as one."""
    detok = Detokenizer(edge.tokenizer, stop) if edge.tokenizer is not None else None
    pending = chunks.opening  # made, not yet sent: sent when the stream would wait, or at the end
    first_text = chunks.first_text
    num_sent = 0  # tokens in chunks
    held: list[int] = []  # tokens whose text goes out with a later one's
    try:
        while True:
            if pending and not stream.has_ready():
                yield pending
                pending = b""
            outs = await stream.ready()
            if not outs:
                yield pending + chunks.end(num_sent)
                return
            last = len(outs) - 1
            for k, out in enumerate(outs):
                if out.error is not None:  # what was held is dropped, as generate's APIError drops it
                    yield pending + sse(APIError.from_engine(out.error).body()) + chunks.end(num_sent)
                    return
                stopped = False
                for token in out.token_ids:
                    held.append(token)
                    if detok is not None and detok.add(token):
                        stopped = True
                        break
                is_final = stopped or (out.finish_reason is not None and bool(out.token_ids))
                if held and (is_final or k == last):  # k == last: nothing more at hand, what is held goes out
                    text = detok.delta(is_final) if detok is not None else ""
                    if first_text:
                        text, first_text = first_text + text, ""
                    pending += chunks.token(text, held)
                    num_sent += len(held)
                    held = []
                if stopped:
                    stream.cancel()
                    yield pending + _closing(chunks, "stop", first_text, num_sent)
                    return
                if out.finish_reason is not None:
                    if detok is not None and (tail := detok.delta(is_final=True)):
                        pending += chunks.token(first_text + tail, [])
                        first_text = ""
                    yield pending + _closing(chunks, out.finish_reason, first_text, num_sent)
                    return
    finally:
        stream.cancel()


def _closing(chunks: PlainChunks, reason: str, first_text: str, num_sent: int) -> bytes:
    """The finish chunk, after a chunk of the first text when no token carried it, then the end."""
    opened = chunks.token(first_text, []) if first_text else b""
    return opened + chunks.finish(reason) + chunks.end(num_sent)
