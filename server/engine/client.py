"""The frontends' side of the engine: asyncio, one Unix socket to the engine (server/engine/transport.py) carrying
requests one way and step outputs the other. Each request gets a stream of RequestOutputs; each session operation
or utility call a future. Sends never wait: the event loop's transport queues what the socket does not take."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque

from server import hops
from server.engine.protocol import (Abort, Add, EngineInfo, Error, Hello, Reply, RequestOutput, SessionOp, Utility,
                                    child_rid, output_decoder, request_encoder)
from server.engine.transport import FrameProtocol, connect

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

    async def ready(self) -> list[RequestOutput]:
        """Every output waiting now, waiting for one if none is; [] once the stream has ended. A reader that fell
        behind its engine takes the backlog at once, and one that keeps up wakes through one frame fewer."""
        if self.finished:
            return []
        try:
            while not self._outputs:  # _wait's loop, inlined: one frame fewer to resume a token
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        except BaseException:
            self.cancel()
            raise
        finally:
            self._waiter = None
        outs = list(self._outputs)
        self._outputs.clear()
        last = outs[-1]
        if last.finish_reason is not None or last.error is not None:
            self.finished = True
            self.client.streams.pop(self.rid, None)
        return outs

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
    def __init__(self, input_address: str):
        """input_address: the engine's socket (ipc://PATH)."""
        self.id = new_id()
        self.input_address = input_address
        self.info: EngineInfo | None = None
        self.ready = asyncio.Event()
        self.dead = False
        self.streams: dict[str, RequestStream] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self._protocol: FrameProtocol | None = None
        self._unsent: list[bytes] | None = []  # sent before the socket connected; None once it has
        self._closing = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect in the background (the engine listens once its model is loaded) and introduce this frontend."""
        self._tasks.append(asyncio.create_task(self._connect()))
        self._tasks.append(asyncio.create_task(self._watch()))
        self._send(Hello(self.id))

    async def _connect(self) -> None:
        protocol = await connect(self.input_address, self._receive, self._lost)
        unsent, self._unsent, self._protocol = self._unsent, None, protocol
        for payload in unsent:
            protocol.send(payload)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()

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
        payload = request_encoder.encode(message)
        if hops.enabled() and isinstance(message, Add):
            hops.mark("fe.add_sent")  # handed to the socket (marked first: the engine may read it at once)
        if self._protocol is not None:
            if self._protocol.transport is not None:  # else the engine is gone: _lost fails what waits
                self._protocol.send(payload)
        elif self._unsent is not None:
            self._unsent.append(payload)

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDead()

    # -- background --------------------------------------------------------------------------------------------

    def _receive(self, payload: bytes) -> None:
        """One step's outputs from the engine, handed to their streams and futures."""
        try:
            self._dispatch(output_decoder.decode(payload))
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
                if out.finish_reason is not None and hops.enabled():
                    hops.mark("fe.finish_in")
        for reply in step.replies:
            future = self.pending.get(reply.rid)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _watch(self) -> None:
        """Fail everything at once when the engine process dies (the launcher then restarts the server); its
        socket closing says so sooner (_lost)."""
        while not self.dead:
            await asyncio.sleep(LIVENESS_INTERVAL)
            if self.info is not None and not process_alive(self.info.pid):
                log.error("the engine process (pid %d) has stopped", self.info.pid)
                self._fail_all()

    def _lost(self) -> None:
        if not self._closing and not self.dead:
            log.error("the engine closed its socket")
            self._fail_all()

    def _fail_all(self) -> None:
        self.dead = True
        for stream in list(self.streams.values()):
            stream.put(RequestOutput(stream.rid, error=ENGINE_DEAD))
        for future in self.pending.values():
            if not future.done():
                future.set_result(Reply("", ok=False, error=ENGINE_DEAD))


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
