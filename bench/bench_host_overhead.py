"""Host (Python) time of one eager forward on the Triton path, on the CPU with no GPU.

What it measures: `model(inputs, state, cu_seqlens=..., state_indices=..., bounds=...)` exactly as the engine's
ModelRunner calls it for a step that is not a pure decode step, with kernels.dispatch on the Triton path
(INFOMAMBA_KERNELS=triton, TRITON_INTERPRET unset) and every Triton launch stubbed: `JITFunction.run` runs Triton's
own argument binder and cache-key computation for an H100-class CUDA target (the specialization of every argument,
which grows with the argument count) and returns without launching (not counted: the device and stream look-up, the
compiled-kernel cache look-up, launch_metadata and the C launcher). Tensors are tiny (d_model 16) so the CPU's
GEMMs and elementwise ops cost about what a CUDA launch of them costs the host; the structure is the bundled
model's: 6 recurrent layers, d_state 16, d_conv 4, expand 2, vocab 260, k = 0 (plain Mamba layers), and the same
with k = 16 concepts and concept_decay "learned" (the InfoMamba filter).

  mixed:   16 one-token decode rows + 2 prompts of 48 tokens, packed as ModelRunner._host_layout and _to_device
           pack them (the decodes first; cu_seqlens and state_indices slices of one int32 tensor; `bounds` on the host);
           mixed256 the same with 256 decode rows (what scales with the batch: loops over sequences).
  prefill: one sequence of 2,048 tokens.

Reported per case: µs per forward (best of --rounds rounds of --iters forwards; the time of the whole call,
Python and CPU torch ops), Triton launches per forward (calls of the stubbed run), aten ops per forward (a
TorchDispatchMode counter, in a separate untimed pass), and with --profile a cProfile top list.

What it cannot measure: a CPU torch op's cost is not a CUDA op's launch cost (a CUDA launch through the caching
allocator and the driver is some µs; the CPU kernel of a tiny op is ~1-3 µs), and the stub skips Triton's
launch itself (launch_metadata, the C launcher, the driver: some µs per launch on the device machine, so the
launch count times that is to be added). It is a proxy for the Python overhead that the eager steps pay, to
compare code versions, not a prediction of device-machine milliseconds.

    python bench/bench_host_overhead.py [--rounds 7] [--iters 50] [--profile] [--ops]
    python bench/bench_host_overhead.py --against /path/to/other/checkout   # alternate two trees, one table

With --against, rounds alternate between subprocesses that import `kernels`/`model` from this tree and from the
other one (the bench file is this one in both), so a noisy neighbour hits both sides alike.

Results on the 2-core dev VM, shared with other work: before = main at a97652d (a worktree of it at
/work/wt-host-base), after = branch wt-host. µs per forward, the best of 9 alternating rounds of 20 forwards; runs
vary by up to 1.5x on this VM, so read the ratios, not the digits. Launches and aten ops are per forward.

  python bench/bench_host_overhead.py --against /work/wt-host-base --rounds 9 --iters 20 [--no-bind]

                  with Triton's binding (default)        without it (--no-bind)
  case            before   after  ratio                  before   after  ratio    launches   aten ops
  mixed k=0         2809    2249   1.25                    2076    1349   1.54     25 -> 25   131 -> 76
  mixed k=16        5715    4510   1.27                    4176    3482   1.20     49 -> 49   281 -> 202
  mixed256 k=0      3558    2359   1.51                    2872    1742   1.65     25 -> 25   131 -> 76
  prefill k=0       5835    4577   1.27                    5076    3056   1.66     37 -> 37   149 -> 94
  prefill k=16     10139    9020   1.12                   10747    7725   1.39     61 -> 61   304 -> 225

The gap between the two halves is Triton's own argument binding, ~30-40 µs a launch on this VM (more for kernels
with many arguments: the scan's output kernel takes 24): the largest single cost left, and one the launch count
and argument count set, not the wrappers. The prefill rows also carry the CPU's real arithmetic on 2,048 rows
(the head's (2048, 260) GEMM above all), which no host-side change touches.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

# Before any kernel module imports triton: the Triton path, compiled mode (the interpreter would run the kernels).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["INFOMAMBA_KERNELS"] = "triton"

ROOT = Path(os.environ.get("BENCH_HOST_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CASES = {
    # name: (n_concepts, decode rows, prompt lengths)
    "mixed k=0": (0, 16, [48, 48]),
    "mixed k=16": (16, 16, [48, 48]),
    "mixed256 k=0": (0, 256, [48, 48]),
    "prefill k=0": (0, 0, [2048]),
    "prefill k=16": (16, 0, [2048]),
}


class LaunchStub:
    """Replaces JITFunction.run: binds the arguments as Triton does for a CUDA target, counts, launches nothing."""

    def __init__(self):
        self.launches = 0
        self.bind = True
        self._backend = None

    def install(self) -> None:
        from triton import knobs
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
        stub = self

        def run(fn, *args, grid, warmup, **kwargs):  # JITFunction.run up to its device-specific parts
            stub.launches += 1
            if stub.bind:
                kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
                kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                cached = fn.__dict__.get("_bench_binder")
                if cached is None:  # as Triton's per-device cache: a binder and a key cache per kernel
                    cached = fn._bench_binder = (
                        create_function_from_signature(fn.signature, fn.params, stub.backend()), {})
                binder, key_cache = cached
                _, specialization, options = binder(*args, **kwargs)
                compute_cache_key(key_cache, specialization, options)
            return None

        JITFunction.run = run

    def backend(self):
        if self._backend is None:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            self._backend = make_backend(GPUTarget("cuda", 90, 32))
        return self._backend


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def make_case(name: str):
    from model.config import InfoMambaConfig
    from model.infomamba import InfoMamba
    k, num_decodes, prompts = CASES[name]
    torch.manual_seed(0)
    config = InfoMambaConfig(d_model=16, n_layers=6, vocab_size=260, d_state=16, d_conv=4, expand=2,
                             n_concepts=k, concept_decay="learned" if k else "none", name="bench-host")
    model = InfoMamba(config).eval()
    num_seqs = num_decodes + len(prompts)
    pool = model.empty_state(num_seqs + 8)
    # as ModelRunner._host_layout: the decode tokens first, then each prompt; cu_seqlens and state_indices from one tensor
    starts = list(range(num_decodes + 1))
    for length in prompts:
        starts.append(starts[-1] + length)
    slots = list(range(3, 3 + num_seqs))
    inputs = torch.randint(0, 260, (starts[-1],), dtype=torch.int64)
    layout = torch.tensor(starts + slots, dtype=torch.int32)
    cu_seqlens, state_indices = layout[:len(starts)], layout[len(starts):]

    def forward():
        return model(inputs, pool, cu_seqlens=cu_seqlens, state_indices=state_indices, bounds=starts)

    return forward


def measure(name: str, rounds: int, iters: int, stub: LaunchStub) -> dict:
    forward = make_case(name)
    with torch.inference_mode():
        for _ in range(3):
            forward()
        stub.launches = 0
        forward()
        launches = stub.launches
        counter = OpCounter()
        with counter:
            forward()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iters):
                forward()
            best = min(best, (time.perf_counter() - t0) / iters)
    return {"us": best * 1e6, "launches": launches, "aten_ops": counter.count}


def profile(name: str, iters: int, top: int) -> str:
    forward = make_case(name)
    with torch.inference_mode():
        forward()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iters):
            forward()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def run_side(root: str, cases: list[str], rounds: int, iters: int, extra: list[str]) -> dict:
    """One side's results from a subprocess that imports the model and kernels from `root`."""
    env = dict(os.environ, BENCH_HOST_ROOT=root)
    cmd = [sys.executable, __file__, "--json", "--rounds", str(rounds), "--iters", str(iters), *extra,
           "--cases", *cases]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(other: str, cases: list[str], rounds: int, iters: int, extra: list[str]) -> None:
    sides = {"before": str(Path(other).resolve()), "after": str(ROOT)}
    best: dict[str, dict] = {side: {} for side in sides}
    for _ in range(rounds):  # alternate: one round of each side at a time
        for side, root in sides.items():
            for case, got in run_side(root, cases, 1, iters, extra).items():
                kept = best[side].get(case)
                if kept is None or got["us"] < kept["us"]:
                    best[side][case] = got
    print(f"{'case':15s} {'before µs':>10s} {'after µs':>9s} {'ratio':>6s}  {'launches':>9s}  {'aten ops':>9s}")
    for case in cases:
        b, a = best["before"][case], best["after"][case]
        print(f"{case:15s} {b['us']:10.0f} {a['us']:9.0f} {b['us'] / a['us']:6.2f}  "
              f"{b['launches']:>4d}->{a['launches']:<4d} {b['aten_ops']:>4d}->{a['aten_ops']:<4d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bind", action="store_true", help="the stub skips Triton's argument binding")
    parser.add_argument("--profile", action="store_true", help="a cProfile top list per case")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--against", help="another checkout (the base): alternate rounds of both, one table")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.against:
        extra = ["--threads", str(args.threads)] + (["--no-bind"] if args.no_bind else [])
        compare(args.against, args.cases, args.rounds, args.iters, extra)
        return
    stub = LaunchStub()
    stub.bind = not args.no_bind
    stub.install()
    results = {case: measure(case, args.rounds, args.iters, stub) for case in args.cases}
    if args.json:
        print(json.dumps(results))
        return
    print(f"tree: {ROOT}")
    print(f"{'case':15s} {'µs/forward':>10s} {'launches':>9s} {'aten ops':>9s}")
    for case, got in results.items():
        print(f"{case:15s} {got['us']:10.0f} {got['launches']:9d} {got['aten_ops']:9d}")
    if args.profile:
        for case in args.cases:
            print(f"\n== cProfile: {case}, {args.iters} forwards, by own time")
            print(profile(case, args.iters, args.top))


if __name__ == "__main__":
    main()
