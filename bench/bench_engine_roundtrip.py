"""One frontend's round trip to the engine process and back, with no model work: a `stats` utility call through the
frontends' EngineClient (asyncio, a Unix socket, msgpack) to a real engine process on the bundled model, repeated. What
every request pays twice (its Add in, its answer out) on top of HTTP, and what a c = 1 client waits for.

    python bench/bench_engine_roundtrip.py [--calls 300] [--device cpu]

Dev VM (2 cores, CPU engine), p50 / mean µs of a round trip, three runs each, alternated: the EngineClient on
zmq.asyncio 316-412 / 330-469; on plain ZMQ sockets and an event-loop reader 248-299 / 259-311; on a Unix socket
without ZMQ (server/engine/transport.py, now) 121 / 131 (one run).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import ServerConfig  # noqa: E402


def run_engine(address: str, state_dir: str, device: str) -> None:
    from server.engine.process import engine_main

    engine_main(ServerConfig(device=device), None, address, state_dir, "warning")


async def round_trips(address: str, calls: int) -> list[float]:
    from server.engine.client import EngineClient

    client = EngineClient(address)
    await client.start()
    await asyncio.wait_for(client.ready.wait(), 600)
    for _ in range(20):  # warm-up
        await client.utility("stats")
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await client.utility("stats")
        times.append(time.perf_counter() - t0)
    await client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--device", default="cpu", help="the engine's device (the model does no work here)")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-roundtrip-")
    address = f"ipc://{directory}/engine"
    engine = mp.get_context("spawn").Process(target=run_engine, args=(address, directory + "/state", args.device))
    engine.start()
    try:
        times = asyncio.run(round_trips(address, args.calls))
    finally:
        engine.terminate()
        engine.join()
    print(f"engine round trip ({args.calls} calls): p50 {1e6 * statistics.median(times):.0f} µs, "
          f"mean {1e6 * statistics.fmean(times):.0f} µs, p99 {1e6 * sorted(times)[int(0.99 * len(times))]:.0f} µs")


if __name__ == "__main__":
    main()
