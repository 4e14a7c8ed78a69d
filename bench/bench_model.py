"""Whole-model benchmark (issue 10): plain Mamba (k = 0) against InfoMamba (k = 16) in one run, 130M-class config.

    python bench/bench_model.py [--layers 24] [--sweep] [--torch] [--json out.json]
    python bench/bench_model.py --tiny          # CPU, Triton interpreter, tiny sizes: checks that every part runs

Reports, for k = 0 and k = 16 and their ratio: decode ms per step at batch 1/64/256 (CUDA graphs, as the server
runs it; eager beside it), prefill tokens/s of one sequence of 2K/8K/32K/131K tokens, kernel launches per decode
step (counted from Python, and the profiler's GPU activities), and the per-token cost of one stream fed in chunks,
at 8K steps and at 1M steps (prefill of an 8K chunk there, and decode steps there). Every run also times, beside
the default decode step (INFOMAMBA_FUSED_STEP=1, kernels/dispatch.py: the fused Mamba step up to
mamba_step.FUSED_MAMBA_MAX_BATCH rows, main's above), the same with its kernels launched plainly (kernels/pdl.py
off), the same with every product in cuBLAS (kernels/small_linear.py
off), the fused Mamba step at every batch, main's path throughout
(`0`) and for k > 0 `concept` (the fused concept step with main's Mamba step), so one run says which is faster at
each batch size. --sweep times the fused decode kernels' launch configurations (they write state in place, so they
are picked by hand from this table, not autotuned), with the unfused steps as rows of the same table. --torch adds
the PyTorch reference path (slow) at batch 1 and 2K tokens. --tiny lowers FUSED_MAMBA_MAX_BATCH to 2, so that its
batch 4 takes the unfused Mamba step as batches above 32 do at full size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

TINY = "--tiny" in sys.argv
if TINY:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("INFOMAMBA_KERNELS", "triton")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import concept_step as concept_step_mod  # noqa: E402
from kernels import mamba_step as mamba_step_mod  # noqa: E402
from kernels import pdl as pdl_mod  # noqa: E402
from kernels import small_linear as small_linear_mod  # noqa: E402
from kernels.launches import count_cuda_kernels, counting_launches  # noqa: E402
from model.config import InfoMambaConfig  # noqa: E402
from model.infomamba import InfoMamba  # noqa: E402
from model.state import state_nbytes_per_stream  # noqa: E402
from server.engine.prefill_graphs import LONG_STEP, CudaGraphPrefill  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
GRAPH_PREFILL_MAX = 2048  # prefill lengths also timed as the server's graph step (the default step budget)


def sizes(args):
    if args.tiny:
        return dict(model=dict(d_model=32, n_layers=2, vocab_size=260, d_state=4, d_conv=4, d_concept=8),
                    concepts=(0, 4), batches=(1, 4), lengths=(32, 96), probe=32, far=256, stride=64)
    return dict(model=dict(d_model=768, n_layers=args.layers, vocab_size=50280, d_state=16, d_conv=4, expand=2),
                concepts=(0, 16), batches=(1, 64, 256), lengths=(2048, 8192, 32768, 131072), probe=8192,
                far=1 << 20, stride=65536)


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
    return statistics.median(times)


def use_kernels(choice: str) -> None:
    os.environ["INFOMAMBA_KERNELS"] = choice


class Clock:
    """Median seconds per call: CUDA events on a GPU, the wall clock on the CPU (--tiny)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, warmup=3, iters=20) -> float:
        if self.cuda:
            return time_cuda(fn, warmup, iters)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def build(fields, k, device, dtype):
    torch.manual_seed(0)
    config = InfoMambaConfig(**fields, n_concepts=k, name=f"bench-k{k}")
    with torch.device(device):  # initialise on the device: the CPU takes seconds for 150M parameters
        model = InfoMamba(config)
    return model.to(dtype).eval()


