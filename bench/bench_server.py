"""Load generator: completions over HTTP and appends over websockets at several concurrencies, beside the same
work driven through the engine directly (no HTTP), printing throughput, latency p50/p90/p99 and the ratio.

    .venv/bin/python bench/bench_server.py                      # the bundled default model
    .venv/bin/python bench/bench_server.py --model DIR --concurrency 1 8 32 --requests 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from server.config import ServerConfig  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.sequence import SamplingParams, Sequence  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(name, conc, n_steps, seconds, latencies):
    print(f"{name:<22} c={conc:<4} {n_steps / seconds:10.1f} steps/s   p50 {pct(latencies, .5) * 1e3:8.1f} ms   "
          f"p90 {pct(latencies, .9) * 1e3:8.1f} ms   p99 {pct(latencies, .99) * 1e3:8.1f} ms")
    return n_steps / seconds


async def http_completions(url, prompts, max_tokens, conc):
    sem = asyncio.Semaphore(conc)
    latencies = []

    async def one(client, prompt):
        async with sem:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=conc + 4)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, p) for p in prompts))
        return time.perf_counter() - t0, latencies


async def ws_appends(ws_url, prompts, conc, chunk):
    """conc websocket sessions, each appending its share of the prompts chunk by chunk."""
    latencies = []

    async def client(share):
        async with connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "open"}))
            sid = json.loads(await ws.recv())["session"]
            for prompt in share:
                for lo in range(0, len(prompt), chunk):
                    t0 = time.perf_counter()
                    await ws.send(json.dumps({"type": "append", "input_ids": prompt[lo:lo + chunk],
                                              "outputs": ["logprobs"]}))
                    frame = json.loads(await ws.recv())
                    assert frame["type"] == "outputs", frame
                    latencies.append(time.perf_counter() - t0)
            await ws.send(json.dumps({"type": "close", "delete": True}))
            return sid

    t0 = time.perf_counter()
    await asyncio.gather(*(client(prompts[i::conc]) for i in range(conc)))
    return time.perf_counter() - t0, latencies


def engine_direct(model, config, prompts, max_tokens, conc):
    """The same completions through a fresh Engine's own loop, conc in flight at a time."""
    engine = Engine(model, config.max_num_streams, config.max_num_batched_tokens, max_queue=10 ** 6)
    pending = list(prompts)
    live, latencies = {}, []
    t0 = time.perf_counter()

    def submit():
        prompt = pending.pop()
        seq = Sequence(torch.tensor(prompt), sampling=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     ignore_eos=True))
        started = time.perf_counter()
        seq.emit = lambda event, s=seq, t=started: (event[0] == "done" and (latencies.append(time.perf_counter() - t),
                                                                           live.pop(s.id)))
        live[seq.id] = seq
        engine.add(seq)

    while pending or live:
        while pending and len(live) < conc:
            submit()
        engine.step()
    return time.perf_counter() - t0, latencies


def start_server(args, config) -> tuple[subprocess.Popen, str]:
    """`infomamba serve` in its own process, so the load generator doesn't share its interpreter."""
    port = free_port()
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--port", str(port), "--device", config.device,
           "--max-num-streams", str(config.max_num_streams),
           "--max-num-batched-tokens", str(config.max_num_batched_tokens), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=16, help="websocket append chunk size")
    args = parser.parse_args()

    from server.serve import make_loader

    config = ServerConfig(device=args.device, max_num_streams=max(64, max(args.concurrency) * 2),
                          max_num_batched_tokens=max(2048, max(args.concurrency) * 2))
    model, _ = make_loader(config, args.model)()
    proc, url = start_server(args, config)
    ws_url = url.replace("http", "ws", 1) + "/v1/stream"
    rng = random.Random(0)
    vocab = min(model.config.vocab_size, 256)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.prompt_len // 2, args.prompt_len))]
               for _ in range(args.requests)]
    name = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    print(f"model {model.config.name}: d_model {model.config.d_model}, {model.config.n_layers} layers, "
          f"{name}; {args.requests} requests, prompt ~{args.prompt_len}, max_tokens {args.max_tokens}", flush=True)
    try:
        # Warm-up outside the timings: both processes compile their kernels for the shapes this load produces.
        asyncio.run(http_completions(url, prompts, args.max_tokens, max(args.concurrency)))
        engine_direct(model, config, prompts, args.max_tokens, max(args.concurrency))
        for conc in args.concurrency:
            steps = sum(len(p) for p in prompts) + args.requests * args.max_tokens
            secs, lat = asyncio.run(http_completions(url, prompts, args.max_tokens, conc))
            http_rate = report("http completions", conc, steps, secs, lat)
            secs, lat = engine_direct(model, config, prompts, args.max_tokens, conc)
            eng_rate = report("engine direct", conc, steps, secs, lat)
            secs, lat = asyncio.run(ws_appends(ws_url, prompts, conc, args.chunk))
            report("ws appends (per chunk)", conc, sum(len(p) for p in prompts), secs, lat)
            print(f"{'':<22} c={conc:<4} http / engine throughput ratio {http_rate / eng_rate:.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
