"""What durability costs: session appends through the engine core with every answer waiting for the disk, in
the default mode (a write-ahead log record of the inputs, group-committed; snapshots every --snapshot-every steps),
with a whole snapshot written through for every answer (--snapshot-every 1), and with the writes skipped.

    .venv/bin/python bench/bench_durability.py                          # the bundled model, a temp dir
    .venv/bin/python bench/bench_durability.py --config 130m --state-dir /data/sessions --sessions 64
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.config import ServerConfig  # noqa: E402
from server.engine import store as store_module  # noqa: E402
from server.engine.core import EngineCore  # noqa: E402
from server.engine.protocol import Add, Array, SessionOp  # noqa: E402
from server.engine.wal import LogWriter  # noqa: E402


def load(args):
    from model.config import InfoMambaConfig
    from model.infomamba import InfoMamba
    from server.serve import make_loader

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.config == "130m":  # the 130M-class config of bench/bench_model.py, random weights
        cfg = InfoMambaConfig(d_model=768, n_layers=24, vocab_size=50280, n_concepts=16, name="bench-130m")
        return InfoMamba(cfg).to(device=device, dtype=dtype).eval()
    model, _ = make_loader(ServerConfig(device=device), None)()
    return model


def run(core: EngineCore, sessions: list[str], rounds: int, chunk: int, rng) -> tuple[float, list[float]]:
    """Every session appends `rounds` chunks, one outstanding each; returns (seconds, per-append latencies)."""
    latencies, started, left = [], {}, {sid: rounds for sid in sessions}
    vocab = min(core.model.config.vocab_size, 256)

    def submit(sid):
        rid = f"{sid}-{left[sid]}"
        started[rid] = (sid, time.perf_counter())
        core.handle(Add("bench", rid, Array.of(rng.integers(0, vocab, chunk)), session=sid))

    t0 = time.perf_counter()
    for sid in sessions:
        submit(sid)
    while started:
        for batch in core.run_once(timeout=0.001).values():
            for out in batch.outputs:
                if out.finish_reason is None and out.error is None:
                    continue
                assert out.error is None, out.error
                sid, t = started.pop(out.rid)
                latencies.append(time.perf_counter() - t)
                left[sid] -= 1
                if left[sid]:
                    submit(sid)
    return time.perf_counter() - t0, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["default", "130m"], default="default")
    parser.add_argument("--state-dir", default=None, help="where snapshots go (default: a temp dir)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    model = load(args)
    card = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="infomamba-durability-")
    real_write, real_append = store_module.atomic_write, LogWriter.append
    results = {}
    for mode in ("log", "snapshot each", "no writes"):
        skip = mode == "no writes"
        store_module.atomic_write = (lambda path, data: None) if skip else real_write
        LogWriter.append = (lambda self, data: None) if skip else real_append
        config = ServerConfig(max_num_streams=args.sessions, max_num_batched_tokens=max(2048, args.sessions),
                              snapshot_every=1 if mode == "snapshot each" else 4096)
        core = EngineCore(model, None, config, tempfile.mkdtemp(dir=state_dir))
        core.store.start()
        for i in range(args.sessions):
            core.handle(SessionOp("bench", f"s{i}", "create"))
        sessions = []
        while len(sessions) < args.sessions:
            for batch in core.run_once(timeout=0.01).values():
                sessions += [r.session for r in batch.replies]
        rng = np.random.default_rng(0)
        run(core, sessions, 2, args.chunk, rng)  # warm-up
        seconds, lat = run(core, sessions, args.rounds, args.chunk, rng)
        core.shutdown()
        steps = args.sessions * args.rounds * args.chunk
        lat = sorted(lat)
        results[mode] = (steps / seconds, lat[len(lat) // 2], lat[int(len(lat) * 0.99)])
        print(f"{mode:<14} {steps / seconds:10.0f} steps/s  append p50 {results[mode][1] * 1e3:7.2f} ms  "
              f"p99 {results[mode][2] * 1e3:7.2f} ms", flush=True)
    store_module.atomic_write, LogWriter.append = real_write, real_append
    snapshot_kib = next(Path(state_dir).glob("*/*.state.safetensors")).stat().st_size / 1024
    print(f"\n{card}; {model.config.name}; snapshot {snapshot_kib:.0f} KiB; {args.sessions} sessions x "
          f"{args.rounds} appends of {args.chunk} steps; state dir {state_dir}")
    for mode in ("log", "snapshot each"):
        print(f"{mode:<14} keeps {results[mode][0] / results['no writes'][0]:.2f} of the throughput; p50 latency "
              f"+{(results[mode][1] - results['no writes'][1]) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
