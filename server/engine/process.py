"""The engine core behind a Unix socket (server/engine/transport.py), on one thread: each turn of the busy loop
takes what the frontends sent (without waiting while there is work), runs one step (schedule, run, postprocess)
and sends each frontend one msgpack message with the step's outputs. Runs as its own process under
`infomamba serve`, or on a thread (tests).

One thread, not an input and an output thread beside the loop: every torch call releases the GIL, and a helper
thread that takes it then holds the loop up until the interpreter switches back (measured on an H200: the model
step took 2.8x as long under HTTP load as without it). Decoding and encoding a message cost microseconds; doing
them between steps costs less than that handover. Other threads (the session store's writers) post to the core's
inbox and wake the loop through a pipe."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from server import hops
from server.engine.core import EngineCore
from server.engine.protocol import (Add, Array, Hello, Sampling, StepOutputs, output_encoder, request_decoder)
from server.engine.transport import EngineListener

log = logging.getLogger("infomamba.engine")
IDLE_POLL_MS = 100  # how long an idle loop sleeps between checks of the stop flag
OVERLAP_SENDS = os.environ.get("INFOMAMBA_OVERLAP_SENDS", "1") != "0"  # 0: send each step's outputs after it


class EngineLoop:
    def __init__(self, core: EngineCore, input_address: str):
        self.core = core
        self.input_address = input_address
        self.stop_event = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.listener = EngineListener(input_address, extra_fds=(self._wake_read,))
        core.on_post = self._wake
        # the last step's outputs, sent once the next step is launched (its GPU time hides the encoding and the
        # sends; on an H200 the loop's work between steps took 0.14-0.34 ms a step beside 0.3-0.7 in it)
        self._pending: dict[str, StepOutputs] | None = None
        if OVERLAP_SENDS:
            core.runner.while_launched = self._send_pending

    def run(self) -> None:
        """Serve until stop() (or SIGTERM in a process); then flush session writes and close."""
        self.core.store.start()
        try:
            while not self.stop_event.is_set():
                self.turn()
        finally:
            self.stop_event.set()
            self._send_pending()
            self.core.shutdown()
            self._send(self.core.take_outputs())
            self.close(flush_s=1.0)
            log.info("engine stopped after %d steps", self.core.num_steps)

    def close(self, flush_s: float = 0.0) -> None:
        """Close the socket and the wake-up pipe, first sending what is queued for up to flush_s."""
        self.listener.flush(flush_s)
        self.listener.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def turn(self) -> None:
        """One turn of the loop: take in what arrived (sleeping while there is nothing to do), run one step, send."""
        idle = not self.core.has_work() and self.core.inbox.empty()
        frames, fired = self.listener.poll(IDLE_POLL_MS if idle else 0)
        if fired:
            self._drain_wakes()
        if frames:
            self._receive(frames)
        outputs = self.core.run_once(timeout=0)
        self._send_pending()  # no step was launched, so the hook did not send them
        if self.core.has_work() and not self.core.running_ahead:
            self._pending = outputs  # sent while the GPU runs the next step
        else:
            self._send(outputs)  # the GPU runs a step already (async scheduling), or the loop may sleep next: now

    def stop(self) -> None:
        self.stop_event.set()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):  # full: a wake is pending anyway; closed: the loop is gone
            pass

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _receive(self, frames) -> None:
        """The messages that came, handled in arrival order."""
        for conn, frame in frames:
            try:
                message = request_decoder.decode(frame)
            except Exception as exc:  # a malformed message must not stop the engine
                log.error("dropped an undecodable message: %s", exc)
                continue
            if isinstance(message, Hello):
                self.listener.name(conn, message.client)  # before any output to it
            elif hops.enabled() and isinstance(message, Add):
                hops.mark("en.recv")
            self.core.handle(message)

    def _send_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self._send(pending)

    def _send(self, by_client: dict[str, StepOutputs]) -> None:
        for client, outputs in by_client.items():
            payload = output_encoder.encode(outputs)
            if hops.enabled() and any(out.finish_reason is not None for out in outputs.outputs):
                hops.mark("en.sent")  # handed to the socket (marked first: the frontend may read it at once)
            self.listener.send(client, payload)


def warm_up(core: EngineCore) -> None:
    """One prefill and one decode step, so the first request doesn't pay for lazy init (kernels, graphs), and on a
    GPU an eager pass of every layout class the kernels compile a variant for."""
    import numpy as np

    t0 = time.monotonic()
    warm_kernels = getattr(core.runner, "warm_up_kernels", None)  # a test's fake runner has none
    passes = warm_kernels(core.scheduler.max_num_prefill_tokens) if warm_kernels else 0
    if passes:
        log.info("kernels warmed up on %d layouts in %.1f s", passes, time.monotonic() - t0)
    cfg = core.model.config
    inputs = np.zeros(4, np.int64) if cfg.vocab_size is not None else np.zeros((4, cfg.d_input), np.float32)
    sampling = Sampling(max_tokens=2, temperature=0) if cfg.head == "lm" else None
    core.handle(Add("warmup", "warmup", Array.of(inputs), sampling=sampling))
    deadline = time.monotonic() + 600
    while core.has_work() and time.monotonic() < deadline:
        core.step()
    core.take_outputs()
    choose_async_scheduling(core)
    core.refresh_metrics()  # the compiled kernels' baseline: a variant compiled from here on is logged


AUTO_PROBE_STEPS = 16  # decode steps timed by choose_async_scheduling, each way
# how much longer than the host's work the device's step must be: the probe runs one stream, and the host's work a
# step grows with the streams (H200: 0.13-0.25 ms at 1, 0.3-0.45 ms at 16-64; bench/RESULTS.md)
AUTO_MARGIN = 2.0


def choose_async_scheduling(core: EngineCore) -> None:
    """async_scheduling "auto": on where the device takes longer over a decode step than the host's work around one,
    by AUTO_MARGIN (that work then hides behind the device's; where the host is the slower, reading each step back
    before the next costs less than feeding tokens on the device: H200, bundled model, bench/RESULTS.md). Times, at
    batch 1, whole engine steps read back at once, and the decode graph alone."""
    import statistics

    import numpy as np
    import torch

    if core.config.async_scheduling != "auto":
        return
    graphs = getattr(core.runner, "graphs", None)
    if graphs is None or not hasattr(core.runner, "launch"):
        log.info("async scheduling: off (no CUDA graphs: nothing runs beside the host)")
        return
    sampling = Sampling(max_tokens=AUTO_PROBE_STEPS + 1, temperature=0, ignore_eos=True)
    core.handle(Add("warmup", "warmup-async", Array.of(np.zeros(4, np.int64)), sampling=sampling))
    walls = []
    while core.has_work():
        t0 = time.perf_counter()
        batch = core.step()
        if batch is not None and batch.num_decodes == len(batch.chunks):
            walls.append(time.perf_counter() - t0)
    core.take_outputs()
    slot = core.pool.allocate()  # a real slot: on pad slots the kernels skip their work
    try:
        core.pool.zero_allocated()
        tokens = torch.zeros(1, dtype=torch.long, device=core.model.device)
        slots = torch.tensor([slot], dtype=torch.int32, device=core.model.device)
        graphs(tokens, slots)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(AUTO_PROBE_STEPS):
            graphs(tokens, slots)
        end.record()
        end.synchronize()
        device_ms = start.elapsed_time(end) / AUTO_PROBE_STEPS
    finally:
        core.pool.free(slot)
    step_ms = 1e3 * statistics.median(walls)
    host_ms = max(step_ms - device_ms, 0.0)
    core.async_scheduling = device_ms >= AUTO_MARGIN * host_ms
    log.info("async scheduling: %s (a decode step: %.3f ms on the device, %.3f ms of host work around it)",
             "on" if core.async_scheduling else "off", device_ms, host_ms)


def engine_main(config, model_dir: str | None, input_address: str, state_dir: str, log_level: str = "info") -> None:
    """The engine process: load the model, warm up, serve until SIGTERM. Exits non-zero when loading fails."""
    from server.serve import configure_logging, make_loader

    configure_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process; the launcher stops us in order
    loop_holder: list[EngineLoop] = []
    signal.signal(signal.SIGTERM, lambda *_: loop_holder[0].stop() if loop_holder else os._exit(0))
    try:
        t0 = time.monotonic()
        model, tokenizer = make_loader(config, model_dir)()
        set_torch_threads(config, model.device.type)
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


def set_torch_threads(config, device_type: str) -> None:
    """--torch-threads, or by default: on a CPU, the CPUs the frontends leave free (torch's default takes every CPU
    and then fights the frontends for them: on 2 cores, one thread was 1.7x faster, issue 8); with a GPU, torch's
    default (one thread gave no clear gain on the H200, bench/RESULTS.md)."""
    import torch

    threads = config.torch_threads
    if not threads and device_type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) - config.num_api_servers)
    if threads:
        torch.set_num_threads(threads)
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
