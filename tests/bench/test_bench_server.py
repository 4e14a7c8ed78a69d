"""bench_server: the split of the engine's time from a server's counters; what a closed-loop client submits; its HTTP
load generator through aiohttp and httpx."""
import asyncio
import itertools
import socket
import sys

import pytest
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
    assert e["request_ms"] is None and bench.Run(10, 0.1, [0.01]).hops_line() == ""


def test_a_run_says_what_a_request_spends_outside_the_engine():
    """The engine's mean request time (arrival to finish) and first token, from its histograms, beside the
    client's means."""
    bench = load_bench("bench_server")
    metrics = Metrics()
    before = bench.engine_counters(generate_latest(metrics.registry).decode())
    for seconds in (0.008, 0.010):
        metrics.e2e_latency.observe(seconds)
        metrics.time_to_first_output.observe(seconds / 10)
    run = bench.Run(64, 0.1, [0.011, 0.013], ttfts=[0.003, 0.003])
    run.engine = bench.where_time_goes(before, bench.engine_counters(generate_latest(metrics.registry).decode()),
                                       run.seconds)
    assert abs(run.engine["request_ms"] - 9.0) < 1e-9 and abs(run.engine["first_ms"] - 0.9) < 1e-9
    line = run.hops_line()
    assert "12.00 ms at the client, 9.00 in the engine (arrival to finish): 3.00 ms outside it" in line
    assert "first token 3.00 at the client, 0.90 in the engine" in line


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


@pytest.mark.parametrize("library", ["aiohttp", "httpx"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "sse"])
def test_the_http_load_generator_counts_alike_through_either_library(library, stream, monkeypatch):
    """bench_server's closed-loop HTTP client against the real frontend (engine faked, bench_edge): steps, latency
    and TTFT per completion through aiohttp and httpx alike, and a refused request raises."""
    if library == "aiohttp":
        pytest.importorskip("aiohttp")
    import uvicorn

    bench, edge = load_bench("bench_server"), load_bench("bench_edge")
    for name in ("EngineClient", "_learn_model"):  # fake_app replaces them: put them back afterwards
        monkeypatch.setattr(edge.app_module, name, getattr(edge.app_module, name))
    sock = socket.create_server(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]

    async def run():
        server = uvicorn.Server(uvicorn.Config(edge.fake_app(), log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        tally = {"lat": [], "ttft": [], "steps": 0}
        try:
            async with bench.HTTP_CLIENTS[library](url, 6) as client:
                await asyncio.gather(*(bench.http_client(client, [edge.PROMPT] * 3, 8, stream, None, tally)
                                       for _ in range(2)))
                with pytest.raises(RuntimeError, match="failed: 4"):
                    await bench.http_client(client, [[]], 8, stream, None, tally)
        finally:
            server.should_exit = True
            await serving
        return tally

    tally = asyncio.run(run())
    assert len(tally["lat"]) == 6 and tally["steps"] == 6 * (len(edge.PROMPT) + 8)
    assert len(tally["ttft"]) == (6 if stream else 0)
    assert all(0 < t < lat for t, lat in zip(tally["ttft"], tally["lat"]))


def test_the_http_library_defaults_to_aiohttp_when_installed(monkeypatch):
    bench = load_bench("bench_server")
    assert bench.http_library("httpx") == "httpx"
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # not importable
    assert bench.http_library() == "httpx"


def test_a_streamed_chunk_counts_its_tokens():
    """A frontend behind its engine joins waiting tokens into one chunk (requests.generate join_ready): the load
    generator counts token_ids, not chunks."""
    bench = load_bench("bench_server")
    joined = 'data: {"choices":[{"index":0,"text":"ab","finish_reason":null,"token_ids":[97,98]}]}'
    assert bench.chunk_tokens(joined) == 2
    assert bench.chunk_tokens('data: {"choices":[{"index":0,"text":"a","finish_reason":null,"token_ids":[97]}]}') == 1
    assert bench.chunk_tokens('data: {"choices":[{"index":0,"text":"","finish_reason":null,"token_ids":[]}]}') == 0
