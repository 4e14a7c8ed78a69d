"""A real uvicorn server on 127.0.0.1 in a thread, around a tiny seeded model (on the CPU, or on the device that
INFOMAMBA_TEST_DEVICE names, e.g. cuda on the GPU machine)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba
from model.tokenizer import ByteTokenizer
from server.api.app import create_app
from server.config import ServerConfig
from server.engine.core import EngineCore
from server.engine.process import EngineLoop, warm_up

TEST_DEVICE = os.environ.get("INFOMAMBA_TEST_DEVICE", "cpu")


def tiny_lm(seed: int = 0) -> InfoMamba:
    torch.manual_seed(seed)
    model = InfoMamba(InfoMambaConfig(d_model=32, n_layers=2, vocab_size=260, n_concepts=4, d_state=8,
                                      name="tiny-lm"))
    # random tiny models put all mass on a few tokens; spread the logits so greedy decoding varies
    with torch.no_grad():
        model.embedding.weight.mul_(25)
    return model.to(TEST_DEVICE).eval()


def tiny_float(seed: int = 1) -> InfoMamba:
    torch.manual_seed(seed)
    return InfoMamba(InfoMambaConfig(d_model=16, n_layers=2, vocab_size=None, d_input=6, head="per_step",
                                     d_output=3, n_concepts=4, d_state=8, name="tiny-float")).to(TEST_DEVICE).eval()


async def feed_in_batches(stream, batches) -> None:
    """Put each batch of outputs into a RequestStream once its reader has drained the batch before: a batch's
    outputs wait together, as when a frontend falls behind its engine."""
    pending = [list(b) for b in batches]
    while pending:
        while stream.has_ready():
            await asyncio.sleep(0)
        for out in pending.pop(0):
            stream.put(out)
        await asyncio.sleep(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """The engine loop on one thread and uvicorn on another, talking over the engine's socket exactly as the processes of
    `infomamba serve` do (tests/server/test_processes.py runs those)."""

    def __init__(self, model, tokenizer=None, state_dir=None, model_dir=None, **config):
        self.port = free_port()
        # small steps even when nothing decodes, so long inputs really go through in chunks
        config.setdefault("max_num_prefill_tokens", config.get("max_num_batched_tokens", 2048))
        self.config = ServerConfig(host="127.0.0.1", port=self.port, **config)
        self.run_dir = tempfile.mkdtemp(prefix="infomamba-test-")
        self.state_dir = state_dir or os.path.join(self.run_dir, "sessions")
        address = f"ipc://{self.run_dir}/engine"
        self.core = EngineCore(model, tokenizer, self.config, self.state_dir, model_dir=model_dir)
        warm_up(self.core)
        self.core.sessions.pick_up_persisted()
        self.loop = EngineLoop(self.core, address)
        self.engine_thread = threading.Thread(target=self.loop.run, daemon=True)
        self.app = create_app(self.config, address, tokenizer=tokenizer)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ws="websockets-sansio", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"

    def stats(self) -> dict:
        """The engine's counters, as /health reports them."""
        return httpx.get(self.url + "/health", timeout=10).json()["engine"]

    def start(self) -> "ServerThread":
        self.engine_thread.start()
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.loop.stop()
        self.engine_thread.join(timeout=60)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@contextlib.contextmanager
def running(model, tokenizer=None, **config):
    srv = ServerThread(model, tokenizer, **config).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def lm_server():
    # async scheduling on (auto leaves it off on a CPU): every test on this server runs it through HTTP
    with running(tiny_lm(), ByteTokenizer(), max_num_streams=8, max_num_batched_tokens=64,
                 async_scheduling=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def float_server():
    with running(tiny_float(), None, max_num_streams=8, max_num_batched_tokens=32) as srv:
        yield srv
