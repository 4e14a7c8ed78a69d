"""One preallocated pool of per-stream state; a stream owns a slot index from a free list (STYLE.md)."""
from __future__ import annotations

import threading

import torch

from model.infomamba import InfoMamba
from model.state import StreamState, state_nbytes_per_stream

CPU_NUM_STREAMS = 64
MAX_AUTO_STREAMS = 16384


def auto_num_streams(model: InfoMamba, gpu_memory_fraction: float) -> int:
    """Slots that fit in a share of the GPU memory left free after loading; a fixed 64 on the CPU."""
    if model.device.type != "cuda":
        return CPU_NUM_STREAMS
    free, _ = torch.cuda.mem_get_info(model.device)
    per_stream = state_nbytes_per_stream(model.config, model.dtype)
    return max(1, min(MAX_AUTO_STREAMS, int(free * gpu_memory_fraction) // per_stream))


class StatePool:
    """`max_num_streams` state slots allocated once. Slots are handed out and returned, never reallocated.

    Only the engine thread reads or writes the tensors; the free list is guarded so other threads may read counts.
    """

    def __init__(self, model: InfoMamba, max_num_streams: int):
        if max_num_streams < 1:
            raise ValueError(f"max_num_streams: expected >= 1, got {max_num_streams}")
        self.state: StreamState = model.empty_state(max_num_streams)
        self.num_total = max_num_streams
        self._free = list(range(max_num_streams - 1, -1, -1))  # pop() hands out low slots first
        self._used: set[int] = set()
        self._unzeroed: set[int] = set()  # handed out, still holding a previous stream's state
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def allocate(self) -> int | None:
        """A slot for a fresh stream, or None when every slot is taken. Engine thread only.

        The slot is zeroed by the next zero_allocated() (the runner calls it before each step) or before anything
        reads it, so the slots a step admits are zeroed together: one indexed write per state tensor, where one
        slot at a time was a fifth of the engine thread's time at 256 streams (H200 profile)."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            self._used.add(slot)
        self._unzeroed.add(slot)
        return slot

    def zero_allocated(self) -> None:
        if self._unzeroed:
            self.state.reset(sorted(self._unzeroed))
            self._unzeroed.clear()

    def free(self, slot: int) -> None:
        with self._lock:
            if slot not in self._used:
                raise ValueError(f"slot {slot} is not allocated")
            self._used.remove(slot)
            self._free.append(slot)
        self._unzeroed.discard(slot)

    def read(self, slot: int, device=None) -> StreamState:
        """A batch-1 copy of one slot (for snapshots), on `device` if given."""
        self.zero_allocated()
        state = self.state.select([slot])
        return state if device is None else state.to(device)

    def read_to_host(self, slot: int, *extra: torch.Tensor | None
                     ) -> tuple[StreamState, list[torch.Tensor | None], torch.cuda.Event | None]:
        """A host copy of one slot, and of each `extra` tensor (a session's last logits), for a snapshot, taken
        without waiting for the device: on a GPU the copies are queued behind the steps that wrote the slot and
        land in pinned memory; read them only once the returned event has happened (None: ready now). The
        engine thread never waits on it; the store's writer thread does, before it serializes."""
        self.zero_allocated()
        state = self.state.select([slot])  # a copy on the device: later steps may move the slot on
        if state.steps.device.type != "cuda":
            return state, [None if t is None else t.detach().to("cpu", copy=True) for t in extra], None
        host = state._map(lambda name, t, axis: _to_pinned(t))
        extra_host = [None if t is None else _to_pinned(t) for t in extra]
        ready = torch.cuda.Event()
        ready.record()
        return host, extra_host, ready

    def write(self, slot: int, state: StreamState) -> None:
        self._unzeroed.discard(slot)  # overwritten whole
        self.state.assign([slot], state)

    def copy(self, src: int, dst: int) -> None:
        self.zero_allocated()
        self.state.assign([dst], self.state.select([src]))

    def steps(self, slot: int) -> int:
        self.zero_allocated()
        return int(self.state.steps[slot])


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor in pinned host memory, queued on the current stream (valid once it has run); a
    host tensor is copied at once. Pinned blocks come from torch's caching host allocator, which does not hand a
    block out again before the copies queued on it are done."""
    if t.device.type != "cuda":
        return t.detach().clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
