"""requests.generate with join_ready: the tokens of outputs already waiting come as one Tokens event, nothing is
held while the stream waits, and the text and ids are exactly those of the token-by-token answer (multi-byte
characters split across tokens and stop strings included)."""
import asyncio
from types import SimpleNamespace

from model.tokenizer import ByteTokenizer
from server.api.requests import Finish, Token, Tokens, generate
from server.engine.client import RequestStream
from server.engine.protocol import RequestOutput, Sampling
from tests.server.conftest import feed_in_batches

EDGE = SimpleNamespace(tokenizer=ByteTokenizer())


class FakeClient:
    def __init__(self):
        self.streams = {}
        self.id = "c"

    def send_nowait(self, message):
        pass


def events_of(batches, join_ready, stop=()):
    """generate's events when the engine's outputs arrive in `batches`: each batch's outputs are waiting together
    (the frontend fell behind), and the next batch comes only once the stream is drained."""
    async def main():
        stream = RequestStream(FakeClient(), "r")
        got = []
        run = generate(EDGE, stream, Sampling(max_tokens=100, stop=list(stop)), engine_checks_stop=False,
                       join_ready=join_ready)
        feeder = asyncio.ensure_future(feed_in_batches(stream, batches))
        async for event in run:
            got.append(event)
        await feeder
        return got

    return asyncio.run(main())


def outputs(text: bytes, finish_at_end=True):
    ids = list(text)
    outs = [RequestOutput("r", token_ids=[t]) for t in ids]
    if finish_at_end:
        outs[-1].finish_reason = "length"
    return outs


def text_and_ids(events):
    text, ids = "", []
    for e in events:
        if isinstance(e, Tokens):
            text, ids = text + e.text, ids + e.ids
        elif isinstance(e, Token):
            text, ids = text + e.text, ids + ([e.id] if e.id is not None else [])
    return text, ids


def test_waiting_outputs_are_joined_and_the_answer_is_unchanged():
    outs = outputs("héllo wörld".encode())  # 2-byte characters: a token alone may carry no text
    batches = [outs[:1], outs[1:6], outs[6:7], outs[7:]]
    one_by_one = events_of([[o] for o in outs], join_ready=False)
    joined = events_of(batches, join_ready=True)
    assert text_and_ids(joined) == text_and_ids(one_by_one) == ("héllo wörld", list("héllo wörld".encode()))
    kinds = [type(e).__name__ for e in joined]
    assert kinds == ["Token", "Tokens", "Token", "Tokens", "Finish"], kinds
    assert [len(e.ids) for e in joined if isinstance(e, Tokens)] == [5, len(outs) - 7]
    assert isinstance(joined[-1], Finish) and joined[-1].ids == list("héllo wörld".encode())


def test_a_frontend_that_keeps_up_gets_each_token_on_its_own():
    outs = outputs(b"abcd")
    assert [type(e) for e in events_of([[o] for o in outs], join_ready=True)] == [Token] * 4 + [Finish]


def test_a_stop_string_inside_a_joined_run_cuts_the_text_there():
    outs = outputs(b"one two STOP three", finish_at_end=False)
    events = events_of([outs], join_ready=True, stop=("STOP",))
    assert text_and_ids(events)[0] == "one two "
    assert events[-1].reason == "stop" and events[-1].text == "one two "
