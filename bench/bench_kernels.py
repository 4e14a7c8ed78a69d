"""Kernels vs their PyTorch references at the 130M config (issue 3): time, GB/s, TFLOP/s, ratio to the memory floor.

    PYTHONUNBUFFERED=1 python3 bench/bench_kernels.py [--quick] [--sweep] [--json out.json]

Decode-step kernels at batch 1/64/256 (ours eager, ours under a CUDA graph, ref eager) and chunk kernels on one
sequence of 2K/32K/128K tokens. Times are CUDA-event medians after warm-up. Inputs are rotated over several
independent sets (one per "layer") so that repeated calls do not run out of L2. The memory floor is the fewest
bytes each op must move (every input read once, every output and state written once) over the card's HBM
bandwidth (H100 3.35 TB/s, H200 4.8 TB/s, datasheet); "x floor" = measured / floor.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import add_rms_norm as norm_mod  # noqa: E402
from kernels import causal_conv1d as conv_mod  # noqa: E402
from kernels import concept_filter as concept_mod  # noqa: E402
from kernels import concept_step as concept_step_mod  # noqa: E402
from kernels import mamba_step as mamba_step_mod  # noqa: E402
from kernels import selective_scan as scan_mod  # noqa: E402
from kernels import selective_state_update as update_mod  # noqa: E402

CFG = dict(d_model=768, d_inner=1536, d_state=16, d_conv=4, dt_rank=48, k=16, d_c=192)
DTYPE = torch.bfloat16
L2_BYTES = 50e6
DEV = "cuda"


def hbm_peak(name: str) -> float:
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 3.35e12
    return float("nan")


def measure_copy_bandwidth() -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_eager(fn, warmup=3, reps=20) -> float:
    """Median ms per call, CUDA events around each call."""
    if DEV == "cpu":  # --dry-run: check that every case builds and runs
        fn()
        return 1.0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_profiled(fn, reps=5):
    """GPU time per call from the profiler's kernel (and copy) records, without the host's launch overhead;
    also the per-kernel split. Used for chunk ops, whose launchers read cu_seqlens on the host."""
    if DEV == "cpu":
        fn()
        return 1.0, {}
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total, split = 0.0, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            total += us
            split[e.name] = split.get(e.name, 0.0) + us / reps
    return total / reps / 1e3, split


def time_graph(fns, reps=20) -> float:
    """Median ms per call of a CUDA graph replaying one call per input set (launch overhead removed)."""
    if DEV == "cpu":
        return 1.0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_eager(graph.replay, warmup=3, reps=reps) / len(fns)


def cycler(fns):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1
    return call


def num_sets(bytes_per_set: float) -> int:
    return max(1, min(8, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))))


def layer_weights():
    """One layer's parameters at the benchmark config: A, D, dt_bias, conv weight and bias, concept mix, norm."""
    E, N, K, k, D = (CFG[n] for n in ("d_inner", "d_state", "d_conv", "k", "d_model"))
    dev = DEV
    A = -torch.exp(torch.randn(E, N, device=dev) * 0.5)
    Dv, dt_bias = torch.randn(E, device=dev), torch.randn(E, device=dev) * 0.5 - 1
    w_conv, b_conv = torch.randn(E, K, device=dev, dtype=DTYPE) / 2, torch.randn(E, device=dev, dtype=DTYPE)
    mix = torch.eye(k, device=dev) + 0.1 * torch.randn(k, k, device=dev)
    w_norm = torch.ones(D, device=dev, dtype=DTYPE)
    return A, Dv, dt_bias, w_conv, b_conv, mix, w_norm


def concept_log_decay():
    """λ = log γ (k,) for concept_decay "learned" at its initial horizons (10^2..10^5 steps)."""
    from model.layers import initial_decay_logits  # noqa: E402  (only the init; the kernels never import model)
    return torch.nn.functional.logsigmoid(initial_decay_logits(CFG["k"])).to(DEV)


# --- decode-step ops -------------------------------------------------------------------------------------

