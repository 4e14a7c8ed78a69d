"""Whole-model benchmark for the 130M-class config: decode step and prefill, ours vs the PyTorch path (and
Hugging Face transformers' Mamba where installed), side by side in one run.

    python bench/bench_model.py [--layers 24] [--concepts 0] [--quick]

Reports ms per decode step (eager and CUDA graphs), prefill tokens/s, and the ratio to the memory floor
(bf16 weights read once per step, plus fp32 states in and out).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import InfoMambaConfig  # noqa: E402
from model.infomamba import InfoMamba  # noqa: E402
from model.state import state_nbytes_per_stream  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
BF16_DENSE_FLOPS = 989e12  # H100 and H200 SXM: the prefill floor is the matrix products at this rate


def bandwidth(name: str) -> float:
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), 3.35e12)


def time_cuda(fn, warmup=3, iters=20) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def use_kernels(choice: str) -> None:
    os.environ["INFOMAMBA_KERNELS"] = choice


def bench_decode(model, batch_sizes, floor_bw, rows):
    from server.engine.cuda_graphs import CudaGraphDecoder

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = state_nbytes_per_stream(model.config, model.dtype)
    pool = model.empty_state(max(batch_sizes))
    for bs in batch_sizes:
        tokens = torch.randint(0, model.config.vocab_size, (bs,), device="cuda")
        slots = torch.arange(bs, dtype=torch.int32, device="cuda")
        floor = (weight_bytes + 2 * bs * state_bytes) / floor_bw
        results = {}
        for choice in ("torch", "triton"):
            use_kernels(choice)
            with torch.inference_mode():
                results[choice] = time_cuda(lambda: model.decode_step(tokens, pool, slots), iters=10)
        use_kernels("triton")
        decoder = CudaGraphDecoder(model, pool, batch_sizes=(bs,))
        results["triton+graphs"] = time_cuda(lambda: decoder(tokens, slots), iters=50)
        del decoder
        for name, sec in results.items():
            rows.append(("decode", f"batch {bs}", name, sec * 1e3, bs / sec, floor / sec))


def bench_prefill(model, lengths, rows, skip_torch_above):
    flops_per_token = 2 * sum(p.numel() for p in model.parameters())  # every weight is used once per token
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        for choice in ("torch", "triton"):
            if choice == "torch" and n > skip_torch_above:
                continue
            use_kernels(choice)

            def run():
                with torch.inference_mode():
                    model(ids)

            sec = time_cuda(run, warmup=1, iters=3)
            rows.append(("prefill", f"{n} tokens", choice, sec * 1e3, n / sec,
                         n * flops_per_token / BF16_DENSE_FLOPS / sec))


def bench_hf(d_layers, rows, batch_sizes, lengths):
    try:
        import transformers
    except ImportError:
        return
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=d_layers, state_size=16)
    hf = transformers.MambaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    for n in lengths:
        ids = torch.randint(0, 50280, (1, n), device="cuda")
        with torch.inference_mode():
            sec = time_cuda(lambda: hf(ids, use_cache=False), warmup=1, iters=2)
        rows.append(("prefill", f"{n} tokens", "transformers", sec * 1e3, n / sec, float("nan")))
    del hf
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--concepts", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller lengths, for a smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_model.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    config = InfoMambaConfig(d_model=768, n_layers=args.layers, vocab_size=50280, d_state=16, d_conv=4, expand=2,
                             n_concepts=args.concepts, name="bench-130m")
    torch.manual_seed(0)
    model = InfoMamba(config).cuda().to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"# {name}; {params / 1e6:.1f}M params, {args.layers} layers, k={args.concepts}, bf16", flush=True)
    rows = []
    batch_sizes = (1, 64, 256)
    lengths = (2048, 8192) if args.quick else (2048, 32768, 131072)
    bench_decode(model, batch_sizes, bandwidth(name), rows)
    bench_prefill(model, lengths, rows, skip_torch_above=2048)
    if args.concepts == 0:
        bench_hf(args.layers, rows, batch_sizes, lengths[:1])
    print("| kind | size | path | ms | items/s | floor/time |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for kind, size, path, ms, rate, ratio in rows:
        print(f"| {kind} | {size} | {path} | {ms:.3f} | {rate:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
