"""The Python clients against a real server on 127.0.0.1 (tiny models on the CPU): every route of DESIGN.md §5."""
from __future__ import annotations

import asyncio
import base64
import socket

import numpy as np
import pytest

from clients.client import (AsyncInfoMambaClient, AsyncStreamSession, InfoMambaClient, InfoMambaError, StreamSession,
                            binary_append_frame, chunk_text, ws_url)

ATOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture
def client(lm_server):
    with InfoMambaClient(lm_server.url) as c:
        yield c


def greedy(**kw):
    return {"temperature": 0.0, **kw}


# --- health, metrics, models ------------------------------------------------------------------------------------

def test_health_ready_metrics_and_models(client):
    health = client.health()
    assert health["status"] == "ok" and health["engine"]["alive"] and health["engine"]["pid"] > 0
    assert client.ready()["status"] == "ready" and client.is_ready()
    models = client.models()
    assert models[0]["id"] == "tiny-lm" and models[0]["config"]["vocab_size"] == 260
    text = client.metrics()
    assert "infomamba:num_requests_running" in text and "infomamba:state_slots_total" in text


# --- completions ------------------------------------------------------------------------------------------------

def test_completions_and_their_stream_agree(client):
    full = client.completions("Hello", max_tokens=8, **greedy())
    assert full["object"] == "text_completion" and full["usage"]["completion_tokens"] == 8
    chunks = list(client.stream_completions("Hello", max_tokens=8, **greedy()))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(chunk_text(c) for c in chunks) == full["choices"][0]["text"]
    assert "".join(client.stream_text("Hello", max_tokens=8, **greedy())) == full["choices"][0]["text"]
    by_ids = client.completions(list(b"Hello"), max_tokens=8, **greedy())
    assert by_ids["choices"][0]["token_ids"] == full["choices"][0]["token_ids"]
    with pytest.raises(TypeError, match="unknown sampling fields"):
        client.completions("x", max_token=3)


# --- forward ----------------------------------------------------------------------------------------------------

def test_forward_outputs_and_state(client):
    out = client.forward(input_ids=[[1, 2, 3], [4, 5]], outputs=["logits", "hidden"], return_state=True)
    first, second = out["results"]
    assert np.asarray(first["logits"]).shape == (3, 260) and np.asarray(second["logits"]).shape == (2, 260)
    assert np.asarray(first["hidden"]).shape == (3, 32)
    assert out["usage"]["prompt_tokens"] == 5
    base64.b64decode(first["state"], validate=True)
    # a forward pass's state resumes as a session: the next step matches one pass over both
    session = client.create_session(snapshot=first["state"])
    assert session.steps == 3
    step = session.append(input_ids=[7], outputs=["logits"])["results"]["logits"]
    whole = client.forward(input_ids=[[1, 2, 3, 7]], outputs=["logits"])["results"][0]["logits"]
    np.testing.assert_allclose(step[0], whole[3], atol=ATOL)
    session.delete()
    text = client.forward(text="abc")["results"][0]
    np.testing.assert_allclose(text["logits"], client.forward(input_ids=[list(b"abc")])["results"][0]["logits"],
                               atol=ATOL)


# --- sessions ---------------------------------------------------------------------------------------------------

def test_session_chunks_match_one_pass(client):
    ids = list(TEXT.encode())
    whole = np.asarray(client.forward(input_ids=[ids], outputs=["logprobs"])["results"][0]["logprobs"])
    session = client.create_session()
    assert session.steps == 0 and session.id
    parts = [session.append(input_ids=ids[a:b], outputs=["logprobs"])["results"]["logprobs"]
             for a, b in ((0, 10), (10, 11), (11, len(ids)))]
    assert session.steps == len(ids)
    np.testing.assert_allclose(np.concatenate([np.asarray(p) for p in parts]), whole, atol=ATOL)
    session.delete()


