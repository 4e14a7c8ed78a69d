"""The wire between the engine process and its frontends: one Unix stream socket per frontend, carrying msgpack
messages in length-prefixed frames both ways (a 4-byte little-endian length, then the message).

Plain sockets, not ZMQ: a ZMQ message crosses two I/O threads (the sender's and the receiver's) before the
receiving thread sees it, and each wakes from sleep when traffic is sparse. On an H200 host, with one request at a
time, a request's hop from its frontend to the engine took 140-300 µs and its answer's hop back 170-310 µs that
way, against 60-80 µs for a hop whose threads were awake (`bench/bench_hops.py --trace`). Here the receiving
thread reads the socket itself: one wake-up a hop.

The engine side (EngineListener) is for a poll loop that must never wait on a frontend: its sends queue what the
socket does not take at once and finish when it drains. The frontend side (FrameProtocol) is an asyncio protocol."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import struct

log = logging.getLogger("infomamba.transport")
HEADER = struct.Struct("<I")
READ_SIZE = 1 << 20


def socket_path(address: str) -> str:
    """The socket's path from an `ipc://PATH` address (the form `infomamba serve` passes around)."""
    return address[len("ipc://"):] if address.startswith("ipc://") else address


def frame(payload: bytes) -> list[bytes]:
    return [HEADER.pack(len(payload)), payload]


class FrameReader:
    """Splits a byte stream into its frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames, pos, end = [], 0, len(buffer)
        with memoryview(buffer) as view:  # one copy a frame (a bytearray slice would copy once more)
            while end - pos >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer, pos)
                if end - pos - HEADER.size < size:
                    break
                frames.append(bytes(view[pos + HEADER.size:pos + HEADER.size + size]))
                pos += HEADER.size + size
        if pos:
            del buffer[:pos]  # (after the view is released: a bytearray with a view cannot resize)
        return frames


class Connection:
    """One frontend's socket, as the engine sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.pending = bytearray()  # what the socket has not taken yet
        self.client: str | None = None  # set by the frontend's Hello


class EngineListener:
    """The engine's end: accepts frontends, reads their frames, sends to them without ever blocking. `extra_fds`
    are polled too (a wake-up pipe): poll() reports which of them fired."""

    def __init__(self, address: str, extra_fds: tuple[int, ...] = ()) -> None:
        path = socket_path(address)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.path = path
        self.connections: dict[int, Connection] = {}
        self.clients: dict[str, Connection] = {}
        self.extra_fds = extra_fds
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)
        for fd in extra_fds:
            self._poller.register(fd, select.POLLIN)

    def poll(self, timeout_ms: int) -> tuple[list[tuple[Connection, bytes]], set[int]]:
        """Waits up to timeout_ms for something to happen; returns the frames that came (with their connection, in
        arrival order per connection) and the extra descriptors that fired. Also accepts new frontends and
        continues sends the sockets had no room for."""
        frames: list[tuple[Connection, bytes]] = []
        fired: set[int] = set()
        for fd, events in self._poller.poll(timeout_ms):
            if fd == self.sock.fileno():
                self._accept()
                continue
            conn = self.connections.get(fd)
            if conn is None:
                fired.add(fd)
                continue
            if events & select.POLLOUT:
                self._flush(conn)
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read(conn, frames)
        return frames, fired

    def name(self, conn: Connection, client: str) -> None:
        """conn belongs to `client` (its Hello said so): sends to that client go there."""
        old = self.clients.get(client)
        if old is not None and old is not conn:
            self._close(old)
        conn.client = client
        self.clients[client] = conn

    def send(self, client: str, payload: bytes) -> None:
        """Queue one message for `client` and send what the socket takes now (dropped if the client is gone)."""
        conn = self.clients.get(client)
        if conn is None:
            return
        if conn.pending:
            conn.pending += HEADER.pack(len(payload))
            conn.pending += payload
            return
        parts = frame(payload)
        total = HEADER.size + len(payload)
        try:
            sent = conn.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < total:
            conn.pending += b"".join(parts)[sent:]
            self._poller.modify(conn.sock.fileno(), select.POLLIN | select.POLLOUT)

    def flush(self, timeout_s: float) -> None:
        """Send what is queued, waiting up to timeout_s in all (at shutdown)."""
        import time

        deadline = time.monotonic() + timeout_s
        while any(c.pending for c in self.connections.values()) and time.monotonic() < deadline:
            self.poll(10)

    def close(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self.connections[sock.fileno()] = Connection(sock)
            self._poller.register(sock.fileno(), select.POLLIN)

    def _read(self, conn: Connection, frames: list) -> None:
        while True:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the frontend is gone
                self._close(conn)
                return
            frames.extend((conn, f) for f in conn.reader.feed(data))

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.pending[:sent]
        if not conn.pending:
            self._poller.modify(conn.sock.fileno(), select.POLLIN)

    def _close(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if self.connections.pop(fd, None) is not None:
            self._poller.unregister(fd)
        if conn.client is not None and self.clients.get(conn.client) is conn:
            del self.clients[conn.client]
        conn.sock.close()


class FrameProtocol(asyncio.Protocol):
    """The frontend's end: hands each frame to on_frame as it arrives, and calls on_lost once if the engine's
    socket closes."""

    def __init__(self, on_frame, on_lost) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for payload in self.reader.feed(data):
            self.on_frame(payload)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.on_lost()

    def send(self, payload: bytes) -> None:
        self.transport.writelines(frame(payload))


async def connect(address: str, on_frame, on_lost, retry_s: float = 0.05) -> FrameProtocol:
    """Connect to the engine's socket, retrying until it listens (it binds once its model is loaded)."""
    loop = asyncio.get_running_loop()
    path = socket_path(address)
    while True:
        try:
            _, protocol = await loop.create_unix_connection(lambda: FrameProtocol(on_frame, on_lost), path)
            return protocol
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("connecting to the engine at %s: %s; retrying", path, exc)
            await asyncio.sleep(retry_s)