# Decode paths timed side by side: INFOMAMBA_FUSED_STEP's values (the default; for k > 0 the fused concept step with
# main's Mamba step; main's decode path throughout) and "fused", the default with the fused Mamba step at every
# batch (FUSED_MAMBA_MAX_BATCH lifted: the dispatch before run 5 set the limit).
STEP_LABELS = {"1": "default", "nopdl": "PDL off", "cublas": "projections in cuBLAS", "fused": "fused Mamba step at every batch",
               "concept": "Mamba step unfused", "0": "unfused (main's path)"}


def step_paths(k: int) -> tuple[str, ...]:
    return ("1", "nopdl", "cublas", "fused", "concept", "0") if k else ("1", "nopdl", "cublas", "fused", "0")


@contextlib.contextmanager
def fused_step(choice: str):
    """INFOMAMBA_FUSED_STEP=choice inside ("fused": `1` with mamba_step.FUSED_MAMBA_MAX_BATCH lifted; "cublas": `1`
    with every product in cuBLAS and the norms apart, small_linear.SMALL_LINEAR_MAX_BATCH at 0; "nopdl": `1` with
    every kernel launched plainly, kernels/pdl.py off); a graph captures the path chosen while it is captured."""
    before = os.environ.get("INFOMAMBA_FUSED_STEP")
    limit, small = mamba_step_mod.FUSED_MAMBA_MAX_BATCH, small_linear_mod.SMALL_LINEAR_MAX_BATCH
    with_pdl = pdl_mod.ENABLED
    os.environ["INFOMAMBA_FUSED_STEP"] = "1" if choice in ("fused", "cublas", "nopdl") else choice
    if choice == "nopdl":
        pdl_mod.ENABLED = False
    if choice == "fused":
        mamba_step_mod.FUSED_MAMBA_MAX_BATCH = 1 << 30
    if choice == "cublas":
        small_linear_mod.SMALL_LINEAR_MAX_BATCH = 0
    try:
        yield
    finally:
        mamba_step_mod.FUSED_MAMBA_MAX_BATCH, small_linear_mod.SMALL_LINEAR_MAX_BATCH = limit, small
        pdl_mod.ENABLED = with_pdl
        if before is None:
            del os.environ["INFOMAMBA_FUSED_STEP"]
        else:
            os.environ["INFOMAMBA_FUSED_STEP"] = before


def decode_step_fn(model, pool, tokens, slots, graphs: bool):
    if graphs:
        from server.engine.cuda_graphs import CudaGraphDecoder

        decoder = CudaGraphDecoder(model, pool, batch_sizes=(tokens.shape[0],))
        return lambda: decoder(tokens, slots)
    return lambda: model.decode_step(tokens, pool, slots)


