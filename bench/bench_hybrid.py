"""Hybrid models beside the pure model (issue 11): a 130M-class MambaFormer-style hybrid (d_model 768, 24 layers,
every 6th layer attention over a 4096-step window) against the pure InfoMamba of the same 24 layers, and the
attention layers' cost as the window grows from 1K to 64K steps.

    python bench/bench_hybrid.py [--concepts 16] [--attention-every 6] [--window 4096] [--kv-heads 12]
    python bench/bench_hybrid.py --tiny     # toy sizes on the CPU: checks that every case runs (times mean nothing)

Table 1, whole models (bf16, Triton kernels; decode under CUDA graphs): parameters, state bytes per stream, decode
ms/step at batch 1/64/256 with every stream past its window (the rings full, so the attention reads all W keys),
prefill tokens/s of one fresh stream of 2K/8K/32K tokens.
Table 2, per window W: the hybrid's state bytes per stream, whole-model decode ms/step at batch 1 and 64, and one
attention layer alone: its decode op at batch 1/64/256 (us, and the HBM bandwidth it reaches reading the rings:
batch x 2 x kv heads x W x d_head x 2 bytes) and its chunk op on 8K tokens continuing a full ring (ms, TFLOP/s of
its two matrix products: 4 x tokens x W x heads x d_head). A pool that would not fit in 60% of free memory is
skipped. CUDA-event medians after warm-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import bandwidth, time_cuda, use_kernels  # noqa: E402
from kernels import ops  # noqa: E402
from model.config import InfoMambaConfig  # noqa: E402
from model.infomamba import InfoMamba  # noqa: E402
from model.state import state_nbytes_per_stream  # noqa: E402

FULL = dict(d_model=768, n_layers=24, vocab_size=50280, batch_sizes=(1, 64, 256), lengths=(2048, 8192, 32768),
            windows=(1024, 2048, 4096, 8192, 16384, 32768, 65536), window_batches=(1, 64), kernel_batches=(1, 64, 256),
            kernel_tokens=8192)
TINY = dict(d_model=32, n_layers=3, vocab_size=260, batch_sizes=(1, 4), lengths=(16, 40), windows=(8, 32),
            window_batches=(1, 4), kernel_batches=(1, 4), kernel_tokens=24)


def layer_list(n_layers: int, every: int, window: int, n_heads: int, n_kv_heads: int) -> list[dict] | None:
    """Layer i is attention when i % every == every - 1 (a recurrent layer first, as MambaFormer orders them)."""
    if every <= 0:
        return None
    return [{"type": "attention", "n_heads": n_heads, "n_kv_heads": n_kv_heads, "attention_window": window}
            if i % every == every - 1 else {"type": "infomamba"} for i in range(n_layers)]


def build(sizes, args, window: int | None, device, dtype) -> InfoMamba:
    layers = layer_list(sizes["n_layers"], args.attention_every, window, args.heads, args.kv_heads) if window else None
    config = InfoMambaConfig(d_model=sizes["d_model"], n_layers=0 if layers else sizes["n_layers"],
                             vocab_size=sizes["vocab_size"], n_concepts=args.concepts, layers=layers,
                             name=f"bench-{'hybrid-w' + str(window) if window else 'pure'}")
    torch.manual_seed(0)
    return InfoMamba(config).to(device=device, dtype=dtype).eval()


def timer(device):
    """seconds per call: CUDA-event medians on a GPU, a wall-clock median on the CPU (--tiny)."""
    if device == "cuda":
        return time_cuda

    def once(fn, **_):  # --tiny checks that each case runs; once is enough
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return once


def fits(nbytes: int, device) -> bool:
    if device != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return nbytes <= 0.6 * free


def decode_ms(model, batch: int, device, seen: int) -> float | None:
    """ms per decode step of `batch` streams that have each seen `seen` steps (their rings full when seen >= W)."""
    per_stream = state_nbytes_per_stream(model.config, model.dtype)
    if not fits(batch * per_stream, device):
        return None
    pool = model.empty_state(batch)
    pool.steps.fill_(seen)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    slots = torch.arange(batch, dtype=torch.int32, device=device)
    if device == "cuda":
        from server.engine.cuda_graphs import CudaGraphDecoder

        decoder = CudaGraphDecoder(model, pool, batch_sizes=(batch,))
        sec = time_cuda(lambda: decoder(tokens, slots), iters=50)
        del decoder
    else:
        with torch.inference_mode():
            sec = timer(device)(lambda: model.decode_step(tokens, pool, slots))
    del pool
    return sec * 1e3


def prefill_tokens_per_s(model, length: int, device) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def run():
        with torch.inference_mode():
            model(ids)
    return length / timer(device)(run, warmup=1, iters=3)


def whole_models(sizes, args, device, dtype) -> list[str]:
    lines = ["| model | params | state bytes/stream | " + " | ".join(f"decode ms, batch {b}" for b in sizes["batch_sizes"])
             + " | " + " | ".join(f"prefill tok/s, {n}" for n in sizes["lengths"]) + " |",
             "| --- | ---: | ---: |" + " ---: |" * (len(sizes["batch_sizes"]) + len(sizes["lengths"]))]
    for window in (None, args.window):
        model = build(sizes, args, window, device, dtype)
        name = f"hybrid, 1 attention in {args.attention_every}, W {window}" if window else "pure InfoMamba"
        seen = 2 * (window or 1)
        decode = [decode_ms(model, b, device, seen) for b in sizes["batch_sizes"]]
        prefill = [prefill_tokens_per_s(model, n, device) for n in sizes["lengths"]]
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"| {name} (k={args.concepts}) | {params / 1e6:.2f}M | "
                     f"{state_nbytes_per_stream(model.config, model.dtype):,} | "
                     + " | ".join(_ms(ms) for ms in decode) + " | " + " | ".join(f"{r:,.0f}" for r in prefill) + " |")
        print(lines[-1], flush=True)
        del model
        _empty_cache(device)
    return lines


def attention_op_times(sizes, args, window: int, device, dtype, floor_bw: float) -> list[str]:
    """One attention layer's ops alone: decode at each batch, the chunk op on kernel_tokens tokens."""
    d_head = sizes["d_model"] // args.heads
    cells = []
    for batch in sizes["kernel_batches"]:
        ring_bytes = 2 * batch * args.kv_heads * window * d_head * torch.finfo(dtype).bits // 8
        if not fits(ring_bytes, device):
            cells.append("n/a")
            continue
        rings = [torch.randn(batch, args.kv_heads, window, d_head, device=device, dtype=dtype) for _ in range(2)]
        steps = torch.full((batch,), 3 * window, dtype=torch.int64, device=device)  # full, wrapped rings
        q = torch.randn(batch, args.heads, d_head, device=device, dtype=dtype)
        k, v = (torch.randn(batch, args.kv_heads, d_head, device=device, dtype=dtype) for _ in range(2))
        slots = torch.arange(batch, dtype=torch.int32, device=device)
        with torch.inference_mode():
            sec = timer(device)(lambda: ops.window_attention_update(q, k, v, *rings, steps, slots, d_head ** -0.5))
        cells.append(f"{sec * 1e6:,.0f} us ({ring_bytes / sec / 1e9:,.0f} GB/s, {ring_bytes / floor_bw / sec:.2f} of peak)")
        del rings
    n = sizes["kernel_tokens"]
    rings = [torch.randn(1, args.kv_heads, window, d_head, device=device, dtype=dtype) for _ in range(2)]
    steps = torch.full((1,), 3 * window, dtype=torch.int64, device=device)
    q = torch.randn(n, args.heads, d_head, device=device, dtype=dtype)
    k, v = (torch.randn(n, args.kv_heads, d_head, device=device, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    slots = torch.zeros(1, dtype=torch.int32, device=device)
    with torch.inference_mode():
        sec = timer(device)(lambda: ops.window_attention(q, k, v, *rings, steps, cu, slots, d_head ** -0.5))
    flops = 4 * n * window * args.heads * d_head
    cells.append(f"{sec * 1e3:,.2f} ms ({flops / sec / 1e12:,.1f} TFLOP/s)")
    return cells


def window_sweep(sizes, args, device, dtype, floor_bw: float) -> list[str]:
    lines = ["| W | hybrid state bytes/stream | " + " | ".join(f"model decode ms, batch {b}" for b in sizes["window_batches"])
             + " | " + " | ".join(f"attention decode op, batch {b}" for b in sizes["kernel_batches"])
             + f" | attention chunk op, {sizes['kernel_tokens']} tokens |",
             "| ---: | ---: |" + " ---: |" * (len(sizes["window_batches"]) + len(sizes["kernel_batches"]) + 1)]
    for window in sizes["windows"]:
        model = build(sizes, args, window, device, dtype)
        decode = [decode_ms(model, b, device, 2 * window) for b in sizes["window_batches"]]
        state = state_nbytes_per_stream(model.config, model.dtype)
        del model
        _empty_cache(device)
        ops_cells = attention_op_times(sizes, args, window, device, dtype, floor_bw)
        lines.append(f"| {window:,} | {state:,} | " + " | ".join(_ms(ms) for ms in decode) + " | "
                     + " | ".join(ops_cells) + " |")
        print(lines[-1], flush=True)
        _empty_cache(device)
    return lines


def _ms(ms: float | None) -> str:
    return "n/a (pool too large)" if ms is None else f"{ms:.3f}"


def _empty_cache(device) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=16, help="k of the recurrent layers (0: plain Mamba layers)")
    p.add_argument("--attention-every", type=int, default=6, help="one attention layer in this many")
    p.add_argument("--window", type=int, default=4096, help="the hybrid's attention window in table 1")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12, help="fewer than --heads: grouped-query attention")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, to check that the script runs")
    return p.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    if args.tiny:
        sizes, device, dtype = TINY, "cpu", torch.float32
        args.heads, args.kv_heads, args.attention_every = min(args.heads, 4), min(args.kv_heads, 2), 3
        args.window = min(args.window, 16)
    elif torch.cuda.is_available():
        sizes, device, dtype = FULL, "cuda", torch.bfloat16
        use_kernels("triton")
    else:
        sys.exit("bench_hybrid.py needs a CUDA GPU (or --tiny)")
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (--tiny: times mean nothing)"
    print(f"# {card}; d_model {sizes['d_model']}, {sizes['n_layers']} layers, k={args.concepts}, "
          f"{args.heads} heads on {args.kv_heads} key/value heads, {dtype}", flush=True)
    lines = whole_models(sizes, args, device, dtype)
    print()
    lines += [""] + window_sweep(sizes, args, device, dtype, bandwidth(card))
    print("\n" + "\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
