"""The frontend alone: µs of CPU per request of the hot routes, driven through the ASGI app in this process with
the engine faked (it answers every request at once with one output per generated token, as engine steps would).
No sockets, no HTTP parsing: what is measured is the app (middleware, routing, validation, generation, framing).

    python bench/bench_edge.py                      # every case, 2000 requests each
    python bench/bench_edge.py --cases completions-sse --requests 5000 --profile /tmp/edge.prof
    python bench/bench_edge.py --server --concurrency 16     # through uvicorn: the server process's CPU per request
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.config import InfoMambaConfig  # noqa: E402
from model.tokenizer import ByteTokenizer  # noqa: E402
from server.api import app as app_module  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.client import RequestStream  # noqa: E402
from server.engine.protocol import Add, EngineInfo, Reply, RequestOutput  # noqa: E402

CONFIG = InfoMambaConfig(d_model=32, n_layers=2, vocab_size=260, n_concepts=4, d_state=8, name="tiny-lm")


class FakeEngine:
    """EngineClient's surface as the routes use it; every Add is answered at once, one output per token."""

    def __init__(self, *args):
        self.id = "fake"
        self.info = EngineInfo(pid=0, model_name="tiny-lm", config=CONFIG.to_dict(), fingerprint="f", model_dir=None,
                               state_bytes_per_stream=0, num_slots=1024, kernels="none")
        self.ready = asyncio.Event()
        self.ready.set()
        self.dead = False
        self.streams: dict[str, RequestStream] = {}
        self.count = 0

    async def start(self):
        pass

    async def close(self):
        pass

    def new_add(self, **fields) -> Add:
        self.count += 1
        return Add(client=self.id, rid=str(self.count), **fields)

    async def add_samples(self, request: Add) -> list[RequestStream]:
        stream = RequestStream(self, request.rid)
        self.streams[request.rid] = stream
        put = stream.put if hasattr(stream, "put") else stream.queue.put_nowait  # (older RequestStreams)
        if request.sampling is None:  # an append: the outputs asked, one step's rows, then the finish
            n = request.inputs.shape[0]
            outputs = {k: _array(n, 260) for k in request.outputs}
            put(RequestOutput(request.rid, outputs=outputs, finish_reason="done", steps=n,
                                                  num_prompt=n))
            return [stream]
        m, loop = request.sampling.max_tokens, asyncio.get_running_loop()
        final_only = getattr(request, "final_only", False)

        def step(i: int) -> None:  # one token per loop turn, as one engine step's outputs would come
            last = i == m - 1
            if last or not final_only:  # final_only: the engine sends every token with the finish alone
                ids = [65 + j % 26 for j in range(m)] if final_only else [65 + i % 26]
                put(RequestOutput(request.rid, token_ids=ids, finish_reason="length" if last else None,
                                  steps=request.inputs.shape[0] + m if last else None))
            if not last:
                loop.call_soon(step, i + 1)
        loop.call_soon(step, 0)
        return [stream]

    async def session_op(self, op, session=None, snapshot=None, wait_if_busy=False, new_session=None) -> Reply:
        return Reply("x", session=session or "s", steps=0)

    def send_nowait(self, message) -> None:
        pass


def _array(rows: int, width: int):
    import numpy as np
    from server.engine.protocol import Array
    return Array.of(np.zeros((rows, width), dtype=np.float32))


PROMPT = list(range(40, 88))  # 48 ids, as bench_server's prompts
CASES = {
    "completions": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}),
    "completions-sse": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
                                            "stream": True}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 32,
                                      "temperature": 0}),
    "chat-sse": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 32,
                                          "temperature": 0, "stream": True}),
    "append": ("/v1/sessions/s1/append", {"input_ids": list(range(16)), "outputs": []}),
    "completions-1tok": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}),
    "ws-append": ("/v1/stream", None),  # appends of 16 ids over one websocket, 100 frames pipelined
}


