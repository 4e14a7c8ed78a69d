"""Scale-out through real parts: replicas sharing a real Redis (`--state-store`) and a real nginx in front of them
(docker/nginx). A session continues on another replica after its replica is SIGKILLed, from its snapshot and
logged inputs, with the outputs of one uninterrupted pass, and a retried numbered append is answered from the
record; a lease keeps a second replica from advancing a live replica's session, and a write (snapshot or log
record) from a replica that lost the session is refused; an acknowledged append costs Redis its inputs' bytes, not
a snapshot; every replica lists every session; nginx sends every request of one session to one replica."""
from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest
import torch

from clients.client import InfoMambaClient
from model.state import StreamState
from model.tokenizer import ByteTokenizer
from model.weights import save_model
from server.engine.redis_store import RedisSessionStore
from server.engine.wal import LogRecord
from tests.server.conftest import ServerThread, tiny_lm
from tests.server.scale import NginxProxy, RedisServer
from tests.server.test_engine_api import greedy_reference
from tests.server.test_processes import ServeProcess, all_gone

LEASE_TTL = 1.0
SERVER = dict(max_num_streams=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def redis_server():
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def store_url(redis_server):
    redis_server.client.flushall()
    return redis_server.url


def replica(url: str, name: str, **config) -> ServerThread:
    return ServerThread(tiny_lm(), ByteTokenizer(), state_store=url, state_lease_ttl=LEASE_TTL, replica_id=name,
                        **{**SERVER, **config})


def append(base: str, sid: str, ids: list[int]) -> httpx.Response:
    return httpx.post(f"{base}/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": ["logits"]}, timeout=30)


def logits_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["results"]["logits"], dtype=np.float32)


def forward_logits(base: str, ids: list[int]) -> np.ndarray:
    r = httpx.post(base + "/v1/forward", json={"input_ids": [ids], "outputs": ["logits"]}, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["results"][0]["logits"], dtype=np.float32)


def append_when_free(base: str, sid: str, ids: list[int], timeout: float) -> tuple[httpx.Response, int]:
    """Append, retrying on 503 session_owned_elsewhere after its Retry-After (capped short); returns the answer and
    how many 503s came first."""
    deadline, refused = time.monotonic() + timeout, 0
    while True:
        r = append(base, sid, ids)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r, refused
        assert r.json()["error"]["code"] == "session_owned_elsewhere", r.text
        assert int(r.headers["Retry-After"]) >= 1
        refused += 1
        time.sleep(0.1)


def counter(base: str, route: str, status: str = "200") -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    pattern = re.compile(r'^infomamba:http_requests_total\{route="%s",status="%s"\} (\S+)$'
                         % (re.escape(route), status), re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


def test_a_session_continues_on_another_replica_after_its_replica_is_killed(store_url, redis_server, tmp_path):
    """Two replicas behind nginx; SIGKILL of the one that holds a session between two of a client's numbered
    appends: the client (retrying 503s) carries on through the proxy; the other replica replays the logged inputs,
    answers the retry of an append whose answer was lost from the record, and every output equals one
    uninterrupted pass."""
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n).tolist() for n in (5, 9, 6, 3)]
    model_dir = save_model(tiny_lm(), tmp_path / "tiny-lm")
    a = ServeProcess(model_dir, tmp_path / "state-a", "--state-store", store_url, "--state-lease-ttl",
                     str(LEASE_TTL), "--replica-id", "a")  # a real process, to be SIGKILLed
    b = replica(store_url, "b").start()
    proxy = None
    try:
        a.wait_ready()
        proxy = NginxProxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
        with InfoMambaClient(proxy.url) as client:
            for _ in range(30):  # nginx picks each new session's replica by its id: take one that lands on a
                sid = client.create_session().id
                if redis_server.client.get(f"infomamba:{{{sid}}}:lease") == b"a":
                    break
            else:
                pytest.fail("no session landed on replica a")
            got = [client.append(sid, input_ids=c, outputs=["logits"], seq=i + 1)["results"]["logits"]
                   for i, c in enumerate(chunks[:2])]
            # acknowledged as two log records after the create's snapshot (of step 0), not as snapshots
            assert redis_server.client.llen(f"infomamba:{{{sid}}}:log") == 2
            assert redis_server.client.hget(f"infomamba:{{{sid}}}:state", "steps") == b"14"
            pids = a.children()
            a.kill_all()  # SIGKILL: no shutdown, no lease released; every acknowledged append is in Redis
            killed = time.monotonic()
            # between two appends: once its processes are gone (and nginx has seen its kept-alive connections
            # close), no request is in flight to it. One caught in flight would get a 502 with no way to know
            # whether it was applied (idempotent appends are not there yet).
            assert all_gone(pids)
            time.sleep(0.2)
            retried = client.append(sid, input_ids=chunks[1], outputs=["logits"], seq=2)  # as if its ack was lost
            assert time.monotonic() - killed < LEASE_TTL + 2  # served again within the lease TTL (+ slack)
            assert (retried["replayed"], retried["steps"], retried["results"]["logits"]) == (True, 14, [])
            got.append(client.append(sid, input_ids=chunks[2], outputs=["logits"], seq=3)["results"]["logits"])
            last = client.append(sid, input_ids=chunks[3], outputs=["logits"], seq=4)
            got.append(last["results"]["logits"])
            assert last["steps"] == sum(map(len, chunks))
            assert redis_server.client.get(f"infomamba:{{{sid}}}:lease") == b"b"
            want = forward_logits(proxy.url, sum(chunks, []))
            np.testing.assert_allclose(np.concatenate([np.asarray(g, np.float32) for g in got]), want, rtol=1e-4,
                                       atol=1e-4)
            gen = client.session(sid).generate(max_tokens=4, temperature=0)
            assert gen["ids"] == greedy_reference(tiny_lm(), sum(chunks, []), 4)
    finally:
        a.kill_all()
        if proxy is not None:
            proxy.stop()
        b.stop()


