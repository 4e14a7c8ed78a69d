"""The HTTP load generator's own cost: CPU seconds per completed request of bench_server's client loop
(http_client), through httpx and through aiohttp, plain and streaming (SSE). One client process runs
--concurrency closed-loop clients, as one of bench_server's load generators does, against the real frontend with
the engine faked (bench_edge's app under uvicorn in a child process: 32 tokens a completion, one SSE event each),
so the server is cheap and the figure is the client's: time.process_time() of this process per completed request.

    python bench/bench_http_client.py --concurrency 16        # also run with --concurrency 1 and 64

2-core dev VM, noisy (the server child, this client and other jobs share the 2 cores): client CPU µs per completed
request, best of 3 runs of 3 s, 48-id prompts, 32 tokens (httpx 0.28.1, aiohttp 3.14.5, Python 3.11, asyncio loop):

    c    library   plain     SSE
    1    httpx     1,969    3,980
         aiohttp     478    2,324
    16   httpx     4,063    5,716
         aiohttp     426    1,820
    64   httpx    18,113   21,964
         aiohttp     426    1,918

httpx's cost grows with the clients sharing its pool: on every request httpcore's pool walks all its connections
(ConnectionPool._assign_requests_to_connections, is_idle / has_expired on each; 4.4 of 5.8 profiled seconds at
c = 64). bench_server runs c / 8 clients in each of its 8 load generators: 32 at c = 256.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_edge import PROMPT, serve_child  # noqa: E402
from bench_server import HTTP_CLIENTS, http_client  # noqa: E402


async def measure(library: str, url: str, stream: bool, concurrency: int, seconds: float) -> tuple[float, float]:
    """(CPU µs per completed request, requests/s) of `concurrency` clients for `seconds`, after 0.5 s of warm-up."""
    async with HTTP_CLIENTS[library](url, concurrency + 4) as client:
        for length in (0.5, seconds):
            tally = {"lat": [], "ttft": [], "steps": 0}
            cpu, start, deadline = time.process_time(), time.perf_counter(), time.time() + length
            await asyncio.gather(*(http_client(client, [PROMPT], 32, stream, deadline, tally)
                                   for _ in range(concurrency)))
        done = len(tally["lat"])
        return (time.process_time() - cpu) / done * 1e6, done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--libraries", nargs="+", default=list(HTTP_CLIENTS), choices=list(HTTP_CLIENTS))
    args = p.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = multiprocessing.get_context("spawn").Process(target=serve_child, args=(port, False), daemon=True)
    child.start()
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        runs: dict = {}
        for _ in range(args.repeats):  # the libraries take turns, so that a noisy spell falls on each alike
            for stream in (False, True):
                for library in args.libraries:
                    runs.setdefault((library, stream), []).append(
                        asyncio.run(measure(library, f"http://127.0.0.1:{port}", stream, args.concurrency,
                                            args.seconds)))
        print(f"client CPU µs per completed request (best of {args.repeats}; all), requests/s of that run; "
              f"c = {args.concurrency}, {args.seconds:g} s a run")
        for (library, stream), results in runs.items():
            best = min(results)
            print(f"  {library:<8} {'SSE' if stream else 'plain':<6} {best[0]:7.0f} µs "
                  f"({' '.join(f'{r[0]:.0f}' for r in results)})   {best[1]:6.0f} requests/s", flush=True)
    finally:
        child.terminate()
        child.join()


if __name__ == "__main__":
    main()
