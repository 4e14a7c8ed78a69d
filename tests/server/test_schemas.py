"""The msgspec mirrors of the hot request bodies (schemas.FAST_DECODERS) accept no body that the pydantic model
refuses, and decode every body they accept to the model's values."""
from __future__ import annotations

import json
import random

import msgspec
import pytest

from server.api import schemas
from server.api.errors import APIError
from server.api.validation import loads, parse, parse_body

INF = "__1e999__"  # JSON's 1e999 (no encoder writes it): replaced in the dumped text
ODD = [None, True, False, 0, 1, -1, 2, 5, 6, 16, -3, 0.5, 1.0, INF, 2**63, 2**63 - 1, -2**63 - 1, 101,
       "", "5", "x", "append", "open", [], [1, 2], [True], ["a", "b"], [[1, 2], [3]], [1.5], {},
       {"include_usage": True}, {"include_usage": 1}, {"7": 1.5}, {"7": 101}, {"7": True}, {"7": INF}, ["logits"],
       ["bogus"], [[0.5, 1.0]], [[INF]]]
FIELDS = {
    schemas.CompletionRequest: ["prompt", "model", "max_tokens", "n", "best_of", "echo", "logprobs", "suffix",
                                "stream_options", "user", "temperature", "top_p", "top_k", "seed", "stop",
                                "stop_token_ids", "ignore_eos", "stream", "logit_bias", "repetition_penalty",
                                "presence_penalty", "frequency_penalty", "min_tokens", "unknown"],
    schemas.AppendRequest: ["input_ids", "inputs", "text", "outputs", "seq", "unknown"],
    schemas.WSAppend: ["type", "binary", "input_ids", "inputs", "text", "outputs", "seq", "unknown"],
}


def dumps(body: dict) -> bytes:
    return json.dumps(body).replace(f'"{INF}"', "1e999").encode()  # json: ids past int64 too


def both(model_cls, raw: bytes):
    """(what the mirror decodes or None if it refuses, the model's values or the APIError it answers)."""
    try:
        fast = schemas.FAST_DECODERS[model_cls].decode(raw)
    except msgspec.MsgspecError:
        fast = None
    try:
        slow = parse(model_cls, loads(raw)).model_dump()
    except APIError as exc:
        slow = exc
    return fast, slow


def assert_same(model_cls, raw: bytes) -> None:
    fast, slow = both(model_cls, raw)
    if fast is None:
        return
    assert not isinstance(slow, APIError), (raw, slow.message)
    got = msgspec.to_builtins(fast)
    for name, value in slow.items():
        assert got[name] == value and type(got[name]) is type(value), (raw, name, got[name], value)


@pytest.mark.parametrize("model_cls", list(FIELDS))
def test_a_mirror_refuses_what_its_model_refuses_and_agrees_on_the_rest(model_cls):
    rng = random.Random(0)
    required = {schemas.CompletionRequest: {"prompt": [1, 2, 3]},
                schemas.WSAppend: {"type": "append"}}.get(model_cls, {})
    for name in FIELDS[model_cls]:
        for value in ODD:
            assert_same(model_cls, dumps({**required, name: value}))
    for _ in range(3000):
        body = {name: rng.choice(ODD) for name in rng.sample(FIELDS[model_cls], rng.randint(0, 5))}
        if rng.random() < 0.7:
            body = {**required, **body}
        assert_same(model_cls, dumps(body))
    for raw in (b"", b"[]", b"null", b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "\\ud800"}',
                b'{"prompt": [1], "prompt": "x"}', b'{"prompt": [1]} x', b'{"input_ids": [1], "seq": -0}'):
        assert_same(model_cls, raw)


def test_parse_body_answers_the_models_errors():
    with pytest.raises(APIError) as err:
        parse_body(schemas.CompletionRequest, b'{"prompt": [1], "temperature": "1"}')
    assert (err.value.status, err.value.field) == (422, "temperature")
    with pytest.raises(APIError) as err:
        parse_body(schemas.AppendRequest, b'{"input_ids": [1], "bogus": 1}')
    assert (err.value.status, err.value.code, err.value.field) == (400, "unknown_field", "bogus")
    assert parse_body(schemas.CompletionRequest, b'{"prompt": [[1], [2]]}').prompt == [[1], [2]]  # the model's way
