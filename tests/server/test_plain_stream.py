"""plain_stream, the streamed answer of one choice without logprobs: byte for byte what the general path
(requests.generate with join_ready, samples.merged, the route's events) writes, for completions and chat, when the
engine's outputs arrive one by one or several at once, with multi-byte characters, stop strings, echo, usage, an
engine error mid-stream and a finish that brings no token. Through the real server: the same chunks as the general
path, and the fast path is the one taken."""
import asyncio
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from model.tokenizer import ByteTokenizer
from server.api import plain_stream
from server.api.requests import generate
from server.api.routes import chat, openai
from server.engine.client import RequestStream
from server.engine.protocol import Error, RequestOutput, Sampling
from tests.server.test_engine_api import wait_all_slots_free
from tests.server.conftest import feed_in_batches
from tests.server.test_join_ready import FakeClient, outputs

EDGE = SimpleNamespace(tokenizer=ByteTokenizer())
BASE = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "tiny-lm"}
PROMPT = [72, 105, 33]  # "Hi!"


def body_of(batches, events_of) -> bytes:
    """The bytes of events_of(stream) when the engine's outputs arrive in `batches`: each batch's outputs are
    waiting together, and the next batch comes only once the stream is drained."""
    async def main():
        stream = RequestStream(FakeClient(), "r")
        feeder = asyncio.ensure_future(feed_in_batches(stream, batches))
        got = b"".join([chunk async for chunk in events_of(stream)])
        feeder.cancel()
        return got

    return asyncio.run(main())


def completion_both(batches, stop=(), echo=False, include_usage=False):
    """(general path's body, plain_stream's body) of a completion."""
    sampling = Sampling(max_tokens=100, stop=list(stop))
    echo_of = openai.Echo.of(EDGE.tokenizer, np.array(PROMPT), echo, False)

    def general(stream):
        runs = [(stream, generate(EDGE, stream, sampling, engine_checks_stop=False, join_ready=True))]
        return openai.completion_events(EDGE, runs, 1, [echo_of], BASE, len(PROMPT), include_usage, False)

    def plain(stream):
        chunks = openai.plain_completion_chunks(BASE, include_usage, len(PROMPT), echo_of.text)
        return plain_stream.events(EDGE, stream, tuple(stop), chunks)

    return body_of(batches, general), body_of(batches, plain)


def chat_both(batches, stop=(), include_usage=False):
    sampling = Sampling(max_tokens=100, stop=list(stop))
    base = {"id": "chatcmpl-x", "created": 1, "model": "tiny-lm"}

    def general(stream):
        runs = [(stream, generate(EDGE, stream, sampling, engine_checks_stop=False, join_ready=True))]
        return chat.chat_events(EDGE, runs, base, len(PROMPT), include_usage, False)

    def plain(stream):
        return plain_stream.events(EDGE, stream, tuple(stop), chat.plain_chat_chunks(base, include_usage, len(PROMPT)))

    return body_of(batches, general), body_of(batches, plain)


# 2-byte characters (a token alone may carry no text); a stop cutting the text where it ends in another stop's
# start; a text ending in a stop's start (held back until the finish)
TEXTS = ["héllo wörld, a stop here".encode(), b"one stastop more", b"abc st"]


def one_by_one(outs):
    return [[o] for o in outs]


def joined(outs):
    return [outs[:1], outs[1:6], outs[6:7], outs[7:]]


@pytest.mark.parametrize("arrival", [one_by_one, joined, lambda outs: [outs]])
@pytest.mark.parametrize("stop", [(), ("stop",), ("ö",), ("xyz", "a s"), ("stop", "ab")])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_bytes_equal_the_general_path(arrival, stop, text, echo, include_usage):
    general, plain = completion_both(arrival(outputs(text)), stop, echo, include_usage)
    assert plain == general
    assert plain.endswith(b"data: [DONE]\n\n") and plain.count(b"finish_reason\":\"") == 1


@pytest.mark.parametrize("arrival", [one_by_one, joined, lambda outs: [outs]])
@pytest.mark.parametrize("stop", [(), ("stop",), ("ö",), ("stop", "ab")])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_bytes_equal_the_general_path(arrival, stop, text, include_usage):
    general, plain = chat_both(arrival(outputs(text)), stop, include_usage)
    assert plain == general


