"""`infomamba serve` as it runs in production: a launcher, one engine process and N frontend processes on one
port. Concurrency through two frontends, the engine dying, SIGTERM, and SIGKILL of everything with the sessions
surviving the restart."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from model.weights import save_model
from tests.server.conftest import free_port, tiny_lm
from tests.server.test_engine_api import greedy_reference

ROOT = Path(__file__).resolve().parents[2]


class ServeProcess:
    def __init__(self, model_dir: Path, state_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(state_dir.parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--state-dir", str(state_dir), "--max-num-streams", "8", "--max-num-batched-tokens", "64",
             "--log-level", "warning", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})

    def wait_ready(self, timeout: float = 120) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError("not ready in time:\n" + self.output())

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-lm")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(pids: list[int], timeout: float = 5) -> bool:
    """multiprocessing's resource tracker leaves a moment after the launcher; nothing may stay longer."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_frontends_serve_48_concurrent_greedy_completions_like_one_by_one(model_dir, tmp_path):
    srv = ServeProcess(model_dir, tmp_path / "sessions", "--api-server-count", "2").wait_ready()
    try:
        assert len(srv.children()) >= 3  # the engine and two frontends (and multiprocessing's tracker)
        model = tiny_lm()
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(48)]
        expected = [greedy_reference(model, p, 8) for p in prompts]

        async def one(prompt):
            # a client per request: new connections spread over both frontends
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]

        async def main():
            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(main()) == expected
        frontends = {httpx.get(srv.url + "/health").json()["frontend"]["pid"] for _ in range(60)}
        assert len(frontends) == 2, frontends
    finally:
        srv.kill_all()


def test_engine_death_makes_the_server_unready_and_exit_nonzero(model_dir, tmp_path):
    srv = ServeProcess(model_dir, tmp_path / "sessions").wait_ready()
    try:
        engine_pid = httpx.get(srv.url + "/health").json()["engine"]["pid"]
        assert engine_pid != srv.proc.pid and alive(engine_pid)
        os.kill(engine_pid, signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(srv.url + "/health", timeout=2)
                if health.status_code == 503:
                    break
            assert time.monotonic() - t0 < 3, "still healthy after the engine died"
            time.sleep(0.05)
        assert health.json()["engine"]["alive"] is False
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert srv.proc.wait(15) != 0
        assert all_gone(srv.children())
    finally:
        srv.kill_all()


def test_sigterm_persists_sessions_and_leaves_no_process(model_dir, tmp_path):
    state = tmp_path / "sessions"
    srv = ServeProcess(model_dir, state).wait_ready()
    children = srv.children()
    sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
    assert httpx.post(srv.url + f"/v1/sessions/{sid}/append", json={"input_ids": [1, 2, 3]}).status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0, srv.output()
    assert all_gone(children)
    assert (state / f"{sid}.state.safetensors").is_file()


@pytest.mark.parametrize("async_scheduling", ["false", "true"])
def test_sigkill_of_everything_loses_no_acknowledged_step(model_dir, tmp_path, async_scheduling):
    """Every answered append survives a SIGKILL of the launcher, engine and frontends together; resumed streams
    continue exactly as one pass over all their inputs."""
    state = tmp_path / "sessions"
    srv = ServeProcess(model_dir, state, "--async-scheduling", async_scheduling).wait_ready()
    gen = torch.Generator().manual_seed(1)
    fed: dict[str, list[int]] = {}
    try:
        for _ in range(4):
            sid = httpx.post(srv.url + "/v1/sessions", json={}).json()["id"]
            fed[sid] = []
            for _ in range(3):
                chunk = torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
                r = httpx.post(srv.url + f"/v1/sessions/{sid}/append", json={"input_ids": chunk.tolist()})
                assert r.status_code == 200
                fed[sid] += chunk.tolist()
                assert r.json()["steps"] == len(fed[sid])
        fork = httpx.post(srv.url + f"/v1/sessions/{sid}/fork").json()["id"]
        fed[fork] = list(fed[sid])
    finally:
        srv.kill_all()  # no shutdown: nothing gets a chance to save anything now
    srv = ServeProcess(model_dir, state, "--async-scheduling", async_scheduling).wait_ready()
    try:
        for sid, inputs in fed.items():
            tail = [5, 6, 7]
            r = httpx.post(srv.url + f"/v1/sessions/{sid}/append", json={"input_ids": tail})
            assert r.status_code == 200, r.text
            assert r.json()["steps"] == len(inputs) + 3
            whole = httpx.post(srv.url + "/v1/forward", json={"input_ids": [inputs + tail]}).json()
            want = torch.tensor(whole["results"][0]["logits"][-3:])
            assert torch.allclose(torch.tensor(r.json()["results"]["logits"]), want, atol=1e-4)
    finally:
        srv.kill_all()


def test_websocket_compression_is_declined_unless_asked_for(model_dir, tmp_path):
    """A client that offers permessage-deflate (the websockets library and browsers do) gets plain frames from a
    default server, and deflate from one started with --ws-compression true."""
    from websockets.sync.client import connect

    for args, expected in (((), []), (("--ws-compression", "true"), ["permessage-deflate"])):
        srv = ServeProcess(model_dir, tmp_path / f"sessions{len(args)}", *args).wait_ready()
        try:
            with connect(f"ws://127.0.0.1:{srv.port}/v1/stream") as ws:  # offers deflate by default
                assert [ext.name for ext in ws.protocol.extensions] == expected
                ws.send('{"type": "open"}')
                assert '"opened"' in ws.recv(timeout=30)
                ws.send('{"type": "append", "input_ids": [1, 2, 3]}')
                assert '"outputs"' in ws.recv(timeout=30)
        finally:
            srv.kill_all()