def decode_cases(batch):
    E, N, K, k, dc, D = (CFG[n] for n in ("d_inner", "d_state", "d_conv", "k", "d_c", "d_model"))
    dev = DEV
    idx = torch.randperm(batch, device=dev).to(torch.int32)
    A, Dv, dt_bias, w_conv, b_conv, mix, w_norm = layer_weights()
    act = lambda *s: torch.randn(*s, device=dev, dtype=DTYPE)  # noqa: E731
    cases = {}

    def ssu(impl):
        def build():
            x, dt, z, B, C = act(batch, E), act(batch, E) - 1, act(batch, E), act(batch, N), act(batch, N)
            st = torch.randn(batch, E, N, device=dev)
            return lambda: impl(x, dt, A, B, C, Dv, z, dt_bias, st, idx)
        return build
    cases["selective_state_update"] = (
        ssu(update_mod.selective_state_update), ssu(update_mod.selective_state_update_ref),
        2 * batch * E * N * 4 + batch * (4 * E * 2 + 2 * N * 2) + E * N * 4 + 2 * E * 4,
        batch * E * N * 7 + batch * E * 4)

    def conv(impl):
        def build():
            x, st = act(batch, E), act(batch, E, K - 1)
            return lambda: impl(x, w_conv, b_conv, st, idx)
        return build
    cases["causal_conv1d_update"] = (
        conv(conv_mod.causal_conv1d_update), conv(conv_mod.causal_conv1d_update_ref),
        2 * batch * E * (K - 1) * 2 + 2 * batch * E * 2 + E * K * 2 + E * 2,
        batch * E * (2 * K + 4))

    def concept(impl, log_decay=None):
        def build():
            a = torch.softmax(torch.randn(batch, k, device=dev), -1).to(DTYPE)
            v = act(batch, dc)
            mean = torch.randn(batch, k, dc, device=dev)
            mass = torch.rand(batch, k, device=dev, dtype=torch.float64) * 100
            return lambda: impl(a, v, mix, mean, mass, idx, 1e-6, log_decay)
        return build
    for suffix, log_decay in (("", None), ("_decay", concept_log_decay())):
        cases["concept_filter_update" + suffix] = (
            concept(concept_mod.concept_filter_update, log_decay),
            concept(concept_mod.concept_filter_update_ref, log_decay),
            2 * batch * k * dc * 4 + 2 * batch * k * 8 + batch * (k * 2 + dc * 2 + dc * 4) + k * k * 4,
            batch * (k * dc * 4 + 2 * k * k + 2 * k * dc))

    R = CFG["dt_rank"]
    w_x, w_dt = act(R + 2 * N, E) * E ** -0.5, act(E, R) * R ** -0.5
    w_inject = act(2 * E, dc) * dc ** -0.5

    def mamba(impl, inject):
        def build():
            xz, conv_st, ssm_st = act(batch, 2 * E), act(batch, E, K - 1), torch.randn(batch, E, N, device=dev)
            extra = (act(batch, dc), w_inject) if inject else (None, None)
            return lambda: impl(xz, w_conv, b_conv, w_x, w_dt, dt_bias, A, Dv, conv_st, ssm_st, idx, *extra)
        return build
    for suffix, inject in (("", False), (" (injected)", True)):
        # the fused decode step between in_proj and out_proj; injected: with a concept layer's g_s ⊙ r
        cases["mamba_step" + suffix] = (
            mamba(mamba_step_mod.mamba_step, inject), mamba(mamba_step_mod.mamba_step_ref, inject),
            2 * batch * E * N * 4 + 2 * batch * E * (K - 1) * 2 + batch * 3 * E * 2 + (R + 2 * N) * E * 2
            + E * R * 2 + E * N * 4 + E * (K + 4) * 4 + (batch * dc * 2 + 2 * E * dc * 2 if inject else 0),
            batch * E * (2 * (R + 2 * N) + 2 * R + 7 * N + 2 * K + 8 + (4 * dc if inject else 0)))
    w_gate, w_norm_c = act(2 * dc, dc) * dc ** -0.5, torch.ones(dc, device=dev, dtype=DTYPE)

    def concept_fused(impl, log_decay=None):
        def build():
            pre = act(batch, k + 3 * dc)
            mean = torch.randn(batch, k, dc, device=dev)
            mass = torch.rand(batch, k, device=dev, dtype=torch.float64) * 100
            return lambda: impl(pre[:, :k], pre[:, k:k + dc], pre[:, k + dc:], mix, w_norm_c, w_gate, mean, mass, idx,
                                1e-6, 1e-5, log_decay)
        return build
    for suffix, log_decay in (("", None), ("_decay", concept_log_decay())):
        # the whole concept decode step: softmax, update, read-back, norm + GELU, both gates
        cases["concept_step" + suffix] = (
            concept_fused(concept_step_mod.concept_step, log_decay),
            concept_fused(concept_step_mod.concept_step_ref, log_decay),
            2 * batch * k * dc * 4 + 2 * batch * k * 8 + batch * (k + 3 * dc) * 2 + 2 * batch * dc * 2
            + 2 * dc * dc * 2 + k * k * 4 + dc * 2,
            batch * (k * dc * 6 + 2 * k * k + 4 * dc * dc + 12 * dc))

    def norm(impl):
        def build():
            x, res = act(batch, D), torch.randn(batch, D, device=dev)
            return lambda: impl(x, res, w_norm, 1e-5)
        return build
    cases["add_rms_norm"] = (
        norm(norm_mod.add_rms_norm), norm(norm_mod.add_rms_norm_ref),
        batch * D * (2 + 4 + 2 + 4) + D * 2, batch * D * 5)
    return cases


