"""bench_server: the split of the engine's time from a server's counters; what a closed-loop client submits."""
import itertools

from prometheus_client import generate_latest

from server.metrics import Metrics
from tests.bench.bench_module import load_bench


def test_the_engine_line_splits_graph_and_eager_steps():
    bench = load_bench("bench_server")
    metrics = Metrics()
    before = bench.engine_counters(generate_latest(metrics.registry).decode())
    for seconds, replayed in [(0.001, True)] * 9 + [(0.011, False)]:  # nine graph steps of 1 ms, one eager of 11
        metrics.engine_steps.inc()
        metrics.forward_time.observe(seconds)
        if replayed:
            metrics.graph_steps.inc()
            metrics.graph_forward_time.inc(seconds)
    after = bench.engine_counters(generate_latest(metrics.registry).decode())
    e = bench.where_time_goes(before, after, seconds=0.1)
    assert abs(e["step_ms"] - 2.0) < 1e-9 and abs(e["graph"] - 0.9) < 1e-9
    assert abs(e["graph_step_ms"] - 1.0) < 1e-9 and abs(e["eager_step_ms"] - 11.0) < 1e-9
    assert "graph 1.000, eager 11.000 ms a step" in bench.engine_line(e)


def test_compiled_kernels_counts_without_raising(monkeypatch):
    """Off the interpreter, the count walks every kernels.* module's Triton functions (none compiled on a CPU)."""
    import kernels._triton as kt
    import kernels.ops  # noqa: F401  (imports every kernel module)

    assert kt.compiled_kernels() == 0  # under the interpreter: nothing is compiled
    monkeypatch.setattr(kt, "interpreting", lambda: False)
    assert kt.compiled_kernels() == 0


def test_schedule_runs_once_or_cycles_until_the_deadline(monkeypatch):
    """A fixed count submits each item once; a duration run cycles through them and stops taking new ones once
    the deadline has passed (checked as each is taken)."""
    bench = load_bench("bench_server")
    assert list(bench.schedule([1, 2, 3], None)) == [1, 2, 3]
    clock = itertools.count()  # each look at the clock is a second later
    monkeypatch.setattr(bench.time, "time", lambda: next(clock))
    assert list(bench.schedule([1, 2, 3], 7)) == [1, 2, 3, 1, 2, 3, 1]
    assert list(bench.schedule([], 1e9)) == []