def bench_decode(model, batches, clock, cuda, rows, graphs=True, rounds=2):
    """Per batch: the default step eager and under CUDA graphs, and each of step_paths under graphs (eager on the
    CPU). The paths are captured once and timed in `rounds` interleaved rounds (default, fused, unfused, default,
    ...), each figure the least of its rounds' medians, so that a drift of the card over the run does not favour one
    path."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = state_nbytes_per_stream(cfg, model.dtype)
    peak = bandwidth(rows["card"])
    pool = model.empty_state(max(batches))
    graphs = cuda and graphs
    out = {}
    with torch.inference_mode():
        for bs in batches:
            tokens = torch.randint(0, cfg.vocab_size, (bs,), device=model.device)
            slots = torch.arange(bs, dtype=torch.int32, device=model.device)
            eager = clock(decode_step_fn(model, pool, tokens, slots, False), iters=10 if cuda else 3, warmup=2)
            fns = {}
            for path in step_paths(cfg.n_concepts):
                with fused_step(path):
                    fns[path] = decode_step_fn(model, pool, tokens, slots, graphs)
            times = {path: [] for path in fns}
            for _ in range(rounds if graphs else 1):
                for path, fn in fns.items():
                    with fused_step(path):  # eager (the CPU) reads the choice at each call
                        times[path].append(clock(fn, iters=100 if graphs else 3, warmup=3 if graphs else 1))
            paths_ms = {path: min(t) * 1e3 for path, t in times.items()}
            del fns
            floor = (weight_bytes + 2 * bs * state_bytes) / peak
            out[bs] = dict(graphs_ms=paths_ms["1"] if graphs else float("nan"), eager_ms=eager * 1e3,
                           floor_ms=floor * 1e3, paths_ms=paths_ms, paths_timed="graphs" if graphs else "eager")
    return out


def bench_prefill(model, lengths, clock, cuda):
    """One sequence of n tokens, eager (the model's forward); on a GPU, for n up to GRAPH_PREFILL_MAX also as the
    server runs a step of one n-token chunk: the replay of its CUDA graph (server/engine/prefill_graphs.py's long
    buckets), continuing a stream in the pool."""
    out = {}
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
            sec = clock(lambda: model(ids), warmup=1, iters=3 if cuda else 1)
            out[n] = dict(ms=sec * 1e3, tokens_per_s=n / sec)
            if cuda and n <= GRAPH_PREFILL_MAX and n % LONG_STEP == 0:
                pool = model.empty_state(1)
                graphs = CudaGraphPrefill(model, pool, max_seqs=1, max_tokens=n)
                sec = clock(lambda: graphs((1, n), ids[0], [0, n], [0]), warmup=2, iters=10)
                out[n].update(graph_ms=sec * 1e3, graph_tokens_per_s=n / sec)
                del graphs, pool
    return out


def gpu_busy(fn, top: int = 6) -> dict:
    """One call of fn() under the profiler: the sum of its GPU activities' durations (the device's busy time) and
    the kernels that take most of it. Busy time far under the wall time means the host is the bound."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name] = by_name.get(event.name, 0.0) + event.device_time_total
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {"busy_ms": sum(by_name.values()) / 1e3, "top": [(name[:60], round(us, 1)) for name, us in ranked]}


def busy_breakdown(model, prefill_len: int) -> dict:
    """GPU busy time of an eager decode step (batch 1 and 256; main's path beside it, and the fused Mamba step where
    the default does not take it) and of a prefill, beside their wall time elsewhere."""
    cfg, out = model.config, {}
    with torch.inference_mode():
        for bs in (1, 256):
            pool = model.empty_state(bs)
            tokens = torch.randint(0, cfg.vocab_size, (bs,), device=model.device)
            slots = torch.arange(bs, dtype=torch.int32, device=model.device)
            out[f"decode_b{bs}"] = gpu_busy(decode_step_fn(model, pool, tokens, slots, False))
            with fused_step("0"):  # main's path: which of its kernels cost what, beside the fused ones
                out[f"decode_b{bs}_unfused"] = gpu_busy(decode_step_fn(model, pool, tokens, slots, False))
            if bs > mamba_step_mod.FUSED_MAMBA_MAX_BATCH:
                with fused_step("fused"):
                    out[f"decode_b{bs}_fused"] = gpu_busy(decode_step_fn(model, pool, tokens, slots, False))
        ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), device=model.device)
        out[f"prefill_{prefill_len}"] = gpu_busy(lambda: model(ids))
    return out


def count_launches(model, fields, k, device, dtype, cuda):
    """Per decode step of `model` (batch 1): the Python-side count and, on a GPU, the profiler's; per layer: the
    difference between 2-layer and 1-layer models of the same widths."""
    def step(m, pool):
        tokens = torch.zeros(1, dtype=torch.long, device=device)
        slots = torch.zeros(1, dtype=torch.int32, device=device)
        return lambda: m.decode_step(tokens, pool, slots)

    def counted(m):
        with torch.inference_mode():
            fn = step(m, m.empty_state(1))
            fn()  # warm-up: compiles, builds the fused weights
            with counting_launches() as launches:
                fn()
            return launches, (count_cuda_kernels(fn) if cuda else None)

    out = {}
    launches, out["per_step_gpu"] = counted(model)
    out["per_step"] = launches.total
    per_layer = [counted(build({**fields, "n_layers": n}, k, device, dtype))[0] for n in (1, 2)]
    out["per_layer"] = per_layer[1].total - per_layer[0].total
    out["per_layer_ops"] = sorted((per_layer[1].triton + per_layer[1].torch - per_layer[0].triton
                                   - per_layer[0].torch).elements())
    return out


