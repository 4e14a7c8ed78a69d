"""The engine's socket (server/engine/transport.py): frames split anywhere arrive whole, sends never block the
engine's loop (a message larger than the socket's buffer is finished as the frontend reads), and each side learns
when the other goes away."""
from __future__ import annotations

import asyncio
import os
import random
import threading

from server.engine.transport import HEADER, EngineListener, FrameReader, connect


def test_frames_split_at_any_byte_come_out_whole_and_in_order():
    rng = random.Random(0)
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 3, 100, 5000]))) for _ in range(60)]
    stream = b"".join(HEADER.pack(len(p)) + p for p in payloads)
    reader, out, pos = FrameReader(), [], 0
    while pos < len(stream):
        step = rng.choice([1, 2, 5, 17, 4096])
        out += reader.feed(stream[pos:pos + step])
        pos += step
    assert out == payloads


def serve(listener: EngineListener, stop: threading.Event, echoes: list) -> None:
    """An engine loop in miniature: names each connection by its first frame, echoes every later one back."""
    while not stop.is_set():
        frames, _ = listener.poll(10)
        for conn, payload in frames:
            if conn.client is None:
                listener.name(conn, payload.decode())
            else:
                echoes.append(len(payload))
                listener.send(conn.client, payload)


def test_messages_both_ways_a_large_one_included_and_the_engine_going_away(tmp_path):
    address = f"ipc://{tmp_path}/engine"
    listener = EngineListener(address)
    stop, echoes = threading.Event(), []
    thread = threading.Thread(target=serve, args=(listener, stop, echoes), daemon=True)
    thread.start()
    big = os.urandom(8 << 20)  # far past a Unix socket's buffer: the engine's send must queue the rest
    got, lost = [], asyncio.Event()

    async def frontend():
        done = asyncio.Event()

        def on_frame(payload):
            got.append(payload)
            if len(got) == 3:
                done.set()

        protocol = await connect(address, on_frame, lost.set)
        for payload in (b"frontend-1", b"small", big, b"after"):
            protocol.send(payload)
        await asyncio.wait_for(done.wait(), 30)
        stop.set()
        thread.join(10)
        listener.close()
        await asyncio.wait_for(lost.wait(), 10)  # the engine's side closed: the frontend hears it at once

    asyncio.run(frontend())
    assert got == [b"small", big, b"after"]
    assert echoes == [5, len(big), 5]
    assert lost.is_set()


def test_a_frontend_that_starts_first_connects_once_the_engine_listens(tmp_path):
    address = f"ipc://{tmp_path}/engine"
    holder: list[EngineListener] = []

    async def frontend():
        pending = asyncio.create_task(connect(address, lambda _: None, lambda: None, retry_s=0.01))
        await asyncio.sleep(0.1)
        assert not pending.done()  # nobody listens yet
        holder.append(EngineListener(address))
        protocol = await asyncio.wait_for(pending, 10)
        protocol.send(b"hello")
        for _ in range(100):
            frames, _ = holder[0].poll(10)
            if frames:
                return frames
            await asyncio.sleep(0)
        raise AssertionError("the engine never saw the frame")

    frames = asyncio.run(frontend())
    assert [payload for _, payload in frames] == [b"hello"]
    holder[0].close()
    assert not os.path.exists(f"{tmp_path}/engine")


def test_the_engine_drops_a_frontend_that_went_away_and_keeps_serving_the_others(tmp_path):
    address = f"ipc://{tmp_path}/engine"
    listener = EngineListener(address)

    async def frontends():
        first = await connect(address, lambda _: None, lambda: None)
        second_got = []
        second = await connect(address, second_got.append, lambda: None)
        first.send(b"a")
        second.send(b"b")
        named = 0
        while named < 2:
            frames, _ = listener.poll(10)
            for conn, payload in frames:
                listener.name(conn, payload.decode())
                named += 1
            await asyncio.sleep(0)
        first.transport.close()
        for _ in range(100):  # the engine notices the closed socket on its next polls
            listener.poll(10)
            await asyncio.sleep(0)
            if "a" not in listener.clients:
                break
        listener.send("a", b"to nobody")  # dropped, no error
        listener.send("b", b"still here")
        for _ in range(100):
            listener.poll(1)
            await asyncio.sleep(0.001)
            if second_got:
                break
        return second_got

    assert asyncio.run(frontends()) == [b"still here"]
    assert set(listener.clients) == {"b"}
    listener.close()


def test_a_traced_completion_passes_every_hop_in_order(lm_server, tmp_path):
    """server/hops.py, as bench/bench_hops.py --trace reads it: one completion through the real server marks each
    hop once, in the order it passes them (the engine thread and uvicorn share this process, so one file)."""
    import httpx

    from server import hops

    hops.trace_to(str(tmp_path))
    try:
        response = httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4,
                                                                       "temperature": 0}, timeout=30)
    finally:
        hops.trace_to(None)
    assert response.status_code == 200, response.text
    (path,) = tmp_path.glob("hops-*.txt")
    names = [line.split()[0] for line in path.read_text().splitlines()]
    assert names == ["fe.http_in", "fe.add_sent", "en.recv", "en.finish", "en.sent", "fe.finish_in", "fe.http_out"]
    times = [int(line.split()[1]) for line in path.read_text().splitlines()]
    assert times == sorted(times)
