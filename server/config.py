"""The server's settings: one dataclass, validated on construction; the CLI and env vars fill it."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    max_num_streams: int = 64  # state pool slots: live sessions + in-flight requests; 0: sized from free GPU memory
    gpu_memory_fraction: float = 0.5  # share of free GPU memory (after loading) the pool may take when sized
    max_num_batched_tokens: int = 2048  # input steps per engine step (prefill chunks + decode steps)
    max_num_prefill_tokens: int = 65_536  # input steps per engine step while no stream decodes (long appends)
    # decode-only steps (CUDA graphs) a decoding batch may run while new inputs wait, before a mixed (eager) step
    # takes them in together: a step that mixes even one prompt in runs eager (H200: 3.3 ms where a graph step takes
    # 1.4 at 256 streams); 0: every step takes in what waits. Only with CUDA graphs, and only for inputs too long
    # for the prefill graphs (those go in at once: their step replays a graph as well)
    max_prefill_wait_steps: int = 4
    max_queue: int = 256  # requests waiting for a slot before 429
    max_num_sessions: int = 10_000  # sessions in memory and on disk before 429
    max_body_bytes: int = 16 * 1024 * 1024  # 413 above
    max_request_steps: int = 65_536  # input steps + max_tokens of one request, 413 above
    max_batch_sequences: int = 64  # sequences in one /v1/forward request
    max_ws_frame_bytes: int = 16 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024  # estimated size of one answer's outputs, 413 above
    session_ttl: float = 600.0  # seconds idle before a session is spilled to disk
    state_dir: str | None = None  # where sessions are written through and persist; None: a temporary directory
    snapshot_every: int = 4096  # a session's logged steps before its state is snapshotted (and its log dropped)
    max_log_bytes: int = 64 * 1024 * 1024  # the write-ahead log segment size that starts a compacting rotation
    state_store: str | None = None  # redis://host:port/db or rediss://: a store shared by replicas; None: state_dir
    state_store_mode: str = "sync"  # sync: acknowledged once the store has it; async: acknowledged before (see README)
    state_lease_ttl: float = 10.0  # seconds a dead replica's sessions stay locked before another may take them
    replica_id: str | None = None  # this replica's name on its session leases; None: hostname-pid-random
    torch_threads: int = 0  # the engine's torch threads; 0: on a CPU, the CPUs the frontends leave, else torch's
    # HTTP frontend processes sharing the port, all talking to one engine process; 0: one per 4 CPUs, at most 4 (on
    # an H200 host four frontends gave 1.3-1.6x one's throughput at 64+ clients; bench/RESULTS.md)
    api_server_count: int = 0
    api_key: str | None = None  # bearer token for HTTP and websocket; None: no auth
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs (CUDA + Triton kernels only)
    # with cuda_graphs, steps whose chunks are all <= 64 steps (decodes beside short prompts or appends) replay graphs
    # of padded layouts too (server/engine/prefill_graphs.py), on models of recurrent layers only
    prefill_graphs: bool = True
    # launch each step before the last one's sampled tokens reach the host (server/engine/core.py): the host's
    # work between steps then overlaps the device's. "auto": on where the device's decode step takes longer than
    # the host's work around one (measured at warm-up, server/engine/process.py)
    async_scheduling: bool | str = "auto"
    # permessage-deflate on the websocket when a client offers it (browsers and the websockets library do): off, since
    # zlib over an answer's float32 outputs or a frame of ids costs the frontend far more CPU than it saves on a LAN
    ws_compression: bool = False

    @property
    def num_api_servers(self) -> int:
        if self.api_server_count:
            return self.api_server_count
        return min(4, max(1, len(os.sched_getaffinity(0)) // 4))

    def __post_init__(self) -> None:
        for name in ("port", "max_num_streams", "max_num_batched_tokens", "max_queue", "max_num_sessions",
                     "max_body_bytes", "max_request_steps", "max_batch_sequences", "max_ws_frame_bytes",
                     "max_response_bytes", "torch_threads", "max_num_prefill_tokens", "snapshot_every",
                     "max_prefill_wait_steps", "api_server_count",
                     "max_log_bytes"):
            value = getattr(self, name)
            may_be_zero = name in ("port", "max_num_streams", "torch_threads", "max_prefill_wait_steps",
                                   "api_server_count")
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if may_be_zero else 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_fraction <= 0.95:
            raise ValueError(f"gpu_memory_fraction: expected a fraction in (0, 0.95], got {self.gpu_memory_fraction!r}")
        if self.max_num_streams and self.max_num_batched_tokens < self.max_num_streams:
            raise ValueError(f"max_num_batched_tokens: must be >= max_num_streams ({self.max_num_streams}), "
                             f"got {self.max_num_batched_tokens}")
        if not self.session_ttl > 0:
            raise ValueError(f"session_ttl: expected > 0 seconds, got {self.session_ttl!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.state_store == "":
            self.state_store = None
        if self.state_store is not None and not self.state_store.startswith(("redis://", "rediss://")):
            raise ValueError(f"state_store: expected a redis:// or rediss:// URL, got {self.state_store!r}")
        if self.state_store_mode not in ("sync", "async"):
            raise ValueError(f"state_store_mode: expected sync or async, got {self.state_store_mode!r}")
        if not 0.5 <= self.state_lease_ttl <= 3600:
            raise ValueError(f"state_lease_ttl: expected 0.5 to 3600 seconds, got {self.state_lease_ttl!r}")
        if self.api_key == "":
            self.api_key = None
        if self.async_scheduling not in (True, False, "auto"):
            raise ValueError(f"async_scheduling: expected true, false or auto, got {self.async_scheduling!r}")