def test_session_generate_snapshot_fork_and_delete(client):
    session = client.create_session()
    session.append(text="Once upon a tim", outputs=[])
    assert session.steps == 15
    snapshot = session.snapshot()
    assert snapshot[:8] and isinstance(snapshot, bytes)
    fork = session.fork()
    assert fork.id != session.id and fork.steps == 15
    resumed = client.create_session(snapshot=snapshot)
    assert resumed.steps == 15

    done = session.generate(prompt="e", max_tokens=6, **greedy())
    assert len(done["ids"]) == 6 and done["finish_reason"] == "length" and session.steps == done["steps"]
    # the fork and the resumed snapshot continue exactly like the original (greedy), streamed or not
    assert fork.generate(input_ids=[ord("e")], max_tokens=6, **greedy())["ids"] == done["ids"]
    chunks = list(resumed.stream_generate(prompt="e", max_tokens=6, **greedy()))
    assert [c["token"] for c in chunks if "token" in c] == done["ids"]
    assert chunks[-1]["done"] and "".join(chunk_text(c) for c in chunks) == done["text"]
    assert resumed.steps == chunks[-1]["steps"]
    again = session.generate(max_tokens=2, **greedy())  # no prompt: continues from the last output
    assert again["usage"]["prompt_tokens"] == 0 and again["steps"] == done["steps"] + 2
    with_prompt = session.generate(prompt="!", max_tokens=2, **greedy())
    assert with_prompt["usage"]["prompt_tokens"] == 1

    attached = client.session(session.id)
    attached.append(input_ids=[1], outputs=[])
    assert attached.steps == with_prompt["steps"] + 1
    for s in (session, fork, resumed):
        s.delete()
    with pytest.raises(InfoMambaError) as err:
        session.append(input_ids=[1])
    assert err.value.status == 404 and err.value.code == "session_not_found"


# --- errors -----------------------------------------------------------------------------------------------------

def test_errors_are_typed(client, lm_server):
    with pytest.raises(InfoMambaError) as err:
        client.forward(input_ids=[[1, 999]])
    e = err.value
    assert (e.status, e.code, e.field) == (422, "token_out_of_vocabulary", "input_ids[0][1]")
    assert "999" in e.message and "422" in str(e)
    with pytest.raises(InfoMambaError) as err:
        client.completions("x", max_tokens=0)
    assert err.value.status == 422 and err.value.field == "max_tokens"
    with pytest.raises(InfoMambaError) as err:
        list(client.stream_completions("x", model="no-such-model"))
    assert err.value.status == 404 and err.value.code == "model_not_found"
    with pytest.raises(InfoMambaError) as err:
        client.snapshot("nope")
    assert err.value.status == 404


def test_connection_errors_are_typed():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with InfoMambaClient(url, timeout=2) as c, pytest.raises(InfoMambaError) as err:
        c.health()
    assert err.value.status == 0 and err.value.code == "connection_error"
    with pytest.raises(InfoMambaError) as err:
        StreamSession.connect(url, timeout=2)
    assert err.value.code == "connection_error"
    assert not InfoMambaClient(url, timeout=2).is_ready()


def test_numbered_appends_are_retried_after_failures_of_unknown_effect_and_others_are_not(lm_server):
    """Between the client and a real server, a transport that breaks the first try of each request after the
    server applied it (a proxy losing the answer): a numbered append's retry is answered from the record."""
    import httpx

    real = httpx.HTTPTransport()
    broken = set()

    def lose_first_answer(request: httpx.Request) -> httpx.Response:
        response = real.handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/append") and request.content not in broken:
            broken.add(request.content)
            response.read()
            return httpx.Response(502, text="<html>502 Bad Gateway</html>")  # nginx's page: applied or not?
        return response

    with InfoMambaClient(lm_server.url, transport=httpx.MockTransport(lose_first_answer)) as c:
        session = c.create_session(numbered=True)
        assert session.append(input_ids=[1, 2, 3])["replayed"] is True  # applied once, answered from the record
        assert session.append(input_ids=[4])["steps"] == 4 and session.next_seq == 3
        with pytest.raises(InfoMambaError) as err:
            c.append(session.id, input_ids=[5])  # unnumbered: a 502 is the caller's to judge
        assert err.value.status == 502
    assert [s["steps"] for s in InfoMambaClient(lm_server.url).sessions() if s["id"] == session.id] == [5]


