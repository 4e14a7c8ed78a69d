"""Every bad input and every limit gets its 4xx with the contract's error body, and the server keeps serving."""
import base64
import json
import threading

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from model.tokenizer import ByteTokenizer
from tests.server.conftest import running, tiny_lm


def error_of(r, status, field="__any__"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field", "type", "param"}
    assert body["error"]["param"] == body["error"]["field"]  # OpenAI's names beside ours
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 and status not in (401, 429) else
                                     {401: "authentication_error", 429: "rate_limit_error"}.get(status, "server_error"))
    if field != "__any__":
        assert body["error"]["field"] == field, body
    return body["error"]


def test_bad_json(lm_server):
    e = error_of(httpx.post(lm_server.url + "/v1/forward", content=b'{"input_ids": [[1,'), 400)
    assert e["code"] == "invalid_json"
    error_of(httpx.post(lm_server.url + "/v1/sessions", content=b"[1, 2"), 400)


def test_wrong_types(lm_server):
    error_of(httpx.post(lm_server.url + "/v1/forward", json={"input_ids": [["1", 2]]}), 422, "input_ids[0][0]")
    error_of(httpx.post(lm_server.url + "/v1/forward", json={"input_ids": "abc"}), 422, "input_ids")
    error_of(httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1], "max_tokens": "3"}), 422,
             "max_tokens")
    error_of(httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1], "temperature": -1}), 422,
             "temperature")
    error_of(httpx.post(lm_server.url + "/v1/forward", json={"input_ids": [[1]], "outputz": []}), 400, "outputz")
    error_of(httpx.post(lm_server.url + "/v1/forward", json={"input_ids": [[1]], "outputs": ["nope"]}), 422,
             "outputs[0]")


def test_out_of_vocab_ids(lm_server):
    error_of(httpx.post(lm_server.url + "/v1/forward", json={"input_ids": [[1, 2], [3, 260]]}), 422,
             "input_ids[1][1]")
    error_of(httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1, -1]}), 422, "prompt[1]")


def test_wrong_feature_width_and_kind(float_server):
    error_of(httpx.post(float_server.url + "/v1/forward", json={"inputs": [[[0.0] * 6, [0.0] * 7]]}), 422,
             "inputs[0][1]")
    error_of(httpx.post(float_server.url + "/v1/forward", json={"input_ids": [[1, 2]]}), 400, "input_ids[0]")
    error_of(httpx.post(float_server.url + "/v1/forward", json={"inputs": [[[0.0] * 6]], "outputs": ["logits"]}),
             400, "outputs[0]")


def test_nan_and_inf(float_server):
    for bad in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"inputs": [[[' + bad + b', 0, 0, 0, 0, 0]]]}'
        e = error_of(httpx.post(float_server.url + "/v1/forward", content=body), 422, "inputs[0][0][0]")
        assert "finite" in e["message"]


def test_oversized_body_and_too_many_steps(float_server):
    limit = float_server.config.max_body_bytes
    error_of(httpx.post(float_server.url + "/v1/forward", content=b" " * (limit + 1)), 413)
    with running(tiny_lm(), ByteTokenizer(), max_num_streams=2, max_num_batched_tokens=8, max_body_bytes=200,
                 max_request_steps=20) as srv:
        e = error_of(httpx.post(srv.url + "/v1/forward", json={"input_ids": [list(range(100))]}), 413)
        assert e["code"] == "body_too_large"

        def chunked():
            yield b'{"input_ids": [['
            yield b"1, " * 100
            yield b"1]]}"
        error_of(httpx.post(srv.url + "/v1/forward", content=chunked()), 413)
        error_of(httpx.post(srv.url + "/v1/forward", json={"input_ids": [[1] * 21]}), 413, "input_ids[0]")
        error_of(httpx.post(srv.url + "/v1/completions", json={"prompt": [1] * 10, "max_tokens": 11}), 413,
                 "max_tokens")


def test_unknown_session(lm_server):
    for method, path in (("POST", "/append"), ("POST", "/generate"), ("GET", "/snapshot"), ("POST", "/fork"),
                         ("DELETE", "")):
        body = {"input_ids": [1]} if path == "/append" else ({} if method == "POST" else None)
        r = httpx.request(method, f"{lm_server.url}/v1/sessions/nope{path}", json=body)
        assert error_of(r, 404, "session")["code"] == "session_not_found"
    with connect(lm_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "session": "nope"}))
        assert json.loads(ws.recv())["error"]["code"] == "session_not_found"


