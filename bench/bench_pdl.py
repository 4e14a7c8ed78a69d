"""Programmatic dependent launch (Hopper), measured on a chain of small dependent products under a CUDA graph: the
shape of a batch-1 decode step (each kernel reads its own weights and the previous kernel's output).

    python3 bench/bench_pdl.py --kernels 120 --n 1024 --k 1024

Three ways, same run: plain launches; PDL with the wait at the kernel's start; PDL with the weights loaded before
the wait (their loads overlap the previous kernel's tail and the launch)."""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODES = {0: "plain launches", 1: "PDL, wait first", 2: "PDL, weights before the wait"}


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, n, K: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    if MODE == 2:
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols < n)[:, None], other=0.0)
        gdc_wait()
        gdc_launch_dependents()
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    if MODE != 2:
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols < n)[:, None], other=0.0)
    x = tl.load(x_ptr + ks).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n)


def chain(xs, ws, mode: int, block_n: int):
    n, k = ws[0].shape
    for i, w in enumerate(ws):
        _gemv[(triton.cdiv(n, block_n),)](xs[i], w, xs[i + 1], n, K=k, BLOCK_N=block_n, MODE=mode,
                                          num_warps=4, launch_pdl=mode > 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kernels", type=int, default=120)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--block-n", type=int, default=4)
    p.add_argument("--replays", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    ws = [torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16) / args.k ** 0.5
          for _ in range(args.kernels)]
    xs = [torch.randn(args.k, device="cuda", dtype=torch.bfloat16) for _ in range(args.kernels + 1)]
    results = {}
    for mode in MODES:
        chain(xs, ws, mode, args.block_n)  # compile
        torch.cuda.synchronize()
        reference = xs[-1].clone() if mode == 0 else reference
        if mode:
            assert torch.equal(xs[-1], reference), f"{MODES[mode]} changed the result"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(xs, ws, mode, args.block_n)
        graph.replay()
        torch.cuda.synchronize()
        if mode:
            assert torch.equal(xs[-1], reference), f"{MODES[mode]} under a graph changed the result"
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.replays):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1000 / args.replays / args.kernels)
        results[mode] = best
    floor = args.n * args.k * 2 / 4.8e12 * 1e6
    print(f"{torch.cuda.get_device_name()}: {args.kernels} dependent products of {args.n} x {args.k} bf16, "
          f"block_n {args.block_n}; floor {floor:.2f} µs a product at 4.8 TB/s")
    for mode, us in results.items():
        print(f"  {MODES[mode]:32s} {us:6.2f} µs a product  ({results[0] / us:.2f}x plain)")


if __name__ == "__main__":
    main()
