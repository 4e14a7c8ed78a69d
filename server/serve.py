"""`infomamba serve`: one engine process and `api_server_count` HTTP frontend processes sharing one port, under a
launcher that stops them in order (frontends drain, then the engine saves its sessions) and exits non-zero when
the engine dies, so docker or Kubernetes restarts the server.

    launcher ── spawns ──> engine process   (model, state pool, sessions; a Unix socket)
             └─ spawns ──> frontend 1..N    (uvicorn, a socket each on the port; validation, detokenizing, framing)
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import torch

from server.config import ServerConfig

log = logging.getLogger("infomamba.server")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "default_model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(config: ServerConfig) -> tuple[str, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = DTYPES[config.dtype]
    return device, dtype


def random_model(seed: int = 0):
    from model.config import InfoMambaConfig
    from model.infomamba import InfoMamba

    torch.manual_seed(seed)
    return InfoMamba(InfoMambaConfig(d_model=64, n_layers=2, vocab_size=260, name="random-tiny")).eval()


def make_loader(config: ServerConfig, model_dir: str | None):
    """A load() for create_app: the given directory, else the bundled default model, else a seeded random one."""
    from model.tokenizer import load_tokenizer
    from model.weights import load_model

    device, dtype = resolve_device_dtype(config)

    def load():
        directory = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        if model_dir or (DEFAULT_MODEL_DIR / "config.json").is_file():
            model = load_model(directory, device=device, dtype=dtype).eval()
            return model, load_tokenizer(directory, model.config.vocab_size)
        log.warning("=" * 78)
        log.warning("NO MODEL GIVEN and no bundled model at %s: serving a RANDOM tiny model (seed 0).", directory)
        log.warning("Its outputs are noise. Pass --model DIR (or INFOMAMBA_MODEL) to serve a real one.")
        log.warning("=" * 78)
        model = random_model().to(device=device, dtype=dtype)
        return model, load_tokenizer(None, model.config.vocab_size)

    return load


def configure_logging(log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def listen_socket(config: ServerConfig) -> socket.socket:
    """A listening socket of its own per frontend, all on one port (SO_REUSEPORT): the kernel spreads new
    connections evenly over them, where one shared socket lets whichever process wakes first take most."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # a keep-alive response written in two parts waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)
    return sock


def frontend_main(config: ServerConfig, engine_address: str, run_dir: str, log_level: str) -> None:
    import uvicorn

    from server.api.app import create_app

    configure_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher stops frontends with SIGTERM, in order
    app = create_app(config, engine_address)
    sock = listen_socket(config)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, ws="websockets-sansio",
                                           ws_per_message_deflate=config.ws_compression,
                                           timeout_graceful_shutdown=int(config.shutdown_timeout)))
    server.run(sockets=[sock])


def serve(config: ServerConfig, model_dir: str | None, log_level: str = "info") -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until a child process dies (exit 1)."""
    from server.engine.process import engine_main

    configure_logging(log_level)
    run_dir = tempfile.mkdtemp(prefix="infomamba-run-")
    state_dir, temporary = config.state_dir, config.state_dir is None
    if temporary:
        state_dir = tempfile.mkdtemp(prefix="infomamba-sessions-")
    if temporary and config.state_store is None:
        log.warning("sessions are kept in %s and removed at exit: set --state-dir to keep them across restarts",
                    state_dir)
    engine_address = f"ipc://{run_dir}/engine"
    try:
        listen_socket(config).close()  # fail now, with a clear message, if the port is taken
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 2
    spawn = multiprocessing.get_context("spawn")
    engine = spawn.Process(target=engine_main, name="infomamba-engine",
                           args=(config, model_dir, engine_address, state_dir, log_level))
    engine.start()
    frontends = [spawn.Process(target=frontend_main, name=f"infomamba-api-{i}",
                               args=(config, engine_address, run_dir, log_level))
                 for i in range(config.num_api_servers)]
    for p in frontends:
        p.start()
    log.info("listening on http://%s:%d with %d API frontend(s) (pids %s) and the engine (pid %d)", config.host,
             config.port, len(frontends), ", ".join(str(p.pid) for p in frontends), engine.pid)
    code = _supervise(engine, frontends, config.shutdown_timeout)
    shutil.rmtree(run_dir, ignore_errors=True)
    if temporary:
        shutil.rmtree(state_dir, ignore_errors=True)
    return code


def _supervise(engine, frontends, shutdown_timeout: float) -> int:
    stop_r, stop_w = os.pipe()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os.write(stop_w, b"x"))
    waits = [engine.sentinel, stop_r] + [p.sentinel for p in frontends]
    ready = multiprocessing.connection.wait(waits)
    code = 0
    if stop_r not in ready:
        dead = engine if engine.sentinel in ready else next(p for p in frontends if p.sentinel in ready)
        log.error("%s (pid %d) exited with code %s: stopping the server", dead.name, dead.pid, dead.exitcode)
        code = 1
        if dead is engine:
            time.sleep(1.0)  # the frontends answer 503 meanwhile, so health checks see why
    _stop(frontends, shutdown_timeout + 5)
    if engine.is_alive():
        _stop([engine], 60)  # the engine flushes its session writes before it exits
    elif code == 0 and engine.exitcode:
        code = 1
    return code


def _stop(processes, timeout: float) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.error("%s (pid %d) did not stop in time; killing it", p.name, p.pid)
            p.kill()
            p.join()
