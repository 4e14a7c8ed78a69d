"""Timestamps of a request's hops, for finding where its time goes between the client and the engine (a diagnostic:
`bench/bench_hops.py --trace`). Off unless INFOMAMBA_TRACE_HOPS names a directory: then each process appends
`name time_ns` lines (CLOCK_MONOTONIC, which every process on the host shares) to its own file there. Off, a mark
costs one global read."""
from __future__ import annotations

import os
import time

_DIRECTORY = os.environ.get("INFOMAMBA_TRACE_HOPS") or None
_file = None


def enabled() -> bool:
    return _DIRECTORY is not None


def trace_to(directory: str | None) -> None:
    """Start marking into `directory` (None: stop), as INFOMAMBA_TRACE_HOPS does at import (tests)."""
    global _DIRECTORY, _file
    if _file is not None:
        _file.close()
    _DIRECTORY, _file = directory, None


def mark(name: str) -> None:
    """Record that `name` happened now (a no-op unless tracing)."""
    global _file
    if _DIRECTORY is None:
        return
    if _file is None:
        _file = open(os.path.join(_DIRECTORY, f"hops-{os.getpid()}.txt"), "a", buffering=1)
    _file.write(f"{name} {time.monotonic_ns()}\n")
