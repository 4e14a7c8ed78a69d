"""Sessions over HTTP and the websocket keep the invariant: any chunking, snapshots, spills and restarts give
the same per-step outputs as one forward pass over the whole sequence."""
import base64
import json
import random
import struct
import time

import httpx
import torch
from websockets.sync.client import connect

from tests.server.conftest import running, tiny_float, tiny_lm

ATOL = 1e-4


def forward_whole(srv, seq):
    r = httpx.post(srv.url + "/v1/forward", json={"inputs": [seq], "outputs": ["head", "hidden"]})
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["results"][0]["head"]), torch.tensor(r.json()["results"][0]["hidden"])


def random_chunks(rng, n):
    cuts = sorted(rng.sample(range(1, n), rng.randint(1, 8)))
    return list(zip([0] + cuts, cuts + [n]))


def binary_append(rows, outputs=("head",)):
    header = json.dumps({"type": "append", "dtype": "float32", "outputs": list(outputs)}).encode()
    return struct.pack("<I", len(header)) + header + torch.tensor(rows, dtype=torch.float32).numpy().tobytes()


def test_ws_random_chunks_equal_one_forward(float_server):
    rng = random.Random(1)
    seq = torch.randn(70, 6, generator=torch.Generator().manual_seed(1)).tolist()
    want_head, want_hidden = forward_whole(float_server, seq)
    with connect(float_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open"}))
        opened = json.loads(ws.recv())
        assert opened["type"] == "opened" and opened["steps"] == 0
        heads, hiddens = [], []
        for i, (lo, hi) in enumerate(random_chunks(rng, len(seq))):
            if i % 2:  # alternate JSON and binary frames
                ws.send(binary_append(seq[lo:hi], ("head", "hidden")))
            else:
                ws.send(json.dumps({"type": "append", "inputs": seq[lo:hi], "outputs": ["head", "hidden"]}))
            frame = json.loads(ws.recv())
            assert frame["type"] == "outputs" and frame["steps"] == hi
            heads += frame["results"]["head"]
            hiddens += frame["results"]["hidden"]
        ws.send(json.dumps({"type": "close", "delete": True}))
    torch.testing.assert_close(torch.tensor(heads), want_head, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(hiddens), want_hidden, atol=ATOL, rtol=1e-4)


def test_ws_error_frame_keeps_connection(float_server):
    with connect(float_server.ws_url) as ws:
        ws.send(json.dumps({"type": "append", "inputs": [[0.0] * 6]}))  # no session yet
        assert json.loads(ws.recv())["type"] == "error"
        ws.send("{not json")
        err = json.loads(ws.recv())
        assert err["type"] == "error" and err["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "open"}))
        assert json.loads(ws.recv())["type"] == "opened"
        ws.send(json.dumps({"type": "append", "inputs": [[0.0] * 5]}))
        err = json.loads(ws.recv())
        assert err["error"]["code"] == "wrong_feature_width" and err["error"]["field"] == "inputs[0]"
        ws.send(binary_append([[0.0] * 6])[:-3])
        assert json.loads(ws.recv())["error"]["field"] == "inputs"
        ws.send(json.dumps({"type": "append", "inputs": [[1.0] * 6]}))
        assert json.loads(ws.recv())["steps"] == 1


def test_snapshot_resume_equals_never_stopping(float_server):
    seq = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)).tolist()
    want, _ = forward_whole(float_server, seq)
    c = httpx.Client(base_url=float_server.url)
    sid = c.post("/v1/sessions", json={}).json()["id"]
    first = c.post(f"/v1/sessions/{sid}/append", json={"inputs": seq[:17], "outputs": ["head"]}).json()
    snap = c.get(f"/v1/sessions/{sid}/snapshot")
    assert snap.headers["content-type"] == "application/octet-stream"
    c.delete(f"/v1/sessions/{sid}")
    # over HTTP
    resumed = c.post("/v1/sessions", json={"snapshot": base64.b64encode(snap.content).decode()}).json()
    assert resumed["steps"] == 17
    rest = c.post(f"/v1/sessions/{resumed['id']}/append", json={"inputs": seq[17:], "outputs": ["head"]}).json()
    torch.testing.assert_close(torch.tensor(first["results"]["head"] + rest["results"]["head"]), want, atol=ATOL,
                               rtol=1e-4)
    # and over the websocket, from the snapshot frame
    with connect(float_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "snapshot": base64.b64encode(snap.content).decode()}))
        assert json.loads(ws.recv())["steps"] == 17
        ws.send(json.dumps({"type": "append", "inputs": seq[17:30]}))
        part = json.loads(ws.recv())["results"]["head"]
        ws.send(json.dumps({"type": "snapshot"}))
        frame = json.loads(ws.recv())
        assert frame["type"] == "snapshot" and frame["steps"] == 30
    torch.testing.assert_close(torch.tensor(part), want[17:30], atol=ATOL, rtol=1e-4)
    # fork: both branches continue identically
    fork = c.post(f"/v1/sessions/{resumed['id']}/fork").json()
    assert fork["steps"] == 40


