"""The write-ahead log of session inputs. A recurrent state is a pure function of its last snapshot and the inputs
fed since, so an acknowledged append needs only its inputs on disk (a few bytes a step), not the whole state (KB to
MB a stream): one log record per answered request, all records of an engine step written with one fsync (group
commit). Recovery loads each session's snapshot and replays the records after it (bit-exact: one pass = chunks).

Segments are `wal-NNNNNNNN.log` files of records `[u32 length][msgpack LogRecord][u32 crc32]`. A crash can leave
a torn record only at the end of the newest segment; reading stops there. Rotation starts a new segment holding
every record not yet covered by a snapshot, then deletes the old segments."""
from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import msgspec
import numpy as np

log = logging.getLogger("infomamba.store")
SEGMENT_GLOB = "wal-*.log"
_encoder = msgspec.msgpack.Encoder()


class LogRecord(msgspec.Struct, array_like=True):
    session: str
    steps_before: int  # the session's step count before these inputs: records chain by it
    dtype: str  # numpy dtype string: "<i4" token ids, "<f4" float vectors
    shape: list[int]
    data: bytes
    seq: int | None = None  # the client's sequence number of the append (idempotent retries); last: older records
    # without it still decode

    @classmethod
    def of(cls, session: str, steps_before: int, inputs: np.ndarray, seq: int | None = None) -> "LogRecord":
        inputs = np.ascontiguousarray(inputs.astype("<i4") if inputs.dtype.kind in "iu" else inputs.astype("<f4"))
        return cls(session, steps_before, inputs.dtype.str, list(inputs.shape), inputs.tobytes(), seq)

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)

    @property
    def num_steps(self) -> int:
        return self.shape[0]


_decoder = msgspec.msgpack.Decoder(LogRecord)


def pack(record: LogRecord) -> bytes:
    """One record, unframed (a shared store keeps each as an element of a per-session list)."""
    return _encoder.encode(record)


def unpack(data: bytes) -> LogRecord:
    return _decoder.decode(data)


def encode(records: list[LogRecord]) -> bytearray:
    """Framed records, each encoded straight into the one buffer (a 64K-id frame's record is 256 KiB; this runs on
    the engine thread, so its inputs are copied once here, not once per framing step)."""
    out = bytearray()
    for record in records:
        at = len(out)
        out += b"\0\0\0\0"  # the payload's length, filled in below
        _encoder.encode_into(record, out, at + 4)
        n = len(out) - at - 4
        struct.pack_into("<I", out, at, n)
        with memoryview(out) as view:
            crc = zlib.crc32(view[at + 4:])
        out += struct.pack("<I", crc)
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(SEGMENT_GLOB))


def read_all(directory: Path) -> list[LogRecord]:
    """Every intact record, oldest first."""
    records = []
    for path in segments(directory):
        data = path.read_bytes()
        at = 0
        while at + 4 <= len(data):
            (n,) = struct.unpack_from("<I", data, at)
            payload = data[at + 4:at + 4 + n]
            if len(payload) < n or at + 8 + n > len(data) or \
                    struct.unpack_from("<I", data, at + 4 + n)[0] != zlib.crc32(payload):
                log.warning("%s: a torn or damaged record at byte %d; the records after it are ignored", path, at)
                break
            records.append(_decoder.decode(payload))
            at += 8 + n
    return records


class LogWriter:
    """Appends to the newest segment. Used by the store's writer thread only."""

    def __init__(self, directory: Path):
        self.directory = directory
        existing = segments(directory)
        self.number = int(existing[-1].stem.split("-")[1]) if existing else 0
        self.size = 0
        self._file = None

    def append(self, data: bytes) -> None:
        if self._file is None:
            self._open(self.number if self.number else 1)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.size += len(data)

    def rotate(self, carried: bytes) -> None:
        """A new segment holding `carried` (the records no snapshot covers yet); then the old ones go."""
        old = segments(self.directory)
        self.close()
        self._open(self.number + 1)
        self.append(carried)
        fsync_dir(self.directory)
        for path in old:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, number: int) -> None:
        self.number = number
        path = self.directory / f"wal-{number:08d}.log"
        self._file = open(path, "ab")
        self.size = self._file.tell()
        fsync_dir(self.directory)


def fsync_dir(directory: Path) -> None:
    """A rename or a new file is durable only once its directory is."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
