"""What permessage-deflate costs a websocket client that sends frames of token ids (issue 14's long append).

    python bench/bench_ws_compression.py [--frames 64] [--ids 65536]

One process: a websockets server that answers each frame with a short text frame, and a client that sends binary
int32 frames of --ids random ids below --vocab (as bench_server's long append sends), one at a time, first with the library's default (permessage-deflate offered
and accepted), then without. Prints ids/s and the process's CPU ms per frame (both ends, so an upper bound on the
client's share); a profile shows where the deflate run's time goes. The server's `--ws-compression` (off by
default) decides whether `infomamba serve` accepts the offer.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import numpy as np


async def run(frames: int, ids: int, vocab: int, compression) -> tuple[float, float]:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def answer(ws):
        async for _ in ws:
            await ws.send('{"type":"outputs"}')

    kwargs = {} if compression == "deflate" else {"compression": None}
    async with serve(answer, "127.0.0.1", 0, max_size=None, **kwargs) as server:
        port = server.sockets[0].getsockname()[1]
        frame = np.random.default_rng(0).integers(0, vocab, ids).astype("<i4").tobytes()
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, ping_interval=None, **kwargs) as ws:
            t0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(frames):
                await ws.send(frame)
                await ws.recv()
            return frames * ids / (time.perf_counter() - t0), 1e3 * (time.process_time() - cpu0) / frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--ids", type=int, default=65536)
    p.add_argument("--vocab", type=int, default=260, help="the bundled model's vocabulary")
    args = p.parse_args()
    for compression in ("deflate", "none", "deflate", "none"):
        rate, cpu_ms = asyncio.run(run(args.frames, args.ids, args.vocab, compression))
        print(f"{compression:8s} {rate / 1e6:6.2f}M ids/s   {cpu_ms:6.2f} ms CPU a frame (both ends)")
    profile = cProfile.Profile()
    profile.runcall(asyncio.run, run(args.frames, args.ids, args.vocab, "deflate"))
    pstats.Stats(profile).sort_stats("tottime").print_stats(3)


if __name__ == "__main__":
    main()