def test_a_lease_keeps_a_second_replica_out_until_the_owner_hands_the_session_over(store_url):
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 256, n).tolist() for n in (4, 3, 5, 2)]
    a, b = replica(store_url, "a").start(), replica(store_url, "b").start()
    try:
        sid = httpx.post(a.url + "/v1/sessions", json={}).json()["id"]
        got = [logits_of(append(a.url, sid, chunks[0]))]
        refused = append(b.url, sid, chunks[1])  # a holds it: b must not advance it
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "session_owned_elsewhere"
        assert "replica a" in refused.json()["error"]["message"] and "Retry-After" in refused.headers
        # b asked for it; a hands it over at its next lease renewal, being idle (the client retries meanwhile)
        with InfoMambaClient(b.url) as client:
            t0 = time.monotonic()
            answer = client.append(sid, input_ids=chunks[1], outputs=["logits"])
            assert time.monotonic() - t0 < 3
        got.append(np.asarray(answer["results"]["logits"], dtype=np.float32))
        back = append(a.url, sid, chunks[2])  # now b holds it
        assert back.status_code == 503 and "replica b" in back.json()["error"]["message"]
        r, _ = append_when_free(a.url, sid, chunks[2], timeout=5)
        got.append(logits_of(r))
        got.append(logits_of(append(a.url, sid, chunks[3])))
        np.testing.assert_allclose(np.concatenate(got), forward_logits(a.url, sum(chunks, [])), rtol=1e-4,
                                   atol=1e-4)
        # deleted through one replica: gone on the other too, though it had seen it
        assert httpx.delete(f"{a.url}/v1/sessions/{sid}").status_code == 204
        gone = append(b.url, sid, [1])
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found", gone.text
    finally:
        a.stop()
        b.stop()


def test_a_write_from_a_replica_that_lost_the_session_is_refused(store_url, redis_server):
    model = tiny_lm()
    done = {"a": [], "b": []}
    a = RedisSessionStore(store_url, model.config.name, model.fingerprint(), done["a"].append, replica_id="a")
    b = RedisSessionStore(store_url, model.config.name, model.fingerprint(), done["b"].append, replica_id="b")
    state = StreamState.empty(model.config, 1)
    a.write("s1", state, None)  # not started: applied inline
    assert done["a"][-1].error is None
    redis_server.client.delete("infomamba:{s1}:lease")  # a's lease expires (a paused longer than its TTL)
    b.read("s1")  # b takes it over and advances it
    state.steps += 3
    b.write("s1", state, None)
    assert done["b"][-1].error is None
    a.write("s1", state, None)  # a still thinks it owns the session
    assert "owned by replica b" in done["a"][-1].error
    b.release("s1")  # even with the lease free, a's copy is older than the store's
    a.write("s1", state, None)
    assert "changed in the state store" in done["a"][-1].error
    assert int(redis_server.client.hget("infomamba:{s1}:state", "version")) == 2
    a.read("s1")  # loading the current version makes a the owner again
    a.write("s1", state, None)
    assert done["a"][-1].error is None
    a.stop()
    b.stop()


