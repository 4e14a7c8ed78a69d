"""Where a model pass spends its host time (issue 10: the 2K prefill's GPU work is a fraction of its wall time).

    python3 bench/profile_host.py --tokens 2048 --concepts 16 [--decode]

Builds the 130M-class config (bf16, random weights) on the GPU, warms the pass up, times it, then runs it under
cProfile and prints the functions with the most time of their own and the most time in all, beside the GPU's busy
time for the same pass (the profiler's activities)."""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("INFOMAMBA_KERNELS", "triton")

from bench.bench_model import build, gpu_busy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--concepts", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    fields = dict(d_model=768, n_layers=args.layers, vocab_size=50280, d_state=16, d_conv=4, expand=2)
    model = build(fields, args.concepts, "cuda", torch.bfloat16)
    ids = torch.randint(0, 50280, (1, args.tokens), device="cuda")
    with torch.inference_mode():
        def run():
            model(ids)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        busy = gpu_busy(run)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.repeats):
            run()
        torch.cuda.synchronize()
        profile.disable()
    print(f"{torch.cuda.get_device_name()}: k = {args.concepts}, {args.tokens} tokens, {args.layers} layers; wall ms "
          f"{', '.join(f'{w * 1e3:.2f}' for w in walls)}; GPU busy {busy['busy_ms']:.2f} ms")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(args.top)
        print(f"## by {key} ({args.repeats} passes)")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-(args.top + 3) * 200:])


if __name__ == "__main__":
    main()
