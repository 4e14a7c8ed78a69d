"""The few-row products of a decode step (kernels/small_linear.py) against cuBLAS, and a sweep of their launch
configurations (issue 10).

    python bench/bench_small_linear.py [--batches 1 2 4 8 16 32] [--json out.json]
    python bench/bench_small_linear.py --tiny     # CPU, Triton interpreter: checks that every part runs

For each product of the 130M-class model (k = 0 and k = 16) and of the bundled model, at each row count: cuBLAS
(F.linear; for the products behind a norm, the add_rms_norm kernel and F.linear, as the model ran them before), the
Triton kernel at its default configuration and at the fastest of the sweep, and the floor (the weight's bytes over
the card's bandwidth). Each figure is the median of graph replays that call the op on 16 copies of the weights in
turn, so the weights come from memory as in a real step, not from L2 (the 24 layers' weights do not fit in it).
The last table says, per row count, which configuration to make the default and whether the kernel beats cuBLAS
(SMALL_LINEAR_MAX_BATCH).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

TINY = "--tiny" in sys.argv
if TINY:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels._triton import next_power_of_2  # noqa: E402
from kernels.add_rms_norm import add_rms_norm  # noqa: E402
from kernels.small_linear import LinearConfig, add_rms_norm_linear, default_config, linear  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
COPIES = 16  # weight copies cycled through per timing: 16 x 4.7 MB is past the H200's 50 MB of L2

# (name, N, K, behind a norm): 130M-class in_proj / out_proj, its k = 16 concept layer's first and last products,
# and the bundled model's (d_model 280)
SHAPES = [("130M in_proj", 3072, 768, True), ("130M out_proj", 768, 1536, False),
          ("130M k16 first", 3664, 768, True), ("130M k16 last", 768, 1728, False),
          ("bundled in_proj", 1120, 280, True), ("bundled out_proj", 280, 560, False)]
TINY_SHAPES = [("tiny first", 40, 24, True), ("tiny last", 24, 40, False)]


def sweep_configs(batch: int, k: int) -> list[LinearConfig]:
    """The configurations timed at `batch` rows and K = k: broadcast products of up to 4 rows a program (the whole K
    in one block among them: one wave of loads, no loop), tensor-core tiles of 16 rows."""
    whole = next_power_of_2(k)
    configs = []
    for block_b in (1, 2, 4):
        if block_b > max(batch, 1) * 2 or (batch > 4 and block_b < 4):
            continue
        for block_n, block_k, warps in ((4, 256, 2), (8, 256, 4), (16, 128, 4), (16, 512, 8), (2, whole, 2),
                                        (4, whole, 4), (8, whole, 4), (8, whole, 8), (16, whole, 8)):
            if block_b * block_n * block_k <= 16384:  # past that the broadcast product spills
                configs.append(LinearConfig(block_b, block_n, block_k, warps, 3))
    if batch >= 3:
        for block_n, block_k, warps, stages in ((16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (32, 64, 2, 4),
                                                (64, 128, 4, 3)):
            configs.append(LinearConfig(16, block_n, block_k, warps, stages))
    return configs


def graph_time(fn, cuda: bool, reps: int = 20) -> float:
    """Seconds per call of fn(i) for i in range(COPIES), from CUDA-graph replays (the wall clock on the CPU)."""
    import time

    if not cuda:
        t0 = time.perf_counter()
        for i in range(2):
            fn(i)
        return (time.perf_counter() - t0) / 2
    for i in range(COPIES):  # compile and warm up outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(COPIES):
                fn(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / COPIES)
    return statistics.median(times)


def bench_shape(name, n, k, norm, batches, device, dtype, cuda, peak):
    g = torch.Generator().manual_seed(n + k)
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype) for _ in range(COPIES if cuda else 1)]
    norm_weight = (1 + 0.1 * torch.randn(k, generator=g)).to(device, dtype)
    floor = n * k * dtype.itemsize / peak
    rows = []
    for batch in batches:
        x = torch.randn(batch, k, generator=g).to(device, dtype)
        residual = torch.randn(batch, k, generator=g).to(device)

        def ours(config):
            if norm:
                return lambda i: add_rms_norm_linear(x, residual, norm_weight, 1e-5, weights[i % len(weights)],
                                                     config=config)
            return lambda i: linear(x, weights[i % len(weights)], config=config)

        if norm:
            def cublas(i):
                h, _ = add_rms_norm(x, residual, norm_weight, 1e-5)
                return F.linear(h, weights[i % len(weights)])
        else:
            def cublas(i):
                return F.linear(x, weights[i % len(weights)])

        with torch.inference_mode():
            t_cublas = graph_time(cublas, cuda)
            default = default_config(batch, n, k)
            t_default = graph_time(ours(default), cuda)
            timed = [(graph_time(ours(c), cuda), c) for c in (sweep_configs(batch, k) if cuda else [default])]
        t_best, best = min(timed, key=lambda tc: tc[0])
        row = dict(shape=name, n=n, k=k, norm=norm, batch=batch, cublas_us=t_cublas * 1e6,
                   default_us=t_default * 1e6, default=str(default), best_us=t_best * 1e6, best=str(best),
                   floor_us=floor * 1e6, swept=len(timed))
        rows.append(row)
        print(f"{name:17s} batch {batch:3d}: cuBLAS {row['cublas_us']:6.2f} µs, default {row['default_us']:6.2f}, "
              f"best {row['best_us']:6.2f} ({best}), floor {row['floor_us']:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny sizes (a smoke run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("bench_small_linear.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    card = torch.cuda.get_device_name() if cuda else "cpu (tiny, interpreter)"
    peak = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in card), 3.35e12)
    print(f"# {card}; torch {torch.__version__}; {dtype}; weights cycled over {COPIES} copies", flush=True)
    rows = []
    for name, n, k, norm in (SHAPES if cuda else TINY_SHAPES):
        rows += bench_shape(name, n, k, norm, args.batches if cuda else [1, 3], device, dtype, cuda, peak)
    print(f"\n### {card}: few-row products, µs a call (median of graph replays)\n")
    print("| product | batch | cuBLAS (+ norm kernel) | ours, default | ours, best | best config | cuBLAS / best | "
          "best / floor |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['cublas_us']:.2f} | {r['default_us']:.2f} | {r['best_us']:.2f} | "
              f"{r['best']} | {r['cublas_us'] / r['best_us']:.2f} | {r['best_us'] / r['floor_us']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
