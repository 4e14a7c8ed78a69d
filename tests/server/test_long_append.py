"""The engine's long-append path (issue 14): one session fed frames of thousands of ids, no outputs, 8 in flight.

On any device: the frames' answers and the session's state agree with the model alone fed the same ids. On a GPU
(INFOMAMBA_TEST_DEVICE=cuda) also: nothing on the path waits for the device. The GPU is first kept busy
(torch.cuda._sleep), then the frames go through the engine under torch.cuda.set_sync_debug_mode("error"): an
explicit sync raises, and an implicit one (a copy from pageable memory that the driver stages in step with the
stream, say) stalls the engine until the sleep ends, so the GPU must still be asleep once every step is launched,
and, where no snapshot is due, once every frame is answered (an answer waits for its log record, not the GPU).

    INFOMAMBA_TEST_DEVICE=cuda python -m pytest -q tests/server/test_long_append.py
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from server.config import ServerConfig
from server.engine.core import EngineCore
from server.engine.process import warm_up
from server.engine.protocol import Add, Array, SessionOp
from tests.server.conftest import TEST_DEVICE, tiny_lm

FRAME = 2048 if TEST_DEVICE.startswith("cuda") else 256  # the CPU runs the sequential reference ops
NUM_FRAMES = 4  # each step launches ~100 kernels: four stay well inside the device's queue of pending launches
SLEEP_SECONDS = 3.0
on_gpu = pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="needs INFOMAMBA_TEST_DEVICE=cuda")


def start(tmp_path, snapshot_every: int) -> tuple[EngineCore, str, np.ndarray]:
    """An engine with its store's writer running, a session, and one frame already fed (kernels compiled for
    the frame's shape, and the background snapshot's path run once when snapshot_every <= FRAME)."""
    config = ServerConfig(max_num_streams=4, max_num_batched_tokens=64, max_num_prefill_tokens=FRAME,
                          snapshot_every=snapshot_every)
    core = EngineCore(tiny_lm(), None, config, str(tmp_path / "sessions"))
    core.store.start()
    warm_up(core)
    core.handle(SessionOp("c", "create", "create"))
    sid = run(core, lambda got: "create" in got[1])[1]["create"].session
    first = np.random.default_rng(1).integers(0, 260, FRAME)
    core.handle(Add("c", "warm", Array.of(first), session=sid))
    assert "warm" in run(core, lambda got: "warm" in got[0])[0]
    return core, sid, first


def run(core: EngineCore, done, seconds: float = 60.0, got=None) -> tuple[dict, dict]:
    """Engine turns until done((finishes by rid, replies by rid)) or `seconds` pass."""
    got = got or ({}, {})
    deadline = time.monotonic() + seconds
    while not done(got) and time.monotonic() < deadline:
        for batch in core.run_once(timeout=0.001).values():
            for out in batch.request_outputs():
                assert out.error is None, out.error
                if out.finish_reason is not None:
                    got[0][out.rid] = out
            got[1].update({r.rid: r for r in batch.replies})
    return got


def feed(core: EngineCore, sid: str) -> list[np.ndarray]:
    frames = [np.random.default_rng(2 + i).integers(0, 260, FRAME) for i in range(NUM_FRAMES)]
    for i, ids in enumerate(frames):
        core.handle(Add("c", f"f{i}", Array.of(ids), session=sid, wait_if_busy=True))
    return frames


def check_state(core: EngineCore, sid: str, ids: np.ndarray, got: dict) -> None:
    assert sorted(got) == sorted(f"f{i}" for i in range(NUM_FRAMES)), sorted(got)
    assert [got[f"f{i}"].steps for i in range(NUM_FRAMES)] == [FRAME * (i + 2) for i in range(NUM_FRAMES)]
    model = core.model
    with torch.inference_mode():
        _, alone = model(torch.from_numpy(ids)[None].to(model.device), model.empty_state(1))
    served = core.pool.read(core.sessions.get(sid).slot).tensors()
    for name, tensor in alone.tensors().items():
        torch.testing.assert_close(served[name], tensor, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("snapshot_every", [1 << 30, FRAME // 2])
def test_a_long_append_matches_the_model_alone(tmp_path, snapshot_every):
    core, sid, first = start(tmp_path, snapshot_every)
    try:
        frames = feed(core, sid)
        got = run(core, lambda got: len(got[0]) == NUM_FRAMES)[0]
        check_state(core, sid, np.concatenate([first, *frames]), got)
        run(core, lambda got: not core._held)
        if snapshot_every <= FRAME:  # snapshots came in the background, after frames that reached the threshold
            assert core.store.persisted_sessions()[sid] >= 2 * FRAME
    finally:
        core.shutdown()


def sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spins for `seconds` (measured: clocks differ by card)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * seconds / (start.elapsed_time(end) / 1000))


@on_gpu
@pytest.mark.parametrize("snapshot_every", [1 << 30, FRAME // 2], ids=["log-only", "with-snapshots"])
def test_a_long_append_never_waits_for_the_gpu(tmp_path, snapshot_every):
    core, sid, first = start(tmp_path, snapshot_every)
    try:
        torch.cuda.synchronize()
        steps_before = core.num_steps
        cycles = sleep_cycles(SLEEP_SECONDS)
        logs_only = snapshot_every > FRAME * (NUM_FRAMES + 1)
        torch.cuda._sleep(cycles)  # the GPU is busy for SLEEP_SECONDS from here
        t0 = time.monotonic()
        torch.cuda.set_sync_debug_mode("error")
        try:
            frames = feed(core, sid)
            # with a snapshot due, answers after it wait for its copy (on the writer thread): only the launches count
            got = run(core, lambda got: core.num_steps - steps_before >= NUM_FRAMES
                      and (not logs_only or len(got[0]) == NUM_FRAMES), seconds=SLEEP_SECONDS * 2 / 3)
            elapsed = time.monotonic() - t0
            asleep = not torch.cuda.current_stream().query()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        launched, answered = core.num_steps - steps_before, len(got[0])
        assert launched == NUM_FRAMES, f"{launched} of {NUM_FRAMES} steps launched in {elapsed:.2f} s"
        if logs_only:
            assert answered == NUM_FRAMES, f"{answered} of {NUM_FRAMES} frames answered in {elapsed:.2f} s"
        assert asleep, (f"the GPU finished its {SLEEP_SECONDS} s sleep before the engine had launched every step "
                        f"({elapsed:.2f} s): something on the path waited for the device")
        torch.cuda.synchronize()
        got = run(core, lambda got: len(got[0]) == NUM_FRAMES, got=got)[0]
        check_state(core, sid, np.concatenate([first, *frames]), got)
    finally:
        core.shutdown()
