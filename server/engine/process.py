"""The engine core behind ZMQ: an input thread (frontends' requests -> the core's inbox), the busy loop
(schedule, run, postprocess) on the calling thread, and an output thread (one msgpack message per engine step per
frontend). Runs as its own process under `infomamba serve`, or on a thread (tests, embedding)."""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time

import zmq

from server.engine.core import EngineCore
from server.engine.protocol import (Add, Array, Hello, Sampling, StepOutputs, output_encoder, request_decoder)

log = logging.getLogger("infomamba.engine")


class EngineLoop:
    def __init__(self, core: EngineCore, input_address: str):
        self.core = core
        self.input_address = input_address
        self.stop_event = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PULL)
        self._input.bind(input_address)

    def run(self) -> None:
        """Serve until stop() (or SIGTERM in a process); then flush session writes and close."""
        self.core.store.start()
        threads = [threading.Thread(target=self._read_inputs, name="infomamba-engine-in", daemon=True),
                   threading.Thread(target=self._write_outputs, name="infomamba-engine-out", daemon=True)]
        for t in threads:
            t.start()
        try:
            while not self.stop_event.is_set():
                for client, outputs in self.core.run_once(timeout=0.05).items():
                    self._out.put((client, outputs))
        finally:
            self.stop_event.set()
            threads[0].join(timeout=5)
            self.core.shutdown()
            for client, outputs in self.core.take_outputs().items():
                self._out.put((client, outputs))
            self._out.put(None)
            threads[1].join(timeout=5)
            self._ctx.destroy(linger=0)
            log.info("engine stopped after %d steps", self.core.num_steps)

    def stop(self) -> None:
        self.stop_event.set()

    def _read_inputs(self) -> None:
        poller = zmq.Poller()
        poller.register(self._input, zmq.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(100):
                continue
            try:
                message = request_decoder.decode(self._input.recv(copy=False).buffer)
            except zmq.ZMQError:
                return
            except Exception as exc:  # a malformed message must not stop the engine
                log.error("dropped an undecodable message: %s", exc)
                continue
            if isinstance(message, Hello):
                self._out.put(("connect", message.client, message.address))  # before any output to it
            self.core.inbox.put(message)

    def _write_outputs(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        while (item := self._out.get()) is not None:
            if item[0] == "connect":
                _, client, address = item
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(address)
                sockets[client] = sock
                continue
            client, outputs = item
            sock = sockets.get(client)
            if sock is not None:
                sock.send(output_encoder.encode(outputs), copy=False)
        for sock in sockets.values():
            sock.close(linger=1000)


def warm_up(core: EngineCore) -> None:
    """One prefill and one decode step, so the first request doesn't pay for lazy init (kernels, graphs)."""
    import numpy as np

    cfg = core.model.config
    inputs = np.zeros(4, np.int64) if cfg.vocab_size is not None else np.zeros((4, cfg.d_input), np.float32)
    sampling = Sampling(max_tokens=2, temperature=0) if cfg.head == "lm" else None
    core.handle(Add("warmup", "warmup", Array.of(inputs), sampling=sampling))
    deadline = time.monotonic() + 600
    while core.has_work() and time.monotonic() < deadline:
        core.step()
    core.take_outputs()


def engine_main(config, model_dir: str | None, input_address: str, state_dir: str, log_level: str = "info") -> None:
    """The engine process: load the model, warm up, serve until SIGTERM. Exits non-zero when loading fails."""
    from server.serve import configure_logging, make_loader

    configure_logging(log_level)
    # The busy loop holds the GIL between torch calls; the input and output threads must not wait the default
    # 5 ms for it, or every step's outputs leave late.
    sys.setswitchinterval(0.0005)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process; the launcher stops us in order
    loop_holder: list[EngineLoop] = []
    signal.signal(signal.SIGTERM, lambda *_: loop_holder[0].stop() if loop_holder else os._exit(0))
    try:
        t0 = time.monotonic()
        model, tokenizer = make_loader(config, model_dir)()
        set_torch_threads(config.torch_threads)
        core = EngineCore(model, tokenizer, config, state_dir, model_dir=model_dir)
        describe(core)
        warm_up(core)
        num = core.sessions.pick_up_persisted()
        if num:
            log.info("picked up %d persisted sessions from %s", num, state_dir)
        loop = EngineLoop(core, input_address)
    except Exception as exc:
        log.error("engine failed to start: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        raise SystemExit(3) from None
    loop_holder.append(loop)
    log.info("engine ready in %.1f s (pid %d)", time.monotonic() - t0, os.getpid())
    loop.run()


def set_torch_threads(requested: int) -> None:
    """0 leaves torch's default. One thread with a GPU was tried on the H200 (bench/RESULTS.md) and gave no clear
    gain, so it is not the default; on a small CPU host, 1 can be much faster when other processes are busy."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    log.info("torch threads: %d", torch.get_num_threads())


def describe(core: EngineCore) -> None:
    info, cfg = core.info, core.model.config
    log.info("loaded %s: %.1fM parameters, %d layers, d_model %d, k %d, %s head; %s %s; kernels: %s",
             info.model_name, sum(p.numel() for p in core.model.parameters()) / 1e6, cfg.n_layers, cfg.d_model,
             cfg.n_concepts, cfg.head, core.model.device, str(core.model.dtype).replace("torch.", ""), info.kernels)
    log.info("state pool: %d streams x %.2f MiB; %d input steps per engine step; sessions in %s",
             info.num_slots, info.state_bytes_per_stream / 2**20, core.scheduler.max_num_batched_tokens,
             core.store.directory)
    if core.store.error:
        log.error("%s: sessions cannot be saved (their requests will fail with 507)", core.store.error)
