"""Where a c = 1 request's time goes outside the engine: one client, one request at a time, against the real server
(`infomamba serve`, one frontend), with the engine's own time per request read from its /metrics around each probe.

    python bench/bench_hops.py --device cuda                     # the server as it is
    python bench/bench_hops.py --device cuda --variant base --variant spin:INFOMAMBA_ENGINE_SPIN_US=2000

Each --variant NAME[:KEY=VALUE,...] starts its own server with those environment variables; variants run in turn,
--rounds times over. Probes, in order, each --requests times (mean and p50 ms at the client):
- /ready: HTTP to the frontend and back (no engine);
- /health: HTTP plus one utility round trip to the engine process;
- completions of 1 and 32 tokens (48-id prompts, greedy, not streamed) and 32 streamed: the client's mean time
  against the engine's (arrival to finish, from its e2e histogram); the difference is the trip between them. For the
  streamed one, the first token's time too.
Also the CPU time of the frontend and the engine process per completion (from /proc). With --trace, the server
marks each completion's hops (server/hops.py) and each is timed: client -> frontend -> engine -> finish -> frontend
-> client, mean µs a hop."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import Server, engine_counters, process_cpu_seconds, progress, split_cpus  # noqa: E402

PROMPT_LEN = 48
# a completion's marks in the order it passes them (server/hops.py), between the client's send and receive
HOPS = ("fe.http_in", "fe.add_sent", "en.recv", "en.finish", "en.sent", "fe.finish_in", "fe.http_out")


def hop_times(directory: str, spans: list[tuple[int, int]]) -> dict[str, float]:
    """Mean µs of each hop over the client's (send, receive) spans (monotonic ns), from the server's mark files:
    the first mark of each name inside each span (one request at a time, so each span holds one request's)."""
    import bisect

    marks: dict[str, list[int]] = {name: [] for name in HOPS}
    for path in Path(directory).glob("hops-*.txt"):
        for line in path.read_text().splitlines():
            name, _, ns = line.partition(" ")
            if name in marks:
                marks[name].append(int(ns))
    for times in marks.values():
        times.sort()
    sums: dict[str, list[float]] = {}
    for start, end in spans:
        points = [("client sent", start)]
        for name in HOPS:
            times = marks[name]
            i = bisect.bisect_right(times, start)
            if i < len(times) and times[i] <= end:
                points.append((name, times[i]))
        points.append(("cl.recv", end))
        for (a, ta), (b, tb) in zip(points, points[1:]):
            sums.setdefault(f"{a} -> {b}", []).append((tb - ta) / 1e3)
    return {hop: statistics.fmean(v) for hop, v in sums.items() if len(v) >= len(spans) // 2}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, env


async def probe(url: str, requests: int, vocab: int, pids: dict[str, int], trace: str | None) -> dict[str, dict]:
    import aiohttp

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, PROMPT_LEN).tolist()
    results: dict[str, dict] = {}
    async with aiohttp.ClientSession(url) as session:
        async def timed(method: str, path: str, body: dict | None = None, stream: bool = False):
            t0 = time.perf_counter()
            first = None
            async with session.request(method, path, json=body) as response:
                if response.status != 200:
                    raise SystemExit(f"{path}: HTTP {response.status}: {await response.text()}")
                if stream:
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.perf_counter() - t0
                else:
                    await response.read()
            return time.perf_counter() - t0, first

        async def metrics() -> dict:
            async with session.get("/metrics") as response:
                return engine_counters(await response.text())

        for name, path in (("/ready", "/ready"), ("/health", "/health")):
            for _ in range(20):
                await timed("GET", path)
            times = [(await timed("GET", path))[0] for _ in range(requests)]
            results[name] = {"client": times}
        for name, tokens, stream in (("1 token", 1, False), ("32 tokens", 32, False), ("32 streamed", 32, True)):
            body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
            for _ in range(10):
                await timed("POST", "/v1/completions", body, stream)
            before, cpu0 = await metrics(), {k: process_cpu_seconds(p) for k, p in pids.items()}
            pairs, spans = [], []
            for _ in range(requests):
                t0 = time.monotonic_ns()
                pairs.append(await timed("POST", "/v1/completions", body, stream))
                spans.append((t0, time.monotonic_ns()))
            cpu1, after = {k: process_cpu_seconds(p) for k, p in pids.items()}, await metrics()
            d = {k: after[k] - before[k] for k in after}
            results[name] = {
                "client": [t for t, _ in pairs],
                "first": [f for _, f in pairs if f is not None],
                "engine_ms": 1e3 * d["e2e"] / d["requests"] if d["requests"] else None,
                "engine_first_ms": 1e3 * d["first"] / d["firsts"] if d["firsts"] else None,
                "cpu_ms": {k: 1e3 * (cpu1[k] - cpu0[k]) / requests for k in pids},
                "hops": hop_times(trace, spans) if trace else {},
            }
    return results


def report(name: str, results: dict[str, dict]) -> list[str]:
    lines = []
    for probe_name, r in results.items():
        client = 1e3 * statistics.fmean(r["client"])
        p50 = 1e3 * statistics.median(r["client"])
        text = f"  {name:<12} {probe_name:<12} client mean {client:7.3f} ms, p50 {p50:7.3f}"
        if r.get("engine_ms") is not None:
            text += f"; engine {r['engine_ms']:7.3f}: outside {client - r['engine_ms']:6.3f} ms"
        if r.get("first"):
            first, engine_first = 1e3 * statistics.fmean(r["first"]), r["engine_first_ms"]
            text += f"; first token {first:.3f} (engine {engine_first:.3f}): outside {first - engine_first:.3f}"
        if r.get("cpu_ms"):
            text += "; CPU ms a request: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["cpu_ms"].items()))
        lines.append(text)
        lines += [f"      {hop:<32} {us:9.1f} µs" for hop, us in r.get("hops", {}).items()]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME[:KEY=VALUE,...]: a server started with those environment variables (repeatable; "
                        "default: one, 'base', with none)")
    parser.add_argument("--server-cpus", type=int, default=-1,
                        help="CPUs for the server; this client gets the rest (default: half; 0: no split)")
    parser.add_argument("--trace", action="store_true", help="time each hop of the completions (server/hops.py)")
    args = parser.parse_args()
    from server.config import ServerConfig

    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    config = ServerConfig(device=args.device)
    server_cpus, client_cpus = split_cpus(args.server_cpus)
    lines = []
    for round_ in range(args.rounds):
        for name, env in variants:
            progress(f"round {round_ + 1}: {name} {json.dumps(env)}")
            trace = tempfile.mkdtemp(prefix="bench-hops-") if args.trace else None
            if trace:
                env = {**env, "INFOMAMBA_TRACE_HOPS": trace}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                server = Server(SimpleNamespace(model=args.model), config, 1, server_cpus)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            try:
                if client_cpus:
                    os.sched_setaffinity(0, client_cpus)
                vocab = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["config"]["vocab_size"]
                results = asyncio.run(probe(server.url, args.requests, vocab, server.children(), trace))
            finally:
                server.stop()
            lines += report(name, results)
            print("\n".join(report(name, results)), flush=True)
    print("\nsummary:\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