def test_corrupt_and_foreign_snapshots(lm_server, float_server):
    foreign = httpx.get(float_server.url + "/v1/sessions/" +
                        httpx.post(float_server.url + "/v1/sessions", json={}).json()["id"] + "/snapshot").content
    e = error_of(httpx.post(lm_server.url + "/v1/sessions", json={"snapshot": base64.b64encode(foreign).decode()}),
                 422, "snapshot")
    assert "another model" in e["message"]
    for junk in (b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}xxxxxx", foreign[:len(foreign) // 2]):
        error_of(httpx.post(lm_server.url + "/v1/sessions", json={"snapshot": base64.b64encode(junk).decode()}),
                 422, "snapshot")
    error_of(httpx.post(lm_server.url + "/v1/sessions", json={"snapshot": "***not base64***"}), 422, "snapshot")
    assert httpx.get(lm_server.url + "/ready").status_code == 200


def test_api_key():
    with running(tiny_lm(), ByteTokenizer(), max_num_streams=2, max_num_batched_tokens=8, api_key="s3cret") as srv:
        error_of(httpx.get(srv.url + "/v1/models"), 401, "authorization")
        error_of(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(InvalidStatus) as info:
            connect(srv.ws_url)
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        with connect(srv.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            ws.send(json.dumps({"type": "open"}))
            assert json.loads(ws.recv())["type"] == "opened"


def test_queue_full_429():
    with running(tiny_lm(), ByteTokenizer(), max_num_streams=1, max_num_batched_tokens=8, max_queue=1) as srv:
        started = threading.Event()
        stop = threading.Event()

        def hold_slot():
            body = {"prompt": [1], "max_tokens": 5000, "temperature": 0, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    started.set()
                    if stop.is_set():
                        break

        threads = [threading.Thread(target=hold_slot)]
        threads[0].start()
        assert started.wait(30)
        waiter = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=60,
                                                            json={"prompt": [1], "max_tokens": 1}))
        waiter.start()
        while srv.stats()["waiting"] < 1:
            pass
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert error_of(r, 429)["code"] == "queue_full" and r.headers["Retry-After"]
        stop.set()
        threads[0].join(30)
        waiter.join(30)
        assert srv.stats()["waiting"] == 0


def test_ready_is_503_until_the_engine_answers():
    """The frontend answers /health and /ready at once; /ready and /v1 say 503 until the engine has loaded."""
    import time as _time

    from tests.server.conftest import ServerThread

    srv = ServerThread(tiny_lm())
    srv.thread.start()  # the frontend alone: the engine loop has not started
    try:
        deadline = _time.monotonic() + 10
        while _time.monotonic() < deadline:
            try:
                r = httpx.get(srv.url + "/ready")
                break
            except httpx.HTTPError:
                _time.sleep(0.05)
        assert r.status_code == 503 and r.headers["Retry-After"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["engine"]["loaded"] is False
        assert error_of(httpx.get(srv.url + "/v1/models"), 503)["code"] == "not_ready"
        srv.engine_thread.start()
        while httpx.get(srv.url + "/ready").status_code != 200:
            _time.sleep(0.05)
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop()


def test_openai_parameters_out_of_range_or_unsupported_are_refused_not_ignored(lm_server):
    cases = [({"logit_bias": {"5": 101}}, 422, "logit_bias.5", "invalid_field"),
             ({"logit_bias": {"x": 1}}, 422, "logit_bias.x", "invalid_field"),
             ({"logit_bias": {"260": 1}}, 422, "logit_bias.260", "token_out_of_vocabulary"),
             ({"repetition_penalty": 0}, 422, "repetition_penalty", "invalid_field"),
             ({"presence_penalty": 2.5}, 422, "presence_penalty", "invalid_field"),
             ({"frequency_penalty": -3}, 422, "frequency_penalty", "invalid_field"),
             ({"min_tokens": 3}, 422, "min_tokens", "invalid_field"),  # above max_tokens
             ({"logprobs": 6}, 422, "logprobs", "invalid_field"),
             ({"best_of": 3}, 400, "best_of", "invalid_request"),
             ({"suffix": "x"}, 422, "suffix", "invalid_field"),
             ({"max_tokens": 0}, 422, "max_tokens", "invalid_field"),  # only with echo
             ({"n": 65}, 413, "n", "too_many_sequences"),
             ({"best_off": 2}, 400, "best_off", "unknown_field")]
    for extra, status, field, code in cases:
        r = httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2, **extra})
        assert error_of(r, status, field)["code"] == code, extra
    r = httpx.post(lm_server.url + "/v1/completions",  # no-op values are fine
                   json={"prompt": [1], "max_tokens": 2, "logit_bias": {}, "repetition_penalty": 1.0, "user": "u",
                         "best_of": 1, "n": 1, "echo": False})
    assert r.status_code == 200