# --- chunk ops (one sequence of L tokens) -----------------------------------------------------------------

def chunk_cases(L, scan_kwargs=None):
    E, N, K, k, dc, D = (CFG[n] for n in ("d_inner", "d_state", "d_conv", "k", "d_c", "d_model"))
    dev = DEV
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    idx = torch.zeros(1, dtype=torch.int32, device=dev)
    A, Dv, dt_bias, w_conv, b_conv, mix, w_norm = layer_weights()
    act = lambda *s: torch.randn(*s, device=dev, dtype=DTYPE)  # noqa: E731
    cases = {}

    def scan(impl, **kw):
        def build():
            x, dt, z, B, C = act(L, E), act(L, E) - 1, act(L, E), act(L, N), act(L, N)
            st = torch.randn(1, E, N, device=dev)
            return lambda: impl(x, dt, A, B, C, Dv, z, dt_bias, st, cu, idx, **kw)
        return build
    fast_scan = scan_mod._selective_scan if scan_kwargs else scan_mod.selective_scan
    cases["selective_scan"] = (
        scan(fast_scan, **(scan_kwargs or {})), scan(scan_mod.selective_scan_ref),
        L * (4 * E * 2 + 2 * N * 2) + 2 * E * N * 4 + E * N * 4,
        L * E * N * 7 + L * E * 8)

    def conv(impl):
        def build():
            x, st = act(L, E), act(1, E, K - 1)
            return lambda: impl(x, w_conv, b_conv, st, cu, idx)
        return build
    cases["causal_conv1d"] = (conv(conv_mod.causal_conv1d), conv(conv_mod.causal_conv1d_ref),
                              2 * L * E * 2 + E * K * 2, L * E * (2 * K + 4))

    def concept(impl, log_decay=None):
        def build():
            a = torch.softmax(torch.randn(L, k, device=dev), -1).to(DTYPE)
            v = act(L, dc)
            mean = torch.randn(1, k, dc, device=dev)
            mass = torch.rand(1, k, device=dev, dtype=torch.float64) * 100
            return lambda: impl(a, v, mix, mean, mass, cu, idx, 1e-6, log_decay)
        return build
    T = 64  # the kernel's chunk: flops it does (a@M, carried, scores, local, chunk sums)
    for suffix, log_decay in (("", None), ("_decay", concept_log_decay())):
        # with decay the (T, T) scores are k decayed outer products rather than one product (and k T^2 exps)
        cases["concept_filter" + suffix] = (
            concept(concept_mod.concept_filter, log_decay), concept(concept_mod.concept_filter_ref, log_decay),
            L * (k * 2 + dc * 2 + dc * 4) + 2 * k * dc * 4,
            L * 2 * (k * k + k * dc + T * k + T * dc + k * dc))

    def norm(impl):
        def build():
            x, res = act(L, D), torch.randn(L, D, device=dev)
            return lambda: impl(x, res, w_norm, 1e-5)
        return build
    cases["add_rms_norm"] = (norm(norm_mod.add_rms_norm), norm(norm_mod.add_rms_norm_ref),
                             L * D * (2 + 4 + 2 + 4) + D * 2, L * D * 5)
    return cases