def test_api_key(auth_server):
    API_KEY = auth_server.config.api_key
    with InfoMambaClient(auth_server.url) as anonymous:
        assert anonymous.health()["status"] == "ok"  # open routes stay open
        with pytest.raises(InfoMambaError) as err:
            anonymous.models()
        assert (err.value.status, err.value.code, err.value.field) == (401, "unauthorized", "authorization")
    with pytest.raises(InfoMambaError) as err:
        StreamSession.connect(auth_server.url, api_key="wrong")
    assert err.value.status == 401 and err.value.code == "unauthorized"
    with InfoMambaClient(auth_server.url, api_key=API_KEY) as c:
        assert c.models()[0]["id"] == "tiny-lm"
        with c.stream_session() as ws:
            assert ws.append(input_ids=[1, 2], outputs=[])["steps"] == 2
            ws.close(delete=True)


# --- websocket --------------------------------------------------------------------------------------------------

def test_ws_url():
    assert ws_url("http://h:1/") == "ws://h:1/v1/stream"
    assert ws_url("https://h") == "wss://h/v1/stream"


def test_stream_session_append_generate_snapshot_resume(client):
    ids = list(TEXT.encode())
    whole = np.asarray(client.forward(input_ids=[ids], outputs=["logits"])["results"][0]["logits"])
    with client.stream_session() as ws:
        assert ws.id and ws.steps == 0
        a = ws.append(input_ids=ids[:20], outputs=["logits"])
        b = ws.append_array(np.asarray(ids[20:-1], dtype=np.int64), outputs=["logits"])  # binary frame
        assert ws.steps == len(ids) - 1 == b["steps"]
        np.testing.assert_allclose(np.concatenate([a["results"]["logits"], b["results"]["logits"]]), whole[:-1],
                                   atol=ATOL)
        snapshot = ws.snapshot()
        # an error frame raises and leaves the connection usable
        with pytest.raises(InfoMambaError) as err:
            ws.append(input_ids=[5000])
        assert err.value.code == "token_out_of_vocabulary" and err.value.field == "input_ids[0]"
        frames = list(ws.generate(input_ids=ids[-1:], max_tokens=5, **greedy()))
        assert [f["type"] for f in frames] == ["token"] * 5 + ["done"]
        done = frames[-1]
        assert done["ids"] == [f["id"] for f in frames[:-1]] and ws.steps == done["steps"]
        session_id = ws.id
    # resume from the snapshot on a new connection: the same continuation
    with client.stream_session(snapshot=snapshot) as ws:
        assert ws.steps == len(ids) - 1 and ws.id != session_id
        assert ws.generate_all(input_ids=ids[-1:], max_tokens=5, **greedy())["ids"] == done["ids"]
        ws.close(delete=True)
    # attach to the still-live session by id, then delete it on close
    with client.stream_session(session=session_id) as ws:
        assert ws.id == session_id and ws.steps == done["steps"]
        ws.close(delete=True)
    with pytest.raises(InfoMambaError) as err:
        client.stream_session(session=session_id)
    assert err.value.code == "session_not_found"


def test_binary_append_frame_layout():
    frame = binary_append_frame(np.array([1, 2, 3]), outputs=["head"])
    n = int.from_bytes(frame[:4], "little")
    assert frame[4:4 + n].startswith(b"{") and b'"int32"' in frame[4:4 + n]
    assert np.frombuffer(frame[4 + n:], dtype="<i4").tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        binary_append_frame(np.zeros(3, dtype=np.float32))


def test_float_model_over_http_and_websocket(float_server):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 6)).astype(np.float32)
    with InfoMambaClient(float_server.url) as c:
        assert c.models()[0]["config"]["d_input"] == 6
        whole = np.asarray(c.forward(inputs=[x], outputs=["head"])["results"][0]["head"])
        assert whole.shape == (12, 3)
        with c.stream_session() as ws:
            first = ws.append(inputs=x[:5], outputs=["head"])["results"]["head"]  # JSON floats
            rest = ws.append_array(x[5:], outputs=["head", "hidden"])["results"]  # binary float32
            np.testing.assert_allclose(np.concatenate([first, rest["head"]]), whole, atol=ATOL)
            assert np.asarray(rest["hidden"]).shape == (7, 16)
            ws.close(delete=True)
        with pytest.raises(InfoMambaError) as err:
            c.completions("hi")
        assert err.value.status == 400