def bench_long_stream(model, probe, far, stride, clock, cuda):
    """One stream fed in chunks: a `probe`-token chunk's time per token and the decode step's time when the stream
    is `probe` steps in and when it is `far` steps in (the state is fixed-size, so both should stay flat). Each
    timed repeat starts from the same saved state (restoring it is a few small copies inside the timing)."""
    vocab = model.config.vocab_size
    state = model.empty_state(1)
    chunk = torch.randint(0, vocab, (1, probe), device=model.device)
    big = torch.randint(0, vocab, (1, stride), device=model.device)
    out = {}

    def measure(label):
        saved = state.clone()  # each probe starts from the same state, so every repeat sees the same position
        def run():
            state.assign([0], saved)
            model(chunk, state)
        prefill = clock(run, warmup=1, iters=3 if cuda else 1)
        state.assign([0], saved)
        slots = torch.zeros(1, dtype=torch.int32, device=model.device)
        decode = clock(decode_step_fn(model, state, chunk[0, :1], slots, cuda), iters=50 if cuda else 3)
        state.assign([0], saved)
        out[label] = dict(steps=int(state.steps[0]), prefill_us_per_token=prefill / probe * 1e6,
                          decode_ms=decode * 1e3)

    with torch.inference_mode():
        model(chunk, state)  # now `probe` steps in
        measure("near")
        steps = probe
        while steps < far:
            n = min(stride, far - steps)
            model(big[:, :n], state)
            steps += n
        measure("far")
    return out