def run_case(name, size, build_ours, build_ref, nbytes, flops, peak, graph, ref_reps, reps=20):
    sets = num_sets(nbytes)
    ours = [build_ours() for _ in range(sets)]
    row = dict(op=name, size=size, bytes=nbytes, flops=flops, floor_us=nbytes / peak * 1e6)
    row["ours_us"] = time_eager(cycler(ours), reps=reps) * 1e3
    row["ours_graph_us"] = time_graph(ours) * 1e3 if graph else None
    row["ours_gpu_us"], row["split_us"] = (None, {}) if graph else (lambda t: (t[0] * 1e3, t[1]))(
        time_profiled(cycler(ours)))
    del ours
    if ref_reps:
        ref = [build_ref() for _ in range(min(sets, ref_reps))]
        row["ref_us"] = time_eager(cycler(ref), warmup=1, reps=ref_reps) * 1e3
        del ref
    else:
        row["ref_us"] = None
    best = row["ours_graph_us"] if graph else row["ours_gpu_us"]  # GPU time, launch overhead excluded
    row["GBps"] = nbytes / (best * 1e-6) / 1e9
    row["TFLOPs"] = flops / (best * 1e-6) / 1e12
    row["x_floor"] = best / row["floor_us"]
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    head = ("| op | size | ours wall µs | ours GPU µs | ref wall µs | speedup (wall) | GB/s | TFLOP/s | floor µs "
            "| x floor |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(head)
    for r in rows:
        gpu = r["ours_graph_us"] if r["ours_graph_us"] is not None else r["ours_gpu_us"]
        tag = " (graph)" if r["ours_graph_us"] is not None else ""
        speed = None if r["ref_us"] is None else r["ref_us"] / r["ours_us"]
        print(f"| {r['op']} | {r['size']} | {fmt(r['ours_us'], '.1f')} | {fmt(gpu, '.1f')}{tag} | "
              f"{fmt(r['ref_us'], '.1f')} | {fmt(speed, '.1f')} | {r['GBps']:.0f} | {r['TFLOPs']:.2f} | "
              f"{r['floor_us']:.1f} | {r['x_floor']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2K and 32K only")
    parser.add_argument("--sweep", action="store_true", help="selective_scan variants at 32K first")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: smoke test")
    args = parser.parse_args()
    global DEV
    torch.manual_seed(0)
    if args.dry_run:
        DEV = "cpu"
        CFG.update(d_model=24, d_inner=16, d_state=4, k=3, d_c=16)
        name, peak, copy_bw = "cpu (dry run)", 1e11, 1e11
    else:
        name = torch.cuda.get_device_name()
        peak = hbm_peak(name)
        copy_bw = measure_copy_bandwidth()
    print(f"card: {name}; datasheet HBM {peak / 1e12:.2f} TB/s; measured 1 GiB copy {copy_bw / 1e12:.2f} TB/s; "
          f"torch {torch.__version__}; triton {__import__('triton').__version__}", flush=True)
    rows, sweep, scan_kwargs = [], [], None
    if args.sweep:
        L = 100 if args.dry_run else 32768
        for token_loop, chunk, bd, warps in [(False, 64, 64, 4), (True, 64, 32, 1), (True, 128, 32, 1),
                                             (True, 128, 32, 2), (True, 256, 32, 1), (True, 128, 16, 1)]:
            kw = dict(token_loop=token_loop, chunk_size=chunk, block_d=bd, num_warps=warps)
            ours, _, nbytes, flops = chunk_cases(L, kw)["selective_scan"]
            r = run_case("selective_scan " + json.dumps(kw), L, ours, None, nbytes, flops, peak, False, 0, reps=5)
            r["kwargs"] = kw
            sweep.append(r)
            split = ", ".join(f"{k[:28]} {v:.0f}" for k, v in sorted(r["split_us"].items(), key=lambda kv: -kv[1]))
            print(f"sweep {kw}: GPU {r['ours_gpu_us']:.1f} us ({r['x_floor']:.2f} x floor), wall "
                  f"{r['ours_us']:.1f} us; {split}", flush=True)
        scan_kwargs = min(sweep, key=lambda r: r["ours_gpu_us"])["kwargs"]
        print(f"selective_scan rows below use the sweep's best: {scan_kwargs}", flush=True)
        for batch in (64, 256):
            for bd, warps in [(16, 1), (32, 1), (64, 2), (64, 4)]:
                impl = lambda *a, bd=bd, warps=warps: update_mod._selective_state_update(  # noqa: E731
                    *a, block_d=bd, num_warps=warps)
                saved = update_mod.selective_state_update
                update_mod.selective_state_update = impl
                ours, _, nbytes, flops = decode_cases(batch)["selective_state_update"]
                update_mod.selective_state_update = saved
                r = run_case("selective_state_update", batch, ours, None, nbytes, flops, peak, True, 0)
                sweep.append(dict(r, kwargs=dict(block_d=bd, num_warps=warps)))
                print(f"sweep selective_state_update batch {batch} block_d {bd} warps {warps}: "
                      f"graph {r['ours_graph_us']:.2f} us ({r['x_floor']:.2f} x floor)", flush=True)
    for batch in (1, 3) if args.dry_run else (1, 64, 256):
        for op, (ours, ref, nbytes, flops) in decode_cases(batch).items():
            rows.append(run_case(op, f"batch {batch}", ours, ref, nbytes, flops, peak, True, 10))
            print_table(rows[-1:])
    lengths = (2048, 32768) if args.quick else (2048, 32768, 131072)
    for L in (40, 130) if args.dry_run else lengths:
        for op, (ours, ref, nbytes, flops) in chunk_cases(L, scan_kwargs).items():
            # the scan ref steps token by token from Python (~0.1 ms a token): sampled once at 32K, skipped at 128K
            ref_reps = 3 if L <= 2048 else 1
            if op == "selective_scan" and L > 32768:
                ref_reps = 0
            if op.startswith("concept_filter") and L > 32768:  # the ref loops over 64-token chunks from Python
                ref_reps = 0
            rows.append(run_case(op, f"{L // 1024}K tokens", ours, ref, nbytes, flops, peak, False, ref_reps,
                                 reps=20 if L <= 32768 else 10))
            print_table(rows[-1:])
            print("  GPU split (µs/call):", ", ".join(f"{k[:40]} {v:.1f}" for k, v in rows[-1]["split_us"].items()))
    print("\nwall = CUDA events around an eager call (host launch overhead included); GPU = CUDA-graph replay "
          "(decode) or profiler kernel time (chunk ops); GB/s, TFLOP/s, x floor from GPU time")
    print(f"card: {name}; floor from datasheet {peak / 1e12:.2f} TB/s (measured copy {copy_bw / 1e12:.2f} TB/s)")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=name, copy_Bps=copy_bw, rows=rows, sweep=sweep), indent=1))


if __name__ == "__main__":
    main()
