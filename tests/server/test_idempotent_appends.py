"""Idempotent appends through the real server: an append numbered with `seq` that was applied already is answered
from the session's record (its steps, "replayed": true), never applied twice; over HTTP and websocket frames (JSON
and binary), after a restart (the numbers come back from the snapshot's metadata and the log), and when the
client gave up on the first try while it ran. tests/server/test_scale_out.py covers a replica dying."""
from __future__ import annotations

import json
import struct
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from model.tokenizer import ByteTokenizer
from tests.server.conftest import running, tiny_lm

ATOL = 1e-4


def append(srv, sid: str, ids: list[int], seq: int | None, timeout: float = 30) -> httpx.Response:
    body = {"input_ids": ids, "outputs": ["logits"]}
    if seq is not None:
        body["seq"] = seq
    return httpx.post(f"{srv.url}/v1/sessions/{sid}/append", json=body, timeout=timeout)


def forward_logits(srv, ids: list[int]) -> np.ndarray:
    r = httpx.post(srv.url + "/v1/forward", json={"input_ids": [ids]}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["results"][0]["logits"], dtype=np.float32)


def test_a_retried_append_is_answered_from_the_record_here_and_after_a_restart(tmp_path):
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 256, n).tolist() for n in (5, 6, 3, 4)]
    config = dict(max_num_streams=4, max_num_batched_tokens=64, state_dir=str(tmp_path), snapshot_every=8)
    with running(tiny_lm(), ByteTokenizer(), **config) as srv:
        sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
        plain = append(srv, sid, [], None)  # unnumbered: the answer is as it always was
        assert plain.status_code == 200 and "replayed" not in plain.json() and "seq" not in plain.json()
        first = append(srv, sid, chunks[0], 1).json()
        assert (first["steps"], first["seq"], first["replayed"]) == (5, 1, False)
        second = append(srv, sid, chunks[1], 2).json()  # 11 logged steps >= 8: a snapshot, holding seqs 1 and 2
        assert (second["steps"], second["replayed"]) == (11, False)
        again = append(srv, sid, chunks[1], 2)
        assert again.status_code == 200, again.text
        assert again.json() == {"results": {"logits": []}, "steps": 11, "seq": 2, "replayed": True}
        assert append(srv, sid, chunks[0], 1).json()["steps"] == 5  # an older one, still remembered
        stale = append(srv, sid, chunks[0], 0)  # below the last applied and never applied: refused
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "invalid_seq", stale.text
        assert stale.json()["error"]["field"] == "seq"
        third = append(srv, sid, chunks[2], 5).json()  # numbers may skip; a log record now carries seq 5
        assert (third["steps"], third["replayed"]) == (14, False)
        bad = append(srv, sid, [1], -1)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "seq"
    with running(tiny_lm(), ByteTokenizer(), **config) as srv:  # the same state dir: nothing was lost, or doubled
        assert append(srv, sid, chunks[2], 5).json() == {"results": {"logits": []}, "steps": 14, "seq": 5,
                                                          "replayed": True}
        assert append(srv, sid, chunks[1], 2).json()["steps"] == 11
        last = append(srv, sid, chunks[3], 6)
        assert last.json()["steps"] == 18 and not last.json()["replayed"]
        want = forward_logits(srv, sum(chunks, []))[-4:]
        np.testing.assert_allclose(np.asarray(last.json()["results"]["logits"], np.float32), want, atol=ATOL,
                                   rtol=1e-4)


def test_pipelined_websocket_frames_with_a_repeated_seq_are_applied_once(lm_server):
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    with connect(lm_server.ws_url) as ws:
        ws.send(json.dumps({"type": "open"}))
        sid = json.loads(ws.recv(timeout=30))["session"]
        frames = [{"type": "append", "input_ids": ids[0], "seq": 10, "outputs": []},
                  {"type": "append", "input_ids": ids[1], "seq": 11, "outputs": []},
                  {"type": "append", "input_ids": ids[1], "seq": 11, "outputs": []}]  # a duplicate, in flight
        for frame in frames:
            ws.send(json.dumps(frame))
        header = json.dumps({"type": "append", "dtype": "int32", "seq": 12, "binary": True}).encode()
        ws.send(struct.pack("<I", len(header)) + header + np.asarray(ids[2], "<i4").tobytes())
        ws.send(struct.pack("<I", len(header)) + header + np.asarray(ids[2], "<i4").tobytes())  # and again
        answers = [json.loads(ws.recv(timeout=30)) for _ in frames]
        assert [(a["steps"], a["seq"], a["replayed"]) for a in answers] == [(3, 10, False), (5, 11, False),
                                                                           (5, 11, True)]
        binary = []
        for _ in range(2):
            data = ws.recv(timeout=30)
            (n,) = struct.unpack_from("<I", data)
            binary.append(json.loads(data[4:4 + n]))
        assert [(b["steps"], b["seq"], b["replayed"]) for b in binary] == [(9, 12, False), (9, 12, True)]
    steps = httpx.get(f"{lm_server.url}/v1/sessions/{sid}/snapshot").headers["X-Session-Steps"]
    assert int(steps) == 9


def test_a_numbered_append_runs_to_its_end_when_its_client_gives_up_and_its_retry_gets_the_record():
    # small engine steps, so a long append takes many of them: the client's first try times out while it runs
    ids = np.random.default_rng(4).integers(0, 256, 4096).tolist()
    with running(tiny_lm(), ByteTokenizer(), max_num_streams=4, max_num_batched_tokens=16) as srv:
        sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
        with pytest.raises(httpx.TimeoutException):
            append(srv, sid, ids, 1, timeout=0.2)
        deadline = time.monotonic() + 60
        while (r := append(srv, sid, ids, 1)).status_code == 409:  # session_busy while the first try runs
            assert r.json()["error"]["code"] == "session_busy", r.text
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        assert (r.json()["steps"], r.json()["replayed"]) == (4096, True)
        tail = append(srv, sid, [1, 2], 2)
        assert tail.json()["steps"] == 4098
        want = forward_logits(srv, ids + [1, 2])[-2:]
        np.testing.assert_allclose(np.asarray(tail.json()["results"]["logits"], np.float32), want, atol=ATOL,
                                   rtol=1e-4)