def sweep_decode(model, batches, clock):
    """Decode ms per step under CUDA graphs for each launch configuration of the fused decode kernels, one kernel's
    configuration at a time (the other at its default). Concept step: the one-launch path at 1, 2, 4, 8 rows a
    program, and the two-launch path (update, then the gates over (rows, columns) a program). Mamba step: the
    two-launch path (channels per block, blocks per program of launch 1, channels per program of launch 2) and the
    three-launch path (the same for launch 1, then channels per program of the dt launch), at every batch
    (FUSED_MAMBA_MAX_BATCH lifted). The defaults: concept_step.SPLIT_MAX_BATCH and _step_path,
    mamba_step.THREE_LAUNCH_MIN_BATCH, _step_config and _three_launch_config, and above
    mamba_step.FUSED_MAMBA_MAX_BATCH main's Mamba step; set them from this table. Last at each batch, the unfused
    steps (INFOMAMBA_FUSED_STEP `concept`, then `0`) under the same clock."""
    concept_choices = [("rows", rows) for rows in (1, 2, 4, 8)] + [
        ("split", config) for config in ((1, 16), (1, 32), (2, 16), (4, 16), (16, 16), (16, 32))]
    # wider blocks spill at this config (bench/compile_kernels.py)
    mamba_choices = [("two", config) for config in ((64, 1, 16), (64, 1, 32), (64, 2, 16), (64, 2, 32), (64, 4, 16),
                                                    (64, 4, 32))]
    mamba_choices += [("three", config) for config in ((64, 1, 64), (64, 1, 128), (64, 2, 64), (64, 2, 128))]
    names = ("_step_rows", "_step_path")
    original_concept = {name: getattr(concept_step_mod, name) for name in names}
    names = ("_step_config", "_three_launch_config", "THREE_LAUNCH_MIN_BATCH", "FUSED_MAMBA_MAX_BATCH", "INJECT_BLOCK_C")
    original_mamba = {name: getattr(mamba_step_mod, name) for name in names}

    def restore():
        for name, value in original_concept.items():
            setattr(concept_step_mod, name, value)
        for name, value in original_mamba.items():
            setattr(mamba_step_mod, name, value)

    def default_labels(bs):
        path = original_concept["_step_path"](bs, model.config.d_concept)
        concept = ("rows", original_concept["_step_rows"](bs)) if path is None else ("split", path)
        if bs > original_mamba["FUSED_MAMBA_MAX_BATCH"]:
            return f"{concept[0]} {concept[1]}", "unfused (main's kernels)"
        three = bs >= original_mamba["THREE_LAUNCH_MIN_BATCH"]
        config = (original_mamba["_three_launch_config"] if three else original_mamba["_step_config"])(
            bs, model.config.d_inner)
        return f"{concept[0]} {concept[1]}", f"{'three' if three else 'two'} {config}"

    results = []
    pool = model.empty_state(max(batches))
    try:
        with torch.inference_mode():
            for bs in batches:
                tokens = torch.randint(0, model.config.vocab_size, (bs,), device=model.device)
                slots = torch.arange(bs, dtype=torch.int32, device=model.device)
                concept_default, mamba_default = default_labels(bs)
                for path, config in concept_choices:
                    if path == "rows":
                        concept_step_mod._step_path = lambda batch, d_c: None
                        concept_step_mod._step_rows = lambda batch, rows=config: rows
                    else:
                        concept_step_mod._step_path = lambda batch, d_c, config=config: config
                    ms = clock(decode_step_fn(model, pool, tokens, slots, True), iters=50) * 1e3
                    results.append(dict(batch=bs, concept=f"{path} {config}", mamba=mamba_default, ms=ms))
                    restore()
                for path, config in mamba_choices:
                    mamba_step_mod.FUSED_MAMBA_MAX_BATCH = 1 << 30
                    mamba_step_mod.THREE_LAUNCH_MIN_BATCH = 0 if path == "three" else 1 << 30
                    name = "_three_launch_config" if path == "three" else "_step_config"
                    setattr(mamba_step_mod, name, lambda batch, d_inner, config=config: config)
                    ms = clock(decode_step_fn(model, pool, tokens, slots, True), iters=50) * 1e3
                    results.append(dict(batch=bs, concept=concept_default, mamba=f"{path} {config}", ms=ms))
                    restore()
                for block_c in (64, 128, 256) if model.config.n_concepts else ():  # the injection's blocks
                    mamba_step_mod.INJECT_BLOCK_C = block_c
                    ms = clock(decode_step_fn(model, pool, tokens, slots, True), iters=50) * 1e3
                    results.append(dict(batch=bs, concept=concept_default,
                                        mamba=f"{mamba_default}, injection blocks of {block_c}", ms=ms))
                    restore()
                for path in step_paths(model.config.n_concepts)[1:]:  # main's unfused steps, in the same table
                    with fused_step(path):
                        ms = clock(decode_step_fn(model, pool, tokens, slots, True), iters=50) * 1e3
                    unfused = "unfused (main's kernels)"
                    results.append(dict(batch=bs, concept=concept_default if path == "concept" else unfused,
                                        mamba=unfused, ms=ms))
    finally:
        restore()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny sizes (a smoke run)")
    parser.add_argument("--sweep", action="store_true", help="time the fused decode kernels' launch configurations")
    parser.add_argument("--torch", action="store_true", help="also the PyTorch reference path (batch 1, 2K tokens)")
    parser.add_argument("--skip-long", action="store_true", help="skip the 1M-step stream")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 64 256)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("bench_model.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    if cuda:
        os.environ.setdefault("INFOMAMBA_KERNELS", "triton")
    else:  # --tiny: its batch 4 crosses the limit, so that the smoke run takes both Mamba steps
        mamba_step_mod.FUSED_MAMBA_MAX_BATCH = 2
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    plan = sizes(args)
    if args.batches:
        plan["batches"] = tuple(args.batches)
    card = torch.cuda.get_device_name() if cuda else "cpu (tiny, interpreter)"
    import triton

    results = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "model": plan["model"],
               "dtype": str(dtype), "k": {}}
    clock = Clock(cuda)
    print(f"# {card}; torch {torch.__version__}, triton {triton.__version__}; {plan['model']}, {dtype}", flush=True)
    for k in plan["concepts"]:
        t0 = time.perf_counter()
        model = build(plan["model"], k, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        got = results["k"][k] = {"params": params}
        print(f"## k = {k}: {params / 1e6:.1f}M parameters", flush=True)
        got["decode"] = bench_decode(model, plan["batches"], clock, cuda, results)
        print(f"decode done ({time.perf_counter() - t0:.0f} s)", flush=True)
        got["prefill"] = bench_prefill(model, plan["lengths"], clock, cuda)
        print(f"prefill done ({time.perf_counter() - t0:.0f} s)", flush=True)
        got["launches"] = count_launches(model, plan["model"], k, device, dtype, cuda)
        if cuda:
            got["busy"] = busy_breakdown(model, plan["lengths"][0])
            print(f"busy: {json.dumps(got['busy'])}", flush=True)
        if not args.skip_long:
            got["stream"] = bench_long_stream(model, plan["probe"], plan["far"], plan["stride"], clock, cuda)
            print(f"long stream done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.torch:
            use_kernels("torch")
            # the references read the device (slot checks), so they cannot be captured in a graph: eager only
            got["torch_path"] = dict(decode=bench_decode(model, plan["batches"][:1], clock, cuda, results, False),
                                     prefill=bench_prefill(model, plan["lengths"][:1], clock, cuda))
            use_kernels("triton")
        if args.sweep and k == max(plan["concepts"]) and cuda:
            got["sweep"] = sweep_decode(model, plan["batches"], clock)
        del model
        if cuda:
            torch.cuda.empty_cache()
    print(report(results, plan))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def paths_table(results, plan) -> str:
    """The default decode step against the others at each batch, for both models (ms a step and other / default)."""
    head, rule, body = ["decode, batch"], ["---:"], {bs: [str(bs)] for bs in plan["batches"]}
    for k in plan["concepts"]:
        got = results["k"][k]["decode"]
        timed = got[plan["batches"][0]]["paths_timed"]
        for path in step_paths(k):
            head.append(f"k={k} {STEP_LABELS[path]} ms ({timed})")
            rule.append("---:")
            for bs in plan["batches"]:
                body[bs].append(f"{got[bs]['paths_ms'][path]:.3f}")
        for path in step_paths(k)[1:]:
            head.append(f"k={k} {STEP_LABELS[path]} / default")
            rule.append("---:")
            for bs in plan["batches"]:
                ms = got[bs]["paths_ms"]
                body[bs].append(f"{ms[path] / ms['1']:.2f}")
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    return "\n".join(rows + ["| " + " | ".join(cells) + " |" for cells in body.values()])


def report(results, plan) -> str:
    k0, k1 = plan["concepts"]
    a, b = results["k"][k0], results["k"][k1]
    lines = [f"\n### {results['card']}: k = {k0} ({a['params'] / 1e6:.1f}M) vs k = {k1} ({b['params'] / 1e6:.1f}M), "
             f"{results['dtype']}\n",
             f"| decode, batch | k={k0} ms (graphs) | k={k1} ms (graphs) | k{k1}/k{k0} | k={k0} eager ms | "
             f"k={k1} eager ms | floor ms (k={k1}) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for bs in plan["batches"]:
        x, y = a["decode"][bs], b["decode"][bs]
        lines.append(f"| {bs} | {x['graphs_ms']:.3f} | {y['graphs_ms']:.3f} | {y['graphs_ms'] / x['graphs_ms']:.2f} | "
                     f"{x['eager_ms']:.3f} | {y['eager_ms']:.3f} | {y['floor_ms']:.3f} |")
    lines += ["", paths_table(results, plan)]
    lines += ["", f"| prefill, tokens | k={k0} tokens/s | k={k1} tokens/s | k{k1}/k{k0} time |",
              "| ---: | ---: | ---: | ---: |"]
    for n in plan["lengths"]:
        x, y = a["prefill"][n], b["prefill"][n]
        lines.append(f"| {n} | {x['tokens_per_s']:,.0f} | {y['tokens_per_s']:,.0f} | {y['ms'] / x['ms']:.2f} |")
        if "graph_ms" in x and "graph_ms" in y:
            lines.append(f"| {n}, the server's graph step | {x['graph_tokens_per_s']:,.0f} | "
                         f"{y['graph_tokens_per_s']:,.0f} | {y['graph_ms'] / x['graph_ms']:.2f} |")
    lines += ["", f"| launches per decode step | k={k0} | k={k1} |", "| --- | ---: | ---: |",
              f"| per step, counted from Python | {a['launches']['per_step']} | {b['launches']['per_step']} |",
              f"| per step, GPU activities (profiler) | {a['launches']['per_step_gpu']} | "
              f"{b['launches']['per_step_gpu']} |",
              f"| per layer | {a['launches']['per_layer']} | {b['launches']['per_layer']} |",
              "", f"per layer, k={k1}: {', '.join(b['launches']['per_layer_ops'])}"]
    if "busy" in a:
        lines += ["", f"| GPU busy ms in one eager call (sum of the profiler's activities) | k={k0} | k={k1} |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {what} | {a['busy'][what]['busy_ms']:.3f} | {b['busy'][what]['busy_ms']:.3f} |"
                  for what in a["busy"]]
        for k, got in ((k0, a), (k1, b)):
            for what, busy in got["busy"].items():
                lines.append(f"- k={k} {what}: " + ", ".join(f"{name} {us:.0f} µs" for name, us in busy["top"]))
    if "stream" in a:
        lines += ["", "| one stream, k | prefill µs/token near | far | far/near | decode ms near | far | far/near |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, got in ((k0, a), (k1, b)):
            near, far = got["stream"]["near"], got["stream"]["far"]
            lines.append(f"| {k} | {near['prefill_us_per_token']:.3f} | {far['prefill_us_per_token']:.3f} | "
                         f"{far['prefill_us_per_token'] / near['prefill_us_per_token']:.2f} | {near['decode_ms']:.3f} | "
                         f"{far['decode_ms']:.3f} | {far['decode_ms'] / near['decode_ms']:.2f} |")
        lines.append(f"\n(near: {a['stream']['near']['steps']:,} steps in; far: {a['stream']['far']['steps']:,} "
                     f"steps in; the prefill probe is a {plan['probe']:,}-token chunk)")
    for k, got in ((k0, a), (k1, b)):
        if "torch_path" in got:
            tp = got["torch_path"]
            lines.append(f"\nPyTorch path, k={k}: decode batch {plan['batches'][0]} "
                         f"{tp['decode'][plan['batches'][0]]['eager_ms']:.1f} ms, prefill {plan['lengths'][0]} tokens "
                         f"{tp['prefill'][plan['lengths'][0]]['tokens_per_s']:,.0f} tokens/s")
    if "sweep" in b:
        lines += ["", f"| sweep (k={k1}), batch | concept: rows (rows/program) or split (rows, columns)/program | "
                  "mamba: two or three launches (block_e, num_sub, block_d) | ms |", "| ---: | --- | --- | ---: |"]
        lines += [f"| {r['batch']} | {r['concept']} | {r['mamba']} | {r['ms']:.3f} |" for r in b["sweep"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
