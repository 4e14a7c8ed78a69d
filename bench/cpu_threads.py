"""The served engine's torch threads on a CPU host: HTTP completions through `infomamba serve` (bundled model, one
frontend) with the engine at each --threads value, alternating, --repeats times. Prints generated tokens/s per run.

    python bench/cpu_threads.py --threads 1 2 --repeats 2      # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "def main():\n    ", "max_tokens": 32, "temperature": 0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def generated_tokens_per_s(url: str, clients: int, requests: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await client.post("/v1/completions", json=BODY)  # warm-up

        async def one_client():
            for _ in range(requests // clients):
                r = await client.post("/v1/completions", json=BODY)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return requests * BODY["max_tokens"] / (time.perf_counter() - t0)


def serve(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INFOMAMBA_TORCH_THREADS": str(threads)}
    env.pop("OMP_NUM_THREADS", None)  # the flag alone decides
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--port", str(port), "--log-level",
                             "warning", "--api-server-count", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    args = p.parse_args()
    for repeat in range(args.repeats):
        for threads in args.threads:
            proc, url = serve(threads)
            try:
                rate = asyncio.run(generated_tokens_per_s(url, args.clients, args.requests))
            finally:
                proc.terminate()
                proc.wait(60)
            print(f"run {repeat + 1}, {threads} torch thread(s): {rate:,.0f} generated tokens/s", flush=True)


if __name__ == "__main__":
    main()