async def call(app, path: str, body: bytes) -> tuple[int, int]:
    """One request through the ASGI app as uvicorn (httptools) would make it; returns (status, body bytes)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "scheme": "http", "method": "POST",
             "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())], "state": {}}
    sent = [False]
    never = asyncio.get_running_loop().create_future()
    got = {"status": 0, "n": 0}

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            got["status"] = message["status"]
        elif message["type"] == "http.response.body":
            got["n"] += len(message.get("body", b""))

    await app(scope, receive, send)
    never.cancel()
    return got["status"], got["n"]


async def websocket(app, frames: list[str]) -> int:
    """One /v1/stream connection that sends every frame at once (pipelined) and then closes; returns the frames
    answered."""
    scope = {"type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "scheme": "ws", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": "",
             "path": "/v1/stream", "raw_path": b"/v1/stream", "query_string": b"", "headers": [], "subprotocols": [],
             "state": {}}
    incoming = [{"type": "websocket.connect"}] + [{"type": "websocket.receive", "text": f} for f in frames]
    incoming.append({"type": "websocket.receive", "text": '{"type": "close"}'})
    incoming.reverse()
    answered = 0

    async def receive():
        if incoming:
            return incoming.pop()
        await asyncio.get_running_loop().create_future()

    async def send(message):
        nonlocal answered
        answered += message["type"] == "websocket.send"

    await app(scope, receive, send)
    return answered


WS_FRAMES = ['{"type": "open"}'] + [orjson.dumps({"type": "append", "input_ids": list(range(16)), "outputs": []}
                                                  ).decode()] * 100


async def run_case(app, name: str, requests: int, profile: cProfile.Profile | None) -> float:
    if name == "ws-append":  # per frame, 100 appends a connection
        connections = max(1, requests // 100)
        await websocket(app, WS_FRAMES)
        if profile is not None:
            profile.enable()
        start = time.process_time()
        for _ in range(connections):
            if await websocket(app, WS_FRAMES) != len(WS_FRAMES):
                raise RuntimeError("ws-append: frames unanswered")
        seconds = time.process_time() - start
        if profile is not None:
            profile.disable()
        return seconds / (connections * 100) * 1e6
    path, body = CASES[name]
    raw = orjson.dumps(body)
    for _ in range(200):  # warm up
        status, _ = await call(app, path, raw)
        if status != 200:
            raise RuntimeError(f"{name}: status {status}")
    if profile is not None:
        profile.enable()
    start = time.process_time()
    for _ in range(requests):
        await call(app, path, raw)
    seconds = time.process_time() - start
    if profile is not None:
        profile.disable()
    return seconds / requests * 1e6


def fake_app(port: int = 8000):
    """The frontend's app around FakeEngine, with a chat template; the Edge learns the model at startup."""
    app_module.EngineClient = FakeEngine
    config = ServerConfig(host="127.0.0.1", port=port, max_batch_sequences=1024)
    app = app_module.create_app(config, "ipc://unused", tokenizer=ByteTokenizer())
    template = tempfile.mkdtemp()
    Path(template, "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    app_module._learn_model = _learn_at_once(template)
    return app


def _learn_at_once(template: str):
    async def learn(edge) -> None:
        edge.engine.info.model_dir = template
        edge.welcome()
    return learn


async def main_async(args) -> None:
    app = fake_app()
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0)  # the lifespan's task learns the model
        for name in args.cases:
            runs = [await run_case(app, name, args.requests, None) for _ in range(args.repeats)]
            # Python function calls per request: a count that other load on the machine does not change
            counted = cProfile.Profile()
            await run_case(app, name, 200, counted)
            calls = pstats.Stats(counted).total_calls / 200
            print(f"{name:<18} {min(runs):8.1f} us/request (CPU, best of {args.repeats}; all: "
                  f"{' '.join(f'{r:.0f}' for r in runs)})  {calls:6.0f} Python calls/request", flush=True)
        if args.profile:
            profile = cProfile.Profile()
            for name in args.cases:
                await run_case(app, name, args.requests, profile)
            profile.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(45)


def serve_child(port: int, access_log: bool) -> None:
    import uvicorn
    uvicorn.run(fake_app(port), host="127.0.0.1", port=port, log_level="info" if access_log else "warning",
                access_log=access_log)


async def client(port: int, raw: bytes, count: int, is_stream: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode())
        if is_stream:  # chunked: read to the last chunk
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    writer.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_server(args) -> None:
    """CPU seconds of the uvicorn process per request, HTTP parsing and socket writes included."""
    import multiprocessing
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = multiprocessing.get_context("spawn").Process(target=serve_child, args=(port, args.access_log))
    child.start()
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.5)
        for name in args.cases:
            path, body = CASES[name]
            if body is None:
                continue  # (websocket cases run in process only)
            data = orjson.dumps(body)
            raw = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(data)}\r\n\r\n").encode() + data
            per_client = max(1, args.requests // args.concurrency)
            is_stream = bool(body.get("stream"))
            asyncio.run(client(port, raw, 50, is_stream))  # warm up
            runs = []
            for _ in range(args.repeats):
                before, start = cpu_seconds(child.pid), time.perf_counter()

                async def clients():
                    await asyncio.gather(*(client(port, raw, per_client, is_stream)
                                           for _ in range(args.concurrency)))
                asyncio.run(clients())
                n = per_client * args.concurrency
                runs.append(((cpu_seconds(child.pid) - before) / n * 1e6, n / (time.perf_counter() - start)))
            best = min(runs)
            print(f"{name:<18} {best[0]:8.1f} us/request server CPU (best of {args.repeats}; all: "
                  f"{' '.join(f'{r[0]:.0f}' for r in runs)}), {best[1]:7.0f} requests/s at c={args.concurrency}",
                  flush=True)
    finally:
        child.terminate()
        child.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", default=None, help="write cProfile stats of the measured requests here")
    p.add_argument("--server", action="store_true", help="through uvicorn in a child process (its CPU per request)")
    p.add_argument("--concurrency", type=int, default=16, help="with --server: keep-alive connections")
    p.add_argument("--access-log", action="store_true", help="with --server: uvicorn's access log on, as in serve")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.server:
        run_server(args)
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
