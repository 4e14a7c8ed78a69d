"""What async_scheduling "auto" picks at warm-up, and the timings it picks from, for the bundled model and a
random-weight 130M-class one (bench_model.py's config), on this machine's device.

    python bench/which_async.py
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from bench.bench_model import build
    from model.tokenizer import load_tokenizer
    from server.config import ServerConfig
    from server.engine.core import EngineCore
    from server.engine.process import warm_up
    from server.serve import make_loader, resolve_device_dtype

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ServerConfig(max_num_streams=64)
    device, dtype = resolve_device_dtype(config)
    config.device = device
    bundled = make_loader(config, None)()
    big = build(dict(d_model=768, n_layers=24, vocab_size=50280, d_state=16, d_conv=4, expand=2), 16, device, dtype)
    for name, (model, tokenizer) in (("bundled", bundled), ("130m", (big, load_tokenizer(None, 50280)))):
        core = EngineCore(model, tokenizer, config, tempfile.mkdtemp(prefix="which-async-"))
        warm_up(core)
        print(f"{name}: async scheduling {'on' if core.async_scheduling else 'off'}", flush=True)
        core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