def test_forward_return_state_and_batch(float_server):
    seqs = [torch.randn(n, 6, generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 1)]
    r = httpx.post(float_server.url + "/v1/forward", json={"inputs": seqs, "return_state": True}).json()
    for s, res in zip(seqs, r["results"]):
        want, _ = forward_whole(float_server, s)
        torch.testing.assert_close(torch.tensor(res["head"]), want, atol=ATOL, rtol=1e-4)
        assert res["steps"] == len(s) and base64.b64decode(res["state"])[:8]
    assert r["usage"]["prompt_tokens"] == 15


def test_idle_sessions_spill_and_restart_loses_nothing(tmp_path):
    seq = torch.randn(30, 6, generator=torch.Generator().manual_seed(3)).tolist()
    model = tiny_float()
    cfg = dict(max_num_streams=2, max_num_batched_tokens=16, session_ttl=0.2, state_dir=str(tmp_path))
    with running(model, **cfg) as srv:
        want, _ = forward_whole(srv, seq)
        c = httpx.Client(base_url=srv.url)
        sids = [c.post("/v1/sessions", json={}).json()["id"] for _ in range(3)]  # 3 sessions, 2 slots: one spills
        outs = {sid: c.post(f"/v1/sessions/{sid}/append", json={"inputs": seq[:10]}).json()["results"]["head"]
                for sid in sids}
        deadline = time.monotonic() + 10
        while srv.stats()["sessions_live"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats()["sessions_spilled"] == 3  # idle past the TTL
        more = c.post(f"/v1/sessions/{sids[0]}/append", json={"inputs": seq[10:20]}).json()  # restored on use
        assert more["steps"] == 20
        outs[sids[0]] += more["results"]["head"]
    # the server stopped; a new one on the same state_dir picks every session up
    with running(model, **cfg) as srv:
        c = httpx.Client(base_url=srv.url)
        for sid in sids:
            done = len(outs[sid])
            r = c.post(f"/v1/sessions/{sid}/append", json={"inputs": seq[done:]})
            assert r.status_code == 200, r.text
            got = torch.tensor(outs[sid] + r.json()["results"]["head"])
            torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_session_generate_continues_like_one_stream(lm_server):
    model = tiny_lm()
    c = httpx.Client(base_url=lm_server.url)
    sid = c.post("/v1/sessions", json={}).json()["id"]
    c.post(f"/v1/sessions/{sid}/append", json={"input_ids": [5, 6, 7]})
    g1 = c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "temperature": 0}).json()
    events = []
    with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 3, "temperature": 0,
                                                                 "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    g2 = [e["token"] for e in events if "token" in e]
    assert events[-1]["done"] and events[-1]["steps"] == 3 + 4 + 3
    from tests.server.test_engine_api import greedy_reference
    assert g1["ids"] + g2 == greedy_reference(model, [5, 6, 7], 7)
    with connect(lm_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "session": sid}))
        assert json.loads(ws.recv())["steps"] == 10
        ws.send(json.dumps({"type": "generate", "max_tokens": 2, "temperature": 0}))
        frames = [json.loads(ws.recv()) for _ in range(3)]
        assert [f["type"] for f in frames] == ["token", "token", "done"]
    assert g1["ids"] + g2 + frames[2]["ids"] == greedy_reference(model, [5, 6, 7], 9)


def test_snapshots_carry_the_last_logits_so_a_resumed_stream_generates_without_a_prompt(lm_server):
    url = lm_server.url
    greedy = {"max_tokens": 6, "temperature": 0}
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    assert httpx.post(url + f"/v1/sessions/{sid}/append", json={"text": "Once upon a tim", "outputs": []}).status_code == 200
    blob = httpx.get(url + f"/v1/sessions/{sid}/snapshot").content
    original = httpx.post(url + f"/v1/sessions/{sid}/generate", json=greedy).json()
    resumed = httpx.post(url + "/v1/sessions", json={"snapshot": base64.b64encode(blob).decode()}).json()["id"]
    again = httpx.post(url + f"/v1/sessions/{resumed}/generate", json=greedy)
    assert again.status_code == 200, again.text
    assert again.json()["ids"] == original["ids"] and len(original["ids"]) == 6
    # a forward pass's returned state carries them too
    fwd = httpx.post(url + "/v1/forward", json={"text": ["Once upon a tim"], "return_state": True, "outputs": []})
    from_forward = httpx.post(url + "/v1/sessions", json={"snapshot": fwd.json()["results"][0]["state"]}).json()["id"]
    assert httpx.post(url + f"/v1/sessions/{from_forward}/generate", json=greedy).json()["ids"] == original["ids"]


