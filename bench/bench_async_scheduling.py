"""Engine direct (bench_server.py's closed-loop completions, no HTTP) with async scheduling on and off, in one
process, alternating, on the bundled model: steps/s, and where the engine thread's wall time goes per step
(schedule, launch, waiting for the sampled tokens, postprocess, take_outputs, the rest).

    python bench/bench_async_scheduling.py [--concurrency 1 16 64] [--seconds 2] [--rounds 2] [--model-size 130m]

--model-size 130m: a random-weight model of bench_model.py's 130M-class config (d_model 768, 24 layers, vocab 50280,
16 concepts) instead of the bundled one (d_model 280, 6 layers): a decode step the device takes longer over than
the host does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_server import EngineSide, Workload, progress  # noqa: E402

PHASES = ("schedule", "launch", "wait", "postprocess", "take_outputs")


class PhaseTimer:
    """Wall seconds spent inside the wrapped callables, by phase."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        setattr(owner, name, timed)


def measure(engine: EngineSide, prompts, conc: int, max_tokens: int, seconds: float) -> dict:
    from server.engine import runner as runner_module

    core = engine.core
    timer = PhaseTimer()
    plain_host_tokens = runner_module.LaunchedStep.host_tokens
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(core.runner, "launch", "launch")
    timer.wrap(core, "postprocess", "postprocess")
    timer.wrap(core, "take_outputs", "take_outputs")
    timer.wrap(runner_module.LaunchedStep, "host_tokens", "wait")
    steps0 = core.num_steps
    try:
        run = engine.completions(prompts, conc, max_tokens, seconds)
    finally:
        for name in ("schedule", "launch", "postprocess", "take_outputs"):
            for owner in (core.scheduler, core.runner, core):
                owner.__dict__.pop(name, None)
        runner_module.LaunchedStep.host_tokens = plain_host_tokens
    steps = core.num_steps - steps0
    per_step = {phase: 1e6 * s / steps for phase, s in timer.seconds.items()}
    per_step["other"] = 1e6 * run.seconds / steps - sum(per_step.values())
    return {"rate": run.rate, "engine_steps_per_s": steps / run.seconds, "us": per_step}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2, help="on/off pairs per concurrency")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--device", default="auto")
    p.add_argument("--model-size", choices=["bundled", "130m"], default="bundled")
    p.add_argument("--modes", choices=["both", "on", "off"], default="both",
                   help="async scheduling on and off, or one of them (e.g. under a profiler)")
    args = p.parse_args()
    import torch

    from server.config import ServerConfig
    from server.serve import make_loader, resolve_device_dtype

    top = max(args.concurrency)
    config = ServerConfig(device=args.device, max_num_streams=max(64, 2 * top))
    config.device = resolve_device_dtype(config)[0]
    if args.model_size == "bundled":
        model, tokenizer = make_loader(config, None)()
    else:
        from bench.bench_model import build
        from model.tokenizer import load_tokenizer

        device, dtype = resolve_device_dtype(config)
        model = build(dict(d_model=768, n_layers=24, vocab_size=50280, d_state=16, d_conv=4, expand=2), 16, device,
                      dtype)
        tokenizer = load_tokenizer(None, model.config.vocab_size)
    card = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    progress(f"{card}, {model.config.name}")
    args.requests, args.chunk_steps, args.chunks, args.ws_sessions, args.long_ids, args.frame = 0, 16, 1, 1, 1, 1
    w = Workload(args, min(model.config.vocab_size, 256))
    engine = EngineSide(model, tokenizer, config)
    rows = []
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.modes]
    for c in args.concurrency:
        prompts = w.prompts[:w.levels[c]]
        for mode in modes:  # untimed: compiles the shapes
            engine.core.async_scheduling = mode
            engine.completions(prompts, c, args.max_tokens)
        for r in range(args.rounds):
            for mode in modes:
                engine.core.async_scheduling = mode
                got = measure(engine, prompts, c, args.max_tokens, args.seconds)
                progress(f"c={c} async={mode} round {r}: {got['rate']:,.0f} steps/s, "
                         f"{got['engine_steps_per_s']:,.0f} engine steps/s, µs a step: "
                         + ", ".join(f"{k} {v:.0f}" for k, v in got["us"].items()))
                rows.append((c, mode, got))
    print(f"\n### Async scheduling on/off, engine direct: {card}, {model.config.name}\n")
    print("| c | async | steps/s | engine steps/s | " + " | ".join(f"{k} µs" for k in PHASES + ("other",)) + " |")
    print("| ---: | --- | ---: | ---: |" + " ---: |" * (len(PHASES) + 1))
    for c, mode, got in rows:
        print(f"| {c} | {'on' if mode else 'off'} | {got['rate']:,.0f} | {got['engine_steps_per_s']:,.0f} | "
              + " | ".join(f"{got['us'][k]:.0f}" for k in PHASES + ("other",)) + " |")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
