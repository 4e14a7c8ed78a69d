"""Every metric the server exports, in one place, on a per-app registry (several servers in one process don't
clash). Names follow vLLM's where the meaning matches, with the `infomamba:` prefix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BYTES_BUCKETS = tuple(2 ** i for i in range(10, 31, 2))


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "infomamba:"
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time from arrival to first scheduled step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_output = Histogram(p + "time_to_first_token_seconds",
                                              "Time from arrival to the first output (token or per-step output)",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_step = Histogram(p + "time_per_output_token_seconds",
                                              "Mean time per output step after the first, one observation per request",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to finish",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.forward_time = Histogram(p + "model_forward_time_seconds", "Time of one engine step (model + sampling)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_steps = Counter(p + "prompt_tokens", "Input steps fed (tokens or float vectors)", registry=r)
        self.generation_steps = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(p + "batch_size", "Streams per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram(p + "batch_tokens", "Input steps per engine step", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.engine_steps = Counter(p + "engine_steps", "Engine steps run", registry=r)
        self.graph_steps = Counter(p + "graph_steps", "Engine steps that replayed a CUDA graph (decode-only)",
                                   registry=r)
        self.kernels_compiled = Gauge(p + "triton_kernels_compiled", "Compiled variants of the Triton kernels (one "
                                      "per specialization, compiled at its first launch; growth while serving is "
                                      "steps that waited for the compiler)", registry=r)
        # beside model_forward_time: splits the model's time between graph replays and eager (mixed) steps
        self.graph_forward_time = Counter(p + "graph_forward_time_seconds", "Model time of the engine steps that "
                                          "replayed a CUDA graph", registry=r)
        self.requests_running = Gauge(p + "num_requests_running", "Requests in the running queue", registry=r)
        self.requests_waiting = Gauge(p + "num_requests_waiting", "Requests in the waiting queue", registry=r)
        self.slots_used = Gauge(p + "state_slots_used", "State pool slots in use", registry=r)
        self.slots_total = Gauge(p + "state_slots_total", "State pool slots", registry=r)
        self.state_bytes_per_stream = Gauge(p + "state_bytes_per_stream", "Bytes of state per stream", registry=r)
        self.sessions_live = Gauge(p + "sessions_live", "Sessions resident in the state pool", registry=r)
        self.sessions_spilled = Gauge(p + "sessions_spilled", "Sessions spilled to disk", registry=r)
        self.snapshot_bytes = Histogram(p + "snapshot_bytes", "Size of state snapshots written or read",
                                        buckets=BYTES_BUCKETS, registry=r)
        self.snapshot_save_time = Histogram(p + "snapshot_save_seconds", "Time to save a snapshot (incl. spills)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.snapshot_restore_time = Histogram(p + "snapshot_restore_seconds", "Time to restore a snapshot",
                                               buckets=LATENCY_BUCKETS, registry=r)
        # a shared state store (--state-store redis://...)
        self.store_writes = Counter(p + "state_store_writes", "Session snapshots written to the shared store, by "
                                    "result (ok, error)", ["result"], registry=r)
        self.store_write_bytes = Counter(p + "state_store_write_bytes", "Bytes of snapshots written to the shared "
                                         "store", registry=r)
        self.store_write_time = Histogram(p + "state_store_write_seconds", "Time to serialize and write one snapshot "
                                          "to the shared store", buckets=LATENCY_BUCKETS, registry=r)
        self.store_log_writes = Counter(p + "state_store_log_writes", "Log records (the inputs of one answered "
                                        "request) appended to the shared store, by result (ok, error)", ["result"],
                                        registry=r)
        self.store_log_write_bytes = Counter(p + "state_store_log_write_bytes", "Bytes of log records appended to "
                                             "the shared store", registry=r)
        self.store_log_write_time = Histogram(p + "state_store_log_write_seconds", "Time to append one engine "
                                              "step's log records to the shared store (one round trip)",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.store_reads = Counter(p + "state_store_reads", "Session snapshots loaded from the shared store",
                                   registry=r)
        self.store_read_time = Histogram(p + "state_store_read_seconds", "Time to take a session's lease and read "
                                         "its snapshot from the shared store", buckets=LATENCY_BUCKETS, registry=r)
        self.store_sessions_taken = Counter(p + "state_store_sessions_taken", "Sessions this replica took the lease "
                                            "of and loaded (resumed here, or taken over)", registry=r)
        self.store_fenced = Counter(p + "state_store_fenced_writes", "Writes refused by the shared store because "
                                    "this replica no longer owned the session", registry=r)
        self.replica_info = Gauge(p + "replica_info", "Always 1; its label names this replica (--replica-id, else "
                                  "its host name), for joining per-replica panels on `instance`", ["replica"],
                                  registry=r)
        self.gpu_memory = Gauge(p + "gpu_memory_bytes", "GPU memory held by torch (0 without a GPU)", ["kind"],
                                registry=r)

    def observe_step(self, batch, seconds: float) -> None:
        self.forward_time.observe(seconds)
        self.batch_size.observe(len(batch.chunks))
        self.batch_tokens.observe(batch.num_tokens)
        self.engine_steps.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EdgeMetrics:
    """What a frontend measures itself; /metrics joins it with the engine's."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("infomamba:" + "http_requests", "HTTP requests and websocket frames by route and "
                                     "status (of the frontend that answered the scrape)", ["route", "status"],
                                     registry=r)
        self._counted: dict[tuple[str, int], object] = {}  # (route, status) -> its counter

    def count_request(self, route: str, status: int) -> None:
        counter = self._counted.get((route, status))
        if counter is None:
            counter = self._counted[route, status] = self.http_requests.labels(route, str(status))
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