def test_ws_cancel_stops_a_generate_and_frames_sent_meanwhile_wait_their_turn(lm_server):
    with connect(lm_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open"}))
        sid = json.loads(ws.recv())["session"]
        ws.send(json.dumps({"type": "cancel"}))  # nothing running: an error frame, the connection stays usable
        assert json.loads(ws.recv())["error"]["code"] == "nothing_to_cancel"
        ws.send(json.dumps({"type": "generate", "prompt": "def ", "max_tokens": 2000, "temperature": 0,
                            "ignore_eos": True}))
        first = json.loads(ws.recv())
        assert first["type"] == "token"
        ws.send(json.dumps({"type": "snapshot"}))  # queued behind the generate
        ws.send(json.dumps({"type": "cancel"}))
        frames = [first]
        while frames[-1]["type"] != "done":
            frames.append(json.loads(ws.recv()))
        done = frames[-1]
        assert done["finish_reason"] == "cancelled"
        assert 1 <= len(done["ids"]) < 2000 and done["ids"] == [f["id"] for f in frames if f["type"] == "token"]
        snap = json.loads(ws.recv())
        assert snap["type"] == "snapshot" and snap["steps"] == done["steps"]
    # the session's count matches its state, and it generates on from where the cancel left it
    state = httpx.get(lm_server.url + f"/v1/sessions/{sid}/snapshot")
    from model.state import read_snapshot

    restored, _ = read_snapshot(state.content, lm_server.core.model.config, lm_server.core.model.fingerprint())
    assert int(restored.steps[0]) == done["steps"]
    # the prompt and every generated token but possibly the last, which a cancel can catch before it is fed
    assert done["steps"] in (4 + len(done["ids"]) - 1, 4 + len(done["ids"]))
    more = httpx.post(lm_server.url + f"/v1/sessions/{sid}/generate", json={"max_tokens": 3, "temperature": 0})
    assert more.status_code == 200 and more.json()["steps"] > done["steps"]


def test_pipelined_ws_appends_equal_one_at_a_time_and_one_forward(float_server):
    """Frames sent without waiting are applied and answered in order: the same outputs as waiting for each, and
    as one /v1/forward over the whole sequence; binary output frames carry the same numbers."""
    seq = torch.randn(90, 6, generator=torch.Generator().manual_seed(5)).tolist()
    want_head, _ = forward_whole(float_server, seq)
    chunks = random_chunks(random.Random(5), len(seq))

    def run(pipelined: bool) -> list:
        heads = []
        with connect(float_server.ws_url) as ws:
            ws.send(json.dumps({"type": "open"}))
            assert json.loads(ws.recv())["type"] == "opened"
            frames = []
            for i, (lo, hi) in enumerate(chunks):
                if i % 2:
                    frames.append(binary_append(seq[lo:hi]))
                else:
                    frames.append(json.dumps({"type": "append", "inputs": seq[lo:hi], "outputs": ["head"],
                                              "binary": i % 4 == 0}))
            answers = []
            for frame in frames:
                ws.send(frame)
                if not pipelined:
                    answers.append(ws.recv())
            ws.send(json.dumps({"type": "snapshot"}))  # queued behind every append
            answers += [ws.recv() for _ in range(len(frames) - len(answers))]
            snapshot = json.loads(ws.recv())
            assert snapshot["type"] == "snapshot" and snapshot["steps"] == len(seq)
            for (lo, hi), answer in zip(chunks, answers):
                if isinstance(answer, bytes):
                    n = struct.unpack("<I", answer[:4])[0]
                    header = json.loads(answer[4:4 + n])
                    rows, width = header["kinds"]["head"]
                    assert header["steps"] == hi and rows == hi - lo
                    heads += torch.frombuffer(bytearray(answer[4 + n:]), dtype=torch.float32).reshape(rows,
                                                                                                      width).tolist()
                else:
                    frame = json.loads(answer)
                    assert frame["type"] == "outputs" and frame["steps"] == hi, frame
                    heads += frame["results"]["head"]
            ws.send(json.dumps({"type": "close", "delete": True}))
        return heads

    one_at_a_time, pipelined = run(False), run(True)
    torch.testing.assert_close(torch.tensor(pipelined), torch.tensor(one_at_a_time), atol=0, rtol=0)
    torch.testing.assert_close(torch.tensor(pipelined), want_head, atol=ATOL, rtol=1e-4)