def test_a_finish_without_tokens_and_a_held_tail():
    # the last output brings only the finish: the held text goes out, then the tail a stop prefix held back
    outs = outputs(b"abc st", finish_at_end=False) + [RequestOutput("r", finish_reason="length")]
    for arrival in (one_by_one(outs), [outs[:3], outs[3:]], [outs]):
        for echo in (False, True):
            general, plain = completion_both(arrival, ("stop",), echo=echo)
            assert plain == general and b'"text":"st"' in plain
        assert chat_both(arrival, ("stop",))[0] == chat_both(arrival, ("stop",))[1]
    only_finish = [[RequestOutput("r", finish_reason="length")]]
    general, plain = completion_both(only_finish, echo=True, include_usage=True)
    assert plain == general and b'"text":"Hi!"' in plain


def test_an_engine_error_mid_stream():
    error = RequestOutput("r", error=Error("engine_unavailable", "gone", None, 5))
    outs = outputs(b"abcdef", finish_at_end=False)
    for arrival in (one_by_one(outs) + [[error]], [outs[:2], outs[2:] + [error]]):
        general, plain = completion_both(arrival, echo=True, include_usage=True)
        assert plain == general and b"engine_unavailable" in plain and plain.endswith(b"data: [DONE]\n\n")
        assert chat_both(arrival)[0] == chat_both(arrival)[1]


def test_template_cuts_where_the_dict_has_its_holes():
    from server.api.responses import Chunks, hole
    encode = Chunks(BASE)
    parts = encode.template({"index": 0, "text": hole("text"), "n": None, "ids": hole("ids")}, "text", "ids")
    filled = parts[0] + json.dumps('a"\u00e9\n').encode() + parts[1] + b"[1,2]" + parts[2]
    assert json.loads(filled[6:]) == {**BASE, "choices": [{"index": 0, "text": 'a"\u00e9\n', "n": None,
                                                           "ids": [1, 2]}]}


# -- through the real server ------------------------------------------------------------------------------------

def sse_chunks(srv, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def runs_merged(chunks: list[dict], text_key) -> list[dict]:
    """Consecutive token chunks as one (how many tokens a chunk carries depends on timing), ids and times out."""
    merged = []
    for c in chunks:
        c = {**c, "id": "x", "created": 0}
        last = merged[-1] if merged else None
        is_token = c["choices"] and c["choices"][0]["finish_reason"] is None and "role" not in str(c["choices"][0])
        if is_token and last is not None and last.get("is_token"):
            text_key(last["choices"][0], text_key(last["choices"][0]) + text_key(c["choices"][0]))
            if "token_ids" in c["choices"][0]:
                last["choices"][0]["token_ids"] += c["choices"][0]["token_ids"]
            continue
        merged.append({**c, "is_token": is_token})
    return merged


def completion_text(choice, value=None):
    if value is not None:
        choice["text"] = value
    return choice["text"]


def chat_text(choice, value=None):
    if value is not None:
        choice["delta"]["content"] = value
    return choice["delta"]["content"]


@pytest.mark.parametrize("path, body, text_key", [
    ("/v1/completions", {"prompt": [10, 20, 30, 40], "max_tokens": 12, "temperature": 0, "echo": True,
                         "stream_options": {"include_usage": True}}, completion_text),
    ("/v1/completions", {"prompt": [10, 20, 30, 40], "max_tokens": 12, "temperature": 0, "stop": ["A"]},
     completion_text),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
                              "stream_options": {"include_usage": True}}, chat_text),
])
def test_real_server_answers_as_the_general_path(lm_server, monkeypatch, path, body, text_key):
    if path.endswith("chat/completions"):
        chat_server_template(lm_server, monkeypatch)
    taken = []
    is_plain = plain_stream.is_plain
    monkeypatch.setattr(plain_stream, "is_plain", lambda *a: taken.append(is_plain(*a)) or is_plain(*a))
    fast = sse_chunks(lm_server, path, body)
    assert taken == [True]
    monkeypatch.setattr(plain_stream, "is_plain", lambda *a: False)
    general = sse_chunks(lm_server, path, body)
    assert json.dumps(runs_merged(fast, text_key)) == json.dumps(runs_merged(general, text_key))  # keys in order
    wait_all_slots_free(lm_server)


def chat_server_template(srv, monkeypatch):
    """lm_server has no chat template: lend it the one test_chat's server renders with."""
    from server.api.chat_template import ChatTemplate
    edge = srv.app.state.edge
    monkeypatch.setattr(edge, "chat_template", ChatTemplate(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"))
