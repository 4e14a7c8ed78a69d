"""The frontends' side of the engine: asyncio, one PUSH socket to the engine and one PULL socket for its step
outputs. Each request gets a stream of RequestOutputs; each session operation or utility call a future.

Plain ZMQ sockets on the event loop, not zmq.asyncio: the PULL socket's file descriptor wakes a reader callback that
drains it, and sends never wait (the PUSH socket queues without limit, as the engine's output sockets do).
zmq.asyncio puts futures and callbacks on every message both ways: on the dev VM a round trip to the engine process
took 248-299 µs (p50) this way against 316-412 through it (`bench/bench_engine_roundtrip.py`)."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from pathlib import Path

import zmq

from server.engine.protocol import (Abort, Add, EngineInfo, Error, Hello, Reply, RequestOutput, SessionOp, Utility,
                                    child_rid, output_decoder, request_encoder)

log = logging.getLogger("infomamba.frontend")
LIVENESS_INTERVAL = 0.2  # seconds between checks that the engine process is alive

ENGINE_DEAD = Error("engine_unavailable", "the engine process has stopped; the server is restarting", None, 5)


class EngineDead(Exception):
    pass


def new_id() -> str:
    return uuid.uuid4().hex


class RequestStream:
    """One request's outputs in order; the last one has finish_reason or error set. Closing early aborts it.
    One task reads it. The outputs wait in a deque with one future to wake the reader: an asyncio.Queue's put and
    get cost several times more, and a frontend makes one of each per generated token."""

    def __init__(self, client: "EngineClient", rid: str):
        self.client = client
        self.rid = rid
        self.finished = False
        self._outputs: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, out: RequestOutput) -> None:
        """An output for this request (the client's listener hands them in as they come)."""
        self._outputs.append(out)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._outputs:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self):
        return self

    def has_ready(self) -> bool:
        """Whether an output is waiting: the next read returns at once."""
        return bool(self._outputs)

    async def peek(self) -> RequestOutput:
        """The next output, left in place (a streamed answer waits for it, so early errors get a status)."""
        if not self._outputs:
            await self._wait()
        return self._outputs[0]

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if not self._outputs:
            try:
                await self._wait()
            except BaseException:
                self.cancel()
                raise
        out = self._outputs.popleft()
        if out.finish_reason is not None or out.error is not None:
            self.finished = True
            self.client.streams.pop(self.rid, None)
        return out

    def abort(self) -> None:
        """Ask the engine to stop the request; its outputs keep coming, ending with finish_reason "cancelled"."""
        if not self.finished:
            self.client.send_nowait(Abort(self.client.id, self.rid))

    def cancel(self) -> None:
        """Stop the request (the engine finishes it between two steps); its outputs are dropped from now on."""
        if not self.finished:
            self.finished = True
            self.client.streams.pop(self.rid, None)
            self.client.send_nowait(Abort(self.client.id, self.rid))


class EngineClient:
    def __init__(self, input_address: str, ipc_dir: str):
        self.id = new_id()
        self.input_address = input_address
        self.output_path = Path(ipc_dir) / f"out-{self.id[:12]}"
        self.info: EngineInfo | None = None
        self.ready = asyncio.Event()
        self.dead = False
        self.streams: dict[str, RequestStream] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._pull = self._ctx.socket(zmq.PULL)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._pull.bind(f"ipc://{self.output_path}")
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)  # queue rather than wait: a send never holds up the event loop
        self._push.connect(self.input_address)
        asyncio.get_running_loop().add_reader(self._pull.getsockopt(zmq.FD), self._receive)
        self._tasks.append(asyncio.create_task(self._watch()))
        self._send(Hello(self.id, f"ipc://{self.output_path}"))
        self._receive()  # the descriptor signals edges: take anything that came before the reader was added

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        asyncio.get_running_loop().remove_reader(self._pull.getsockopt(zmq.FD))
        self._ctx.destroy(linger=0)
        self.output_path.unlink(missing_ok=True)

    # -- requests ------------------------------------------------------------------------------------------

    async def add(self, request: Add) -> RequestStream:
        return (await self.add_samples(request))[0]

    async def add_samples(self, request: Add) -> list[RequestStream]:
        """The streams of an Add's request.n samples, registered before it is sent."""
        self._check_alive()
        streams = []
        for i in range(request.n):
            rid = child_rid(request.rid, i)
            streams.append(RequestStream(self, rid))
            self.streams[rid] = streams[-1]
        self._send(request)
        return streams

    def new_add(self, **fields) -> Add:
        return Add(client=self.id, rid=new_id(), **fields)

    async def session_op(self, op: str, session: str | None = None, snapshot: bytes | None = None,
                         wait_if_busy: bool = False, new_session: str | None = None) -> Reply:
        return await self._call(SessionOp(self.id, new_id(), op, session, snapshot, wait_if_busy, new_session))

    async def utility(self, name: str) -> Reply:
        return await self._call(Utility(self.id, new_id(), name))

    async def _call(self, message) -> Reply:
        self._check_alive()
        future = self.pending[message.rid] = asyncio.get_running_loop().create_future()
        try:
            self._send(message)
            return await future
        finally:
            self.pending.pop(message.rid, None)

    def send_nowait(self, message) -> None:
        if not self.dead:
            self._send(message)

    def _send(self, message) -> None:
        self._push.send(request_encoder.encode(message), zmq.NOBLOCK, copy=False)

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDead()

    # -- background --------------------------------------------------------------------------------------------

    def _receive(self) -> None:
        """Every step output waiting on the PULL socket, handed to its streams and futures (the event loop calls this
        when the socket's descriptor signals; it signals edges, so this reads until nothing is left)."""
        pull = self._pull
        while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frame = pull.recv(zmq.NOBLOCK, copy=False)
            try:
                self._dispatch(output_decoder.decode(frame.buffer))
            except Exception:  # one bad message must not stop the frontend from hearing the engine
                log.exception("dropped an engine message that could not be handled")

    def _dispatch(self, step) -> None:
        if step.welcome is not None:
            self.info = step.welcome
            self.ready.set()
        for out in step.request_outputs():
            stream = self.streams.get(out.rid)
            if stream is not None:
                stream.put(out)
        for reply in step.replies:
            future = self.pending.get(reply.rid)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _watch(self) -> None:
        """Fail everything at once when the engine process dies (the launcher then restarts the server)."""
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            if self.info is not None and not process_alive(self.info.pid):
                log.error("the engine process (pid %d) has stopped", self.info.pid)
                self.dead = True
                for stream in list(self.streams.values()):
                    stream.put(RequestOutput(stream.rid, error=ENGINE_DEAD))
                for future in self.pending.values():
                    if not future.done():
                        future.set_result(Reply("", ok=False, error=ENGINE_DEAD))
                return


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it counts as stopped)."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