# --- async ------------------------------------------------------------------------------------------------------

def test_async_client_covers_the_routes(lm_server):
    async def main():
        async with AsyncInfoMambaClient(lm_server.url) as c:
            assert (await c.health())["status"] == "ok" and await c.is_ready()
            assert (await c.ready())["status"] == "ready"
            assert "infomamba:" in await c.metrics()
            assert (await c.models())[0]["id"] == "tiny-lm"
            full = await c.completions("Hi", max_tokens=5, **greedy())
            streamed = [t async for t in c.stream_text("Hi", max_tokens=5, **greedy())]
            assert "".join(streamed) == full["choices"][0]["text"]
            chunks = [ch async for ch in c.stream_completions("Hi", max_tokens=5, **greedy())]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            out = await c.forward(input_ids=[[1, 2, 3]], outputs=["logits"])
            assert len(out["results"][0]["logits"]) == 3

            session = await c.create_session()
            await session.append(text="Hi", outputs=[])
            assert session.steps == 2
            snap = await session.snapshot()
            fork = await session.fork()
            gen = await session.generate(prompt="!", max_tokens=4, **greedy())
            streamed = [ch async for ch in fork.stream_generate(prompt="!", max_tokens=4, **greedy())]
            assert [ch["token"] for ch in streamed if "token" in ch] == gen["ids"]
            resumed = await c.create_session(snapshot=snap)
            assert (await resumed.generate(prompt="!", max_tokens=4, **greedy()))["ids"] == gen["ids"]
            assert c.session(session.id).id == session.id
            for s in (session, fork, resumed):
                await s.delete()
            with pytest.raises(InfoMambaError) as err:
                await fork.append(input_ids=[1])
            assert err.value.status == 404

            ws = await c.stream_session(snapshot=snap)
            async with ws:
                assert ws.steps == 2
                out = await ws.append(input_ids=[1, 2], outputs=["logits"])
                out2 = await ws.append_array(np.array([3]), outputs=[])
                assert out2["steps"] == 5 and len(out["results"]["logits"]) == 2
                with pytest.raises(InfoMambaError):
                    await ws.append(input_ids=[-1])
                frames = [f async for f in ws.generate(max_tokens=3, **greedy())]
                assert frames[-1]["type"] == "done" and len(frames[-1]["ids"]) == 3
                assert (await ws.generate_all(max_tokens=2, **greedy()))["finish_reason"] == "length"
                blob = await ws.snapshot()
                await ws.close(delete=True)
            ws2 = await AsyncStreamSession.connect(lm_server.url, snapshot=blob)
            assert ws2.steps == ws.steps
            await ws2.close(delete=True)

            # concurrent requests share the server
            results = await asyncio.gather(*(c.completions("Hi", max_tokens=5, **greedy()) for _ in range(4)))
            assert {r["choices"][0]["text"] for r in results} == {full["choices"][0]["text"]}

    asyncio.run(main())


def test_error_parsing_keeps_retry_after_and_odd_bodies():
    import httpx

    busy = httpx.Response(429, headers={"Retry-After": "3"},
                          json={"error": {"code": "queue_full", "message": "try later", "field": None}})
    e = InfoMambaError.from_response(busy)
    assert (e.status, e.code, e.message, e.field, e.retry_after) == (429, "queue_full", "try later", None, 3.0)
    e = InfoMambaError.from_response(httpx.Response(502, text="bad gateway"))
    assert (e.status, e.code, e.message) == (502, "error", "bad gateway")
    e = InfoMambaError.from_response(httpx.Response(422, json={"detail": "nope"}))
    assert e.message == "nope"


def test_pipelined_appends_equal_one_at_a_time(lm_server):
    import numpy as np

    from clients.client import StreamSession

    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 256, size=int(n)) for n in rng.integers(1, 30, size=12)]
    with StreamSession.connect(lm_server.url) as one:
        single = [one.append_array(c, outputs=["logits"])["results"]["logits"] for c in chunks]
    with StreamSession.connect(lm_server.url) as many:
        replies = list(many.append_many(chunks, outputs=["logits"], window=4))
        assert many.steps == sum(len(c) for c in chunks)
    assert [r["results"]["logits"] for r in replies] == single