def test_a_log_record_from_a_replica_that_lost_the_session_is_refused(store_url, redis_server):
    model = tiny_lm()
    done = {"a": [], "b": []}
    a = RedisSessionStore(store_url, model.config.name, model.fingerprint(), done["a"].append, replica_id="a")
    b = RedisSessionStore(store_url, model.config.name, model.fingerprint(), done["b"].append, replica_id="b")
    a.write("s1", StreamState.empty(model.config, 1), None)
    first = LogRecord.of("s1", 0, np.array([1, 2, 3]), seq=7)
    a.append_log([first])
    assert done["a"][-1].error is None and done["a"][-1].failed is None
    redis_server.client.delete("infomamba:{s1}:lease")  # a's lease expires
    _, records = b.load("s1")  # b takes over: the snapshot and the records after it
    assert records == [first]
    b.append_log([LogRecord.of("s1", 3, np.array([4]))])
    assert done["b"][-1].failed is None
    a.write("s2", StreamState.empty(model.config, 1), None)
    a.append_log([LogRecord.of("s1", 3, np.array([9, 9])), LogRecord.of("s2", 0, np.array([5]))])  # one round trip
    refused = done["a"][-1]
    assert refused.error is None and set(refused.failed) == {"s1"}, refused  # s2's record went in
    assert "owned by replica b" in refused.failed["s1"]
    assert redis_server.client.llen("infomamba:{s1}:log") == 2 and redis_server.client.llen("infomamba:{s2}:log") == 1
    assert redis_server.client.hget("infomamba:sessions", "s1") == b"4"
    b.release("s1")  # free again, but a's copy is behind the store's: still refused
    a.append_log([LogRecord.of("s1", 3, np.array([9, 9]))])
    assert "changed in the state store" in done["a"][-1].failed["s1"]
    state = StreamState.empty(model.config, 1)
    state.steps += 4
    b.load("s1")
    b.write("s1", state, None)  # a snapshot covers the records: the log is emptied
    assert redis_server.client.llen("infomamba:{s1}:log") == 0
    assert b.load("s1")[1] == []
    b.append_log([LogRecord.of("s1", 6, np.array([1]))])  # would skip steps 4 and 5 (say their write failed)
    assert "holds it up to step 4" in done["b"][-1].failed["s1"]
    b.append_log([LogRecord.of("s1", 4, np.array([1, 2]))])  # still b's: a record that continues goes in
    assert done["b"][-1].failed is None and b.load("s1")[1][0].steps_before == 4
    a.stop()
    b.stop()


def redis_bytes_in(redis_server) -> int:
    return int(redis_server.client.info("stats")["total_net_input_bytes"])


def test_an_acknowledged_append_costs_redis_its_inputs_not_a_snapshot(store_url, redis_server):
    """Bytes Redis received per acknowledged 16-token append of the tiny test model, with a snapshot per answer
    (--snapshot-every 1: how every answer was written before the log) and with the log."""
    per_ack = {}
    for label, every in (("snapshot", 1), ("log", 4096)):
        srv = replica(store_url, label, snapshot_every=every).start()
        try:
            sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
            logits_of(append(srv.url, sid, list(range(16))))
            before = redis_bytes_in(redis_server)
            for _ in range(20):
                r = httpx.post(f"{srv.url}/v1/sessions/{sid}/append", json={"input_ids": list(range(16)),
                                                                              "outputs": []})
                assert r.status_code == 200, r.text
            per_ack[label] = (redis_bytes_in(redis_server) - before) / 20
        finally:
            srv.stop()
    snapshot = len(redis_server.client.get(redis_server.client.hget(f"infomamba:{{{sid}}}:state", "blob")))
    print(f"bytes to Redis per ack: {per_ack} (snapshot {snapshot} B)")
    assert per_ack["snapshot"] > snapshot  # the whole state, each time
    assert per_ack["log"] < 1000 and per_ack["log"] * 10 < per_ack["snapshot"]


def test_every_replica_lists_every_session_and_a_record_moves_with_its_snapshot(store_url):
    a = replica(store_url, "a", snapshot_every=4).start()
    b = replica(store_url, "b", snapshot_every=4).start()
    try:
        on_a = httpx.post(a.url + "/v1/sessions", json={}).json()["id"]
        on_b = httpx.post(b.url + "/v1/sessions", json={}).json()["id"]
        r = httpx.post(f"{a.url}/v1/sessions/{on_a}/append", json={"input_ids": [1, 2, 3, 4, 5], "seq": 1})
        assert r.json()["steps"] == 5  # 5 steps >= 4: answered once a snapshot holding seq 1 is in Redis
        httpx.post(f"{b.url}/v1/sessions/{on_b}/append", json={"input_ids": [6, 7]})
        for srv in (a, b):
            listing = httpx.get(srv.url + "/v1/sessions").json()
            assert listing["object"] == "list" and listing["replica"] == ("a" if srv is a else "b")
            assert {(s["id"], s["steps"], s["owner"], s["resident"]) for s in listing["data"]} == {
                (on_a, 5, "a", srv is a), (on_b, 2, "b", srv is b)}
        a.stop()  # a clean stop hands its leases back; b takes the session on its next request
        again = httpx.post(f"{b.url}/v1/sessions/{on_a}/append", json={"input_ids": [1, 2, 3, 4, 5], "seq": 1})
        assert (again.json()["steps"], again.json()["replayed"]) == (5, True), again.text
        owners = {s["id"]: s["owner"] for s in httpx.get(b.url + "/v1/sessions").json()["data"]}
        assert owners == {on_a: "b", on_b: "b"}
    finally:
        a.stop() if a.thread.is_alive() else None
        b.stop()


def test_nginx_routes_each_session_to_one_replica_and_spreads_the_rest(store_url, redis_server):
    # slots for every session: a spilled session hands its lease back, and the leases tell who holds which
    a, b = replica(store_url, "a", max_num_streams=32).start(), replica(store_url, "b", max_num_streams=32).start()
    proxy = NginxProxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    try:
        sids = []
        for _ in range(16):  # created where their id hashes: nginx picks the id
            r = httpx.post(proxy.url + "/v1/sessions", json={})
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])
        for _ in range(3):
            for sid in sids:
                r = append(proxy.url, sid, [1, 2, 3])
                assert r.status_code == 200, r.text  # never 503: each went to the replica holding the session
        owners = {sid: redis_server.client.get(f"infomamba:{{{sid}}}:lease").decode() for sid in sids}
        assert set(owners.values()) == {"a", "b"}
        route = "/v1/sessions/{sid}/append"
        assert counter(a.url, route) == 3 * list(owners.values()).count("a")
        assert counter(b.url, route) == 3 * list(owners.values()).count("b")
        # the websocket, by the id in its URL; and a new session over it is created where it is routed
        with InfoMambaClient(proxy.url) as client:
            with client.stream_session(session=sids[0]) as ws:
                assert ws.append(input_ids=[4, 5], outputs=[])["steps"] == 11
            with client.stream_session() as ws:
                ws.append(input_ids=[6, 7, 8], outputs=[])
                new = ws.id
        assert append(proxy.url, new, [9]).json()["steps"] == 4
        for _ in range(4):  # stateless: round robin
            forward_logits(proxy.url, [1, 2])
        assert counter(a.url, "/v1/forward") >= 1 and counter(b.url, "/v1/forward") >= 1
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def test_async_mode_answers_first_and_writes_right_after(store_url, redis_server):
    srv = replica(store_url, "a", state_store_mode="async").start()
    try:
        sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
        for _ in range(3):
            logits_of(append(srv.url, sid, [1, 2, 3, 4]))
        deadline = time.monotonic() + 5
        while redis_server.client.hget(f"infomamba:{{{sid}}}:state", "steps") != b"12":
            assert time.monotonic() < deadline, "the writes did not follow the answers"
            time.sleep(0.01)
    finally:
        srv.stop()
    assert redis_server.client.get(f"infomamba:{{{sid}}}:lease") is None  # a clean stop hands every lease back


def test_redis_down_fails_session_requests_clearly_and_keeps_serving_the_rest():
    store = RedisServer()
    srv = replica(store.url, "a").start()
    try:
        sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
        logits_of(append(srv.url, sid, [1, 2, 3]))
        store.stop()
        r = append(srv.url, sid, [4])
        assert r.status_code in (503, 507) and "state store" in r.json()["error"]["message"], r.text
        r = append(srv.url, "feedfacefeedface", [4])  # a session this replica would look up in the store
        assert r.status_code == 503 and r.json()["error"]["code"] == "state_store_unavailable", r.text
        assert "Retry-After" in r.headers
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200, ok.text
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and "state store" in health.json()["error"]["message"]
        store = RedisServer(port=store.port)  # back (empty: this one keeps nothing on disk)
        deadline = time.monotonic() + 10
        while (r := httpx.post(srv.url + "/v1/sessions", json={})).status_code != 201:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        logits_of(append(srv.url, r.json()["id"], [5, 6]))
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        srv.stop()
        store.stop()


def test_state_store_settings_are_checked_and_read_from_flags_and_env(monkeypatch):
    from clients.cli import build_parser
    from server.config import ServerConfig
    from server.engine.redis_store import redact

    with pytest.raises(ValueError, match="state_store"):
        ServerConfig(state_store="http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="state_store_mode"):
        ServerConfig(state_store="redis://127.0.0.1:6379/0", state_store_mode="eventually")
    assert ServerConfig(state_store="").state_store is None
    monkeypatch.setenv("INFOMAMBA_STATE_STORE", "rediss://:secret@cache:6380/2")
    args = build_parser().parse_args(["serve", "--state-store-mode", "async", "--state-lease-ttl", "3"])
    assert (args.state_store, args.state_store_mode, args.state_lease_ttl) == ("rediss://:secret@cache:6380/2",
                                                                               "async", 3.0)
    assert redact(args.state_store) == "rediss://:***@cache:6380/2"  # what /health and the logs show
