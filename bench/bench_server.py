"""The server against the engine it wraps, in one run: what `infomamba serve` delivers to outside clients over
HTTP and websockets beside the same work driven through an EngineCore in this process (same config, no HTTP),
and a long append beside the model alone. Prints progress, one line per measurement, and a markdown summary.

    python bench/bench_server.py                                # bundled model, full sizes (GPU)
    OMP_NUM_THREADS=1 python bench/bench_server.py --concurrency 1 4 --seconds 1 --ws-sessions 8 --chunks 4 \
        --long-ids 4096 --frame 1024 --api-server-counts 1 2    # a quick CPU run

Phases: (1) completions, greedy, ignore_eos, at each concurrency: engine direct, HTTP and HTTP streaming (SSE)
through the server; steps/s counts prompt + generated steps; (2) websocket appends of --chunk-steps chunks on
--ws-sessions sessions, each cycling through its --chunks prepared chunks: engine direct (one outstanding per
session), websocket one at a time, websocket with --window frames in flight; (3) one session fed --long-ids ids
in binary int32 frames of --frame ids, no outputs: websocket, engine direct and the model alone (model(chunk,
state) with the state carried). (1) and (2) run against a server per --api-server-counts value, (3) against the
first. Clients are closed loops spread over min(--client-procs, c) processes, each running asyncio; they start
together after their setup. The HTTP clients of a process share one aiohttp session (--http-client; httpx where
aiohttp is not installed, at 1.7-42x its CPU per request: bench/bench_http_client.py).

How long a run lasts: every measured run of (1) and (2) lasts --seconds of wall time (a run of a fixed count of
requests lasts 0.2-0.8 s on an H200, where one stall or GC pause decides the figure): from the common start, each
closed-loop client keeps submitting (completions: its share of the prompts, over and over; sessions: their chunks,
over and over) until --seconds have passed, then submits nothing more and its in-flight requests finish.
Throughput = the steps of every completed request or append / the time from the common start to the last finish
(the drain included: the engine's counters and the CPU-busy shares cover that same window), for engine direct
and the server alike; latency and TTFT percentiles are over every completed request. With --requests, each level
runs a fixed count of completions instead (and each session its --chunks appends once), as before. The untimed
warm-up runs and the long append (3) are a fixed amount of work either way. With --rounds N, the completions of
each level run N times, engine direct (kept loaded beside the server) and the server's HTTP and SSE in turn; the
summary reads the median run of each and lists every round's ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import aclosing
from importlib.metadata import PackageNotFoundError, version
from itertools import cycle
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
T_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {message}", flush=True)


class Run:
    """One measurement: steps moved, wall seconds, per-request latencies and times to first token (seconds)."""

    def __init__(self, steps, seconds, latencies, ttfts=(), procs=1):
        self.steps, self.seconds, self.latencies, self.ttfts, self.procs = steps, seconds, latencies, list(ttfts), procs
        self.rate = steps / seconds
        self.engine: dict | None = None  # where_time_goes() of the engine during this run
        self.client_busy: float | None = None  # the busiest load generator's CPU seconds per second
        self.server_busy: dict[str, float] = {}  # per server process (engine, frontend-N): CPU seconds per second

    def line(self, name: str, base: "Run | None" = None, of: str = "engine") -> str:
        text = f"  {name:<26} {self.rate:12,.0f} steps/s   {self.seconds:6.2f} s"
        text += f", {len(self.latencies):,} done" if self.latencies else ""
        text += f"   latency p50/p99 {pp(self.latencies)} ms"
        text += f"   ttft p50/p99 {pp(self.ttfts)} ms" if self.ttfts else ""
        text += f"   x{self.rate / base.rate:.2f} of {of}" if base else ""
        if self.client_busy is not None:
            text += f"\n    CPU busy: busiest client {self.client_busy:.2f}" + "".join(
                f", {name} {busy:.2f}" for name, busy in sorted(self.server_busy.items()))
        return text + ("\n" + engine_line(self.engine) if self.engine else "") + self.hops_line()

    def hops_line(self) -> str:
        """The client's mean request time (and first token) against the engine's own, from arrival to finish: the
        difference is what the trip between them costs a request."""
        e = self.engine or {}
        if e.get("request_ms") is None or not self.latencies:
            return ""
        client = 1e3 * statistics.fmean(self.latencies)
        text = (f"\n    a request, mean: {client:.2f} ms at the client, {e['request_ms']:.2f} in the engine "
                f"(arrival to finish): {client - e['request_ms']:.2f} ms outside it")
        if self.ttfts and e.get("first_ms") is not None:
            first = 1e3 * statistics.fmean(self.ttfts)
            text += f"; first token {first:.2f} at the client, {e['first_ms']:.2f} in the engine"
        return text


def pp(values) -> str:
    """p50 / p99 in ms."""
    return "%.1f / %.1f" % tuple(np.percentile(values, [50, 99]) * 1e3) if len(values) else "-"


ENGINE_SERIES = {"infomamba:engine_steps_total": "steps", "infomamba:batch_size_sum": "streams",
                 "infomamba:batch_tokens_sum": "tokens", "infomamba:model_forward_time_seconds_sum": "forward",
                 "infomamba:graph_steps_total": "graph", "infomamba:graph_forward_time_seconds_total": "graph_forward",
                 "infomamba:triton_kernels_compiled": "compiled",
                 # the engine's own view of a request (arrival to finish, to first token): beside the client's, what
                 # the hops cost (client, HTTP, frontend, the engine's socket, both ways)
                 "infomamba:e2e_request_latency_seconds_sum": "e2e", "infomamba:e2e_request_latency_seconds_count":
                 "requests", "infomamba:time_to_first_token_seconds_sum": "first",
                 "infomamba:time_to_first_token_seconds_count": "firsts"}


def engine_counters(text: str) -> dict:
    """The engine's step counters from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    found = dict.fromkeys(ENGINE_SERIES.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ENGINE_SERIES:
                found[ENGINE_SERIES[sample.name]] += sample.value
    return found


def where_time_goes(before: dict, after: dict, seconds: float) -> dict:
    """Per run, what the engine did: steps/s, streams per step, ms per step inside the step (model + sampling)
    and outside it (scheduling, postprocess, inputs, outputs, idle): the split between a full engine and a
    starved one."""
    d = {k: after[k] - before[k] for k in after}
    steps = max(d["steps"], 1)
    eager = d["steps"] - d["graph"]
    return {"steps_per_s": d["steps"] / seconds, "streams": d["streams"] / steps, "tokens": d["tokens"] / steps,
            "step_ms": 1e3 * d["forward"] / steps, "graph": d["graph"] / steps,
            "outside_ms": 1e3 * (seconds - d["forward"]) / steps,
            # a graph step's and an eager (mixed) step's own time: a few eager steps can set the mean
            "graph_step_ms": 1e3 * d["graph_forward"] / d["graph"] if d["graph"] else None,
            "eager_step_ms": 1e3 * (d["forward"] - d["graph_forward"]) / eager if eager else None,
            "compiled": d["compiled"],
            "request_ms": 1e3 * d["e2e"] / d["requests"] if d["requests"] else None,
            "first_ms": 1e3 * d["first"] / d["firsts"] if d["firsts"] else None}


def engine_line(e: dict) -> str:
    split = ", ".join(f"{kind} {e[kind + '_step_ms']:.3f}" for kind in ("graph", "eager")
                      if e.get(kind + "_step_ms") is not None)
    return (f"    engine: {e['steps_per_s']:,.0f} steps/s, {e['streams']:.1f} streams and {e['tokens']:.1f} tokens "
            f"a step ({100 * e['graph']:.0f}% graph replays), {e['step_ms']:.3f} ms in the step ({split} ms a step) "
            f"+ {e['outside_ms']:.3f} ms outside it"
            + (f"; {e['compiled']:.0f} Triton kernels compiled during the run" if e.get("compiled") else ""))


def schedule(items: list, deadline: float | None):
    """What a closed-loop client submits: the items once; with a deadline (time.time()), over and over until it
    passes. Checked as each item is taken, i.e. when the client has room to submit it: after the deadline no new
    request starts and the ones in flight finish. The engine-direct runs and the client processes share it."""
    if deadline is None:
        yield from items
        return
    for item in cycle(items):
        if time.time() >= deadline:
            return
        yield item


# -- load-generating client processes (import no torch: they only speak HTTP and websockets) -------------------

COMPLETIONS = "/v1/completions"


class HttpTransport:
    """What the HTTP load generator sends completions through, per library: one per client process, holding a
    keep-alive pool of `connections`. post() returns (status, body); lines() the lines of a streamed answer
    (raising on a status other than 200)."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class AiohttpClient(HttpTransport):
    """aiohttp, as vLLM's serving benchmark: one ClientSession. At 1-16 clients a process it costs the client
    0.25-0.1 of httpx's CPU per plain completion and 0.6-0.3 per streamed one, less still with more clients
    (bench/bench_http_client.py): httpx saturated the load generators at c = 256 on an H200 host."""

    def __init__(self, url: str, connections: int):
        import aiohttp

        self.session = aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=connections),
                                             timeout=aiohttp.ClientTimeout(connect=600, sock_read=600))

    async def post(self, body: dict) -> tuple[int, bytes]:
        async with self.session.post(COMPLETIONS, json=body) as r:
            return r.status, await r.read()

    async def lines(self, body: dict):
        async with self.session.post(COMPLETIONS, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"stream failed: {r.status} {(await r.read())[:300]!r}")
            async for line in r.content:
                yield line.decode()

    async def close(self):
        await self.session.close()


class HttpxClient(HttpTransport):
    """httpx (the fallback where aiohttp is not installed): one AsyncClient."""

    def __init__(self, url: str, connections: int):
        import httpx

        self.client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=connections))

    async def post(self, body: dict) -> tuple[int, bytes]:
        r = await self.client.post(COMPLETIONS, json=body)
        return r.status_code, r.content

    async def lines(self, body: dict):
        async with self.client.stream("POST", COMPLETIONS, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"stream failed: {r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                yield line

    async def close(self):
        await self.client.aclose()


HTTP_CLIENTS = {"aiohttp": AiohttpClient, "httpx": HttpxClient}


def http_library(choice: str = "auto") -> str:
    """The HTTP load generator's library: aiohttp when importable (auto), else httpx."""
    if choice != "auto":
        return choice
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "httpx"
    return "aiohttp"


def chunk_tokens(line: str) -> int:
    """Tokens in one streamed completion chunk: its token_ids, counted without parsing the JSON (a frontend behind
    its engine joins the tokens that wait into one chunk)."""
    start = line.find('"token_ids":[')
    if start < 0:
        return 1
    ids = line[start + 13:line.index("]", start)]
    return ids.count(",") + 1 if ids else 0


async def http_client(client, prompts, max_tokens, stream, deadline, tally):
    """One closed-loop client: completions of its prompts (schedule) through `client` (an HTTP_CLIENTS entry)."""
    for ids in schedule(prompts, deadline):
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
        t0 = time.perf_counter()
        if not stream:
            status, content = await client.post(body)
            if status != 200 or json.loads(content)["usage"]["completion_tokens"] != max_tokens:
                raise RuntimeError(f"completion failed: {status} {content[:300].decode(errors='replace')}")
        else:
            tokens, first = 0, None
            async with aclosing(client.lines(body)) as lines:
                async for line in lines:
                    if '"finish_reason":null' in line:
                        tokens += chunk_tokens(line)
                        first = first or time.perf_counter()
                    elif line.startswith('data: {"error'):
                        raise RuntimeError(line)
            if tokens != max_tokens:
                raise RuntimeError(f"streamed {tokens} tokens, expected {max_tokens}")
            tally["ttft"].append(first - t0)
        tally["lat"].append(time.perf_counter() - t0)
        tally["steps"] += len(ids) + max_tokens


async def ws_client(url, frames, window, tally, opened, go):
    """Open a session, wait for the go (it brings the deadline), send the (frame, steps) pairs with up to `window`
    unanswered (schedule), close it."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, ping_interval=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "open"}))
        answer = json.loads(await ws.recv())
        if answer.get("type") != "opened":
            raise RuntimeError(f"open failed: {answer}")
        opened.set_result(None)
        frames = schedule(frames, await go)
        sent: deque = deque()  # (time sent, steps) of each unanswered frame
        while True:
            if len(sent) >= window:  # room first: the deadline is checked when the next frame can go
                await ws_answer(ws, sent, tally)
            if (item := next(frames, None)) is None:
                break
            await ws.send(item[0])
            sent.append((time.perf_counter(), item[1]))
        while sent:
            await ws_answer(ws, sent, tally)
        await ws.send(json.dumps({"type": "close", "delete": True}))


async def ws_answer(ws, sent, tally):
    answer = await ws.recv()
    if not (isinstance(answer, str) and answer.startswith('{"type":"outputs"')):
        raise RuntimeError(f"append failed: {answer[:300]!r}")
    t, steps = sent.popleft()
    tally["lat"].append(time.perf_counter() - t)
    tally["steps"] += steps


async def run_job(conn, job: dict):
    """Set up (connections, sessions), say ready, wait for the go (it brings the common deadline, or None for a
    fixed count), run every client of this process."""
    tally, loop = {"lat": [], "ttft": [], "steps": 0}, asyncio.get_running_loop()
    go = loop.create_future()
    if job["kind"] == "http":
        async with HTTP_CLIENTS[job["library"]](job["url"], len(job["shares"]) + 4) as client:
            conn.send("ready")
            deadline = (await loop.run_in_executor(None, conn.recv))["go"]
            t0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(http_client(client, share, job["max_tokens"], job["stream"], deadline, tally)
                                   for share in job["shares"]))
    else:
        opened = [loop.create_future() for _ in job["shares"]]
        waiting = asyncio.gather(*(ws_client(job["url"], share, job["window"], tally, o, go)
                                   for share, o in zip(job["shares"], opened)))
        await asyncio.wait([asyncio.gather(*opened), waiting], return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            waiting.result()  # a client failed before the go
        conn.send("ready")  # every session is open (not timed)
        deadline = (await loop.run_in_executor(None, conn.recv))["go"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        go.set_result(deadline)
        await waiting
    return {**tally, "t0": t0, "t1": time.perf_counter(), "cpu": time.process_time() - cpu0}


def client_process(conn, cpus) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    while (job := conn.recv()) is not None:
        try:
            conn.send(asyncio.run(run_job(conn, job)))
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


class Clients:
    """Long-lived client processes; run() spreads clients over them and times them from a common start."""

    def __init__(self, count: int, cpus: list[int] | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(child, cpus), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, job: dict, shares: list, seconds: float | None = None, at_go=None) -> Run:
        """Client i submits shares[i] (prompts, or a session's (frame, steps) pairs): once, or with `seconds`
        over and over until that long after the go (schedule). at_go() runs once every process is set up, just
        before the go: a measurement's starting point."""
        n = min(len(self.conns), len(shares))
        conns = self.conns[:n]
        for i, conn in enumerate(conns):
            conn.send({**job, "shares": shares[i::n]})
        for conn in conns:
            if (msg := conn.recv()) != "ready":
                raise RuntimeError(msg)
        if at_go:
            at_go()
        deadline = time.time() + seconds if seconds else None  # one absolute deadline for every process
        for conn in conns:
            conn.send({"go": deadline})
        results = [conn.recv() for conn in conns]
        if errors := [r["error"] for r in results if "error" in r]:
            raise RuntimeError(errors[0])
        seconds = max(r["t1"] for r in results) - min(r["t0"] for r in results)
        run = Run(sum(r["steps"] for r in results), seconds, sum((r["lat"] for r in results), []),
                  sum((r["ttft"] for r in results), []), n)
        # near 1: the load generators, not the server, set the pace (each is one process, one thread busy)
        run.client_busy = max(r["cpu"] for r in results) / seconds
        return run

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
                proc.join(5)
            except OSError:  # it is gone already (a timeout signals the whole process group)
                pass
            if proc.is_alive():
                proc.terminate()


# -- the engine core in this process ---------------------------------------------------------------------------

def drive(core, scripts: list[list], make, window: int = 1, seconds: float | None = None) -> Run:
    """Closed loop over the core: client i sends make(i, item) -> (message, steps) for the items of scripts[i],
    up to `window` unanswered: once, or with `seconds` over and over until that long after the start (schedule,
    as the client processes do)."""
    inflight, owner, sent_at, first, lat, ttft = [0] * len(scripts), {}, {}, set(), [], []
    done = 0  # steps of the finished requests

    def submit(i) -> bool:
        if (item := next(items[i], None)) is None:
            return False
        msg, steps = make(i, item)
        inflight[i] += 1
        owner[msg.rid], sent_at[msg.rid] = (i, steps), time.perf_counter()
        core.handle(msg)
        return True

    core.refresh_metrics()
    before, t0 = engine_counters(core.metrics.render().decode()), time.perf_counter()
    deadline = time.time() + seconds if seconds else None
    items = [schedule(script, deadline) for script in scripts]
    for i in range(len(scripts)):
        while inflight[i] < window and submit(i):
            pass
    while owner:
        for batch in core.run_once(timeout=0.05).values():
            # a step's plain tokens come in batch.tokens (before batch.outputs), not as RequestOutputs
            for rid in batch.tokens.rids if batch.tokens is not None else ():
                if rid not in first:
                    first.add(rid)
                    ttft.append(time.perf_counter() - sent_at[rid])
            for out in batch.outputs:
                if out.error is not None:
                    raise RuntimeError(f"engine error on {out.rid}: {out.error}")
                if out.token_ids and out.rid not in first:
                    first.add(out.rid)
                    ttft.append(time.perf_counter() - sent_at[out.rid])
                if out.finish_reason is not None:
                    lat.append(time.perf_counter() - sent_at.pop(out.rid))
                    i, steps = owner.pop(out.rid)
                    inflight[i], done = inflight[i] - 1, done + steps
                    submit(i)
    run = Run(done, time.perf_counter() - t0, lat, ttft)
    core.refresh_metrics()
    run.engine = where_time_goes(before, engine_counters(core.metrics.render().decode()), run.seconds)
    return run


class EngineSide:
    """An EngineCore in this process with the server's config; its session writes on the store's thread."""

    def __init__(self, model, tokenizer, config):
        from server.engine.core import EngineCore
        from server.engine.process import warm_up

        self.state_dir = tempfile.mkdtemp(prefix="bench-sessions-")
        self.core = EngineCore(model, tokenizer, config, self.state_dir)
        self.core.store.start()
        warm_up(self.core)
        self.count = 0

    def rid(self) -> str:
        self.count += 1
        return f"r{self.count}"

    def call(self, op: str, session: str | None = None):
        """A session operation, waiting for its reply (sent once the state is on disk)."""
        from server.engine.protocol import SessionOp

        message = SessionOp("bench", self.rid(), op, session)
        self.core.handle(message)
        while True:
            for batch in self.core.run_once(timeout=0.05).values():
                for reply in batch.replies:
                    if reply.rid == message.rid:
                        if not reply.ok:
                            raise RuntimeError(f"session {op}: {reply.error}")
                        return reply

    # the inputs are encoded before the run; in it, a message is only a new rid around them (drive)

    def completions(self, prompts: list[list[int]], conc: int, max_tokens: int, seconds: float | None = None
                    ) -> Run:
        from server.engine.protocol import Add, Array, Sampling

        sampling = Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        scripts = [[Array.of(np.asarray(p, np.int64)) for p in prompts[i::conc]] for i in range(conc)]
        return drive(self.core, scripts, lambda i, ids: (Add("bench", self.rid(), ids, sampling=sampling),
                                                          ids.shape[0] + max_tokens), seconds=seconds)

    def appends(self, chunks_per_session: list[list[np.ndarray]], window: int = 1, seconds: float | None = None
                ) -> Run:
        from server.engine.protocol import Add, Array

        sids = [self.call("create").session for _ in chunks_per_session]
        scripts = [[Array.of(c.astype(np.int64)) for c in chunks] for chunks in chunks_per_session]
        run = drive(self.core, scripts, lambda i, ids: (Add("bench", self.rid(), ids, session=sids[i],
                                                            wait_if_busy=True), ids.shape[0]), window, seconds)
        for sid in sids:
            self.call("delete", sid)
        return run

    def close(self) -> None:
        self.core.shutdown()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def model_alone(model, ids: np.ndarray, frame: int) -> Run:
    """The model fed the same chunks from the host with its state carried, as one long append runs."""
    import torch

    chunks = [torch.from_numpy(ids[i:i + frame].astype(np.int64))[None] for i in range(0, len(ids), frame)]
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for chunk in {c.shape[1]: c for c in chunks}.values():  # warm up every chunk shape
            model(chunk.to(model.device))
        sync()
        t0, state = time.perf_counter(), model.empty_state(1)
        for chunk in chunks:
            _, state = model(chunk.to(model.device), state)
        sync()
    return Run(len(ids), time.perf_counter() - t0, [])


# -- the server in its own processes ----------------------------------------------------------------------------

class Server:
    def __init__(self, args, config, api_servers: int, cpus: list[int] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "clients.cli", "serve", "--port", str(self.port), "--device", config.device,
               "--max-num-streams", str(config.max_num_streams), "--max-num-batched-tokens",
               str(config.max_num_batched_tokens), "--max-prefill-wait-steps", str(config.max_prefill_wait_steps),
               "--api-server-count", str(api_servers), "--async-scheduling", str(config.async_scheduling).lower(),
               "--log-level", "warning"]
        cmd += ["--model", args.model] if args.model else []
        progress(f"starting infomamba {shlex.join(cmd[3:])}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.wait_ready()

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("server not ready in time:\n" + self.tail())

    def counters(self) -> dict:
        import httpx

        return engine_counters(httpx.get(self.url + "/metrics", timeout=30).text)

    def children(self) -> dict[str, int]:
        """The engine's and the frontends' pids, by name (the launcher's child processes)."""
        import httpx

        engine = httpx.get(self.url + "/health", timeout=30).json()["engine"]["pid"]
        kids = {}
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            if int(fields.get("PPid", 0)) == self.proc.pid:
                pid = int(status.parent.name)
                if b"resource_tracker" in (status.parent / "cmdline").read_bytes():
                    continue  # multiprocessing's helper, not a server process
                kids["engine" if pid == engine else f"frontend-{sum(k != 'engine' for k in kids)}"] = pid
        return kids

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(server: Server, clients: Clients, job: dict, shares: list, seconds: float | None,
             profile: str | None = None) -> Run:
    """clients.run with the engine's counters and the server's CPU time read around it (from just before the go
    to after the last finish); with `profile`, py-spy samples the engine and every frontend during the run (raw
    collapsed stacks, one file per process, in that directory)."""
    spies = []
    if profile:
        os.makedirs(profile, exist_ok=True)
        for name, pid in server.children().items():
            out = os.path.join(profile, f"{name}.txt")
            spies.append(subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--format", "raw", "--rate", "200",
                                           "--pid", str(pid), "--output", out], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT))
        time.sleep(1.0)  # py-spy attaches
    pids, before = server.children(), {}

    def at_go():  # after the clients' setup (connections, sessions), which is not timed
        before.update(counters=server.counters(), cpu={name: process_cpu_seconds(pid) for name, pid in pids.items()})

    run = clients.run(job, shares, seconds, at_go)
    run.engine = where_time_goes(before["counters"], server.counters(), run.seconds)
    run.server_busy = {name: (process_cpu_seconds(pid) - before["cpu"][name]) / run.seconds
                       for name, pid in pids.items()}
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
    return run


def append_frame(ids: np.ndarray) -> str:
    return json.dumps({"type": "append", "input_ids": ids.tolist(), "outputs": []})


def binary_frame(ids: np.ndarray) -> bytes:
    header = json.dumps({"type": "append", "dtype": "int32", "outputs": []}).encode()
    return struct.pack("<I", len(header)) + header + ids.astype("<i4").tobytes()


# -- the run ----------------------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=3.0,
                        help="wall time of each measured run of completions and websocket appends: clients submit "
                        "until then, then their in-flight requests finish (default: 3)")
    length.add_argument("--requests", type=int, default=0,
                        help="instead of --seconds: a fixed count of completions per level, max(REQUESTS, c), and "
                        "each websocket session sends its --chunks appends once")
    p.add_argument("--prompt-len", type=int, default=48, help="prompt length, +-8")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ws-sessions", type=int, default=64)
    p.add_argument("--chunk-steps", type=int, default=16, help="steps per websocket append")
    p.add_argument("--chunks", type=int, default=16,
                   help="chunks prepared per websocket session (it cycles through them for --seconds)")
    p.add_argument("--window", type=int, default=8, help="frames in flight per connection when pipelined")
    p.add_argument("--long-ids", type=int, default=2_000_000)
    p.add_argument("--frame", type=int, default=65536, help="ids per binary frame in the long append")
    p.add_argument("--api-server-counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--client-procs", type=int, default=8, help="most load-generating processes")
    p.add_argument("--http-client", choices=["auto", "aiohttp", "httpx"], default="auto",
                   help="the HTTP load generators' library (default: aiohttp if installed, else httpx)")
    p.add_argument("--server-cpus", type=int, default=-1,
                   help="CPUs for the server (and the engine-direct runs); the load-generating clients get the rest, "
                   "as if they ran on other machines (default: half; 0: no split)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="as in infomamba serve")
    p.add_argument("--max-prefill-wait-steps", type=int, default=None,
                   help="as in infomamba serve, for the server and engine direct alike (default: serve's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="completions at each level run this many times over, engine direct and the server's HTTP "
                   "and SSE in turn (engine direct stays loaded beside the server); the summary reads the median "
                   "run of each and lists every round's ratios (engine direct varies by up to 1.7x between runs "
                   "on an H200 host)")
    p.add_argument("--async-scheduling", choices=["auto", "true", "false"], default="auto",
                   help="as in infomamba serve, for the server and engine direct alike (default: auto)")
    p.add_argument("--profile", default=None, help="directory: py-spy samples the engine and frontends during the "
                   "highest-concurrency completions and the long append (py-spy must be on PATH)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.requests:
        args.seconds = None  # fixed-count mode: every run is the same amount of work, as the warm-ups are
    elif args.seconds <= 0:
        p.error("--seconds must be positive")
    try:
        args.http_client = http_library(args.http_client)
        args.http_version = version(args.http_client)
    except PackageNotFoundError:
        p.error(f"--http-client {args.http_client}: it is not installed")
    return args


def how_long(args) -> str:
    """Each measured run's length, for the summary."""
    if args.seconds is None:
        return (f"Each measured run: a fixed count of completions, max({args.requests}, c) a level, and every "
                f"session's {args.chunks} appends once; steps/s = steps / time from the common start to the last "
                "finish.")
    return (f"Each measured run lasts {args.seconds:g} s: closed-loop clients submit until then, then their "
            "in-flight requests finish; steps/s = steps of every completed request / time from the common start "
            "to the last finish (engine direct and server alike).")


class Workload:
    def __init__(self, args, vocab: int):
        rng = np.random.default_rng(0)
        # completions a level: the fixed count, or (duration mode) the warm-up's count and the measured run's pool
        self.levels = {c: max(args.requests, c) if args.requests else max(64, 8 * c) for c in args.concurrency}
        self.prompts = [rng.integers(0, vocab, rng.integers(args.prompt_len - 8, args.prompt_len + 9)).tolist()
                        for _ in range(max(self.levels.values()))]
        self.chunks = [[rng.integers(0, vocab, args.chunk_steps) for _ in range(args.chunks)]
                       for _ in range(args.ws_sessions)]
        self.long_ids = rng.integers(0, vocab, args.long_ids).astype(np.int32)
        self.long_chunks = [self.long_ids[i:i + args.frame] for i in range(0, args.long_ids, args.frame)]


def bench_engine(args, model, tokenizer, config, w: Workload, r: dict) -> "EngineSide | None":
    """Engine direct's runs; returns the engine, still loaded, when --rounds asks for more of its runs later."""
    progress("engine direct: warming up")
    engine = EngineSide(model, tokenizer, config)
    progress(f"engine direct: async scheduling {'on' if engine.core.async_scheduling else 'off'}")
    top = max(args.concurrency)
    engine.completions(w.prompts[:top], top, args.max_tokens)
    engine.appends([c[:1] for c in w.chunks] + [w.long_chunks[:2]])
    for c, n in w.levels.items():
        progress(f"engine direct: completions c={c}, {for_how_long(args, n)} (a first untimed run of {n} requests "
                 "compiles its shapes)")
        engine.completions(w.prompts[:n], c, args.max_tokens)
        r["engine", c] = engine.completions(w.prompts[:n], c, args.max_tokens, args.seconds)
        print(r["engine", c].line("engine"), flush=True)
    progress(f"engine direct: {args.ws_sessions} sessions appending {args.chunk_steps}-step chunks, one at a time, "
             f"{for_how_long(args, args.chunks, 'appends a session')}")
    engine.appends(w.chunks)
    r["ws_engine"] = engine.appends(w.chunks, seconds=args.seconds)
    print(r["ws_engine"].line("engine appends"), flush=True)
    progress(f"engine direct: long append, {args.long_ids:,} ids in chunks of {args.frame}, window {args.window}")
    engine.appends([w.long_chunks[:8]], args.window)
    r["long_engine"] = engine.appends([w.long_chunks], args.window)
    print(r["long_engine"].line("engine long append"), flush=True)
    progress("model alone: long append")
    r["long_model"] = model_alone(model, w.long_ids, args.frame)
    print(r["long_model"].line("model alone long append"), flush=True)
    if args.rounds > 1:
        return engine
    engine.close()
    return None


def median_run(runs: list[Run]) -> Run:
    """The run of median throughput (the lower of the two middle ones for an even count)."""
    return sorted(runs, key=lambda run: run.rate)[(len(runs) - 1) // 2]


def for_how_long(args, n: int, what: str = "requests") -> str:
    return f"{n} {what}" if args.seconds is None else f"for {args.seconds:g} s"


def bench_server(args, server: Server, clients: Clients, count: int, w: Workload, r: dict,
                 engine: "EngineSide | None" = None) -> None:
    ws = {"kind": "ws", "url": server.url.replace("http", "ws", 1) + "/v1/stream", "window": args.window}
    http = {"kind": "http", "url": server.url, "max_tokens": args.max_tokens, "library": args.http_client}
    top = max(args.concurrency)
    for c, n in w.levels.items():
        shares = [w.prompts[:n][i::c] for i in range(c)]
        progress(f"{count} API server(s): warming up at c={c}, {n} requests (untimed, as for the engine)")
        clients.run({**http, "stream": False}, shares)
        rounds = {False: [], True: []}
        engines = r["engine_rounds", count, c] = [r["engine", c]]  # this server's rounds: the first is shared
        for i in range(args.rounds):
            if i:  # engine direct again, between the server's runs
                progress(f"engine direct: completions c={c}, round {i + 1}, {for_how_long(args, n)}")
                engines.append(run := engine.completions(w.prompts[:n], c, args.max_tokens, args.seconds))
                print(run.line("engine"), flush=True)
            for stream in (False, True):
                progress(f"{count} API server(s): HTTP completions c={c}, "
                         f"{'streaming' if stream else 'not streaming'}, {for_how_long(args, n)}"
                         + (f", round {i + 1}" if args.rounds > 1 else ""))
                profile = (os.path.join(args.profile, f"{count}-servers-c{c}-{'sse' if stream else 'plain'}")
                           if args.profile and c == top and not i else None)
                rounds[stream].append(run := measured(server, clients, {**http, "stream": stream}, shares,
                                                      args.seconds, profile))
                print(run.line(f"HTTP {'SSE' if stream else 'plain'}, {run.procs} client procs", engines[-1]),
                      flush=True)
        for stream, runs in rounds.items():
            r["http", count, c, stream] = median_run(runs)
            r["http_rounds", count, c, stream] = runs
    frames = [[(append_frame(c), len(c)) for c in s] for s in w.chunks]
    clients.run(ws, frames)  # warm-up
    for window in (1, args.window):
        progress(f"{count} API server(s): websocket appends, {len(frames)} sessions, window {window}, "
                 f"{for_how_long(args, args.chunks, 'appends a session')}")
        profile = os.path.join(args.profile, f"{count}-servers-ws-window{window}") if args.profile else None
        r["ws", count, window] = run = measured(server, clients, {**ws, "window": window}, frames, args.seconds,
                                                profile)
        print(run.line(f"websocket, window {window}", r["ws_engine"]), flush=True)
    if "long_ws" not in r:
        progress(f"{count} API server(s): long append over one websocket, binary frames, window {args.window}")
        binary = [(binary_frame(c), len(c)) for c in w.long_chunks]
        clients.run(ws, [binary[:8]])
        profile = os.path.join(args.profile, "long-append") if args.profile else None
        r["long_ws"] = run = measured(server, clients, ws, [binary], None, profile)  # a fixed amount, always
        print(run.line("websocket long append", r["long_model"], "the model"), flush=True)


def summary(args, r: dict, config, title: str) -> str:
    n, x = "{:,.0f}".format, lambda run, base: f"{run.rate / base.rate:.2f}"
    out = [f"\n### {title}\n", f"`python bench/bench_server.py {shlex.join(sys.argv[1:])}`: "
           f"{config.max_num_streams} slots, {config.max_num_batched_tokens} steps per engine step, new prompts "
           f"wait up to {config.max_prefill_wait_steps} graph steps; "
           f"{args.cpu_note}; HTTP load generators: {args.http_client} {args.http_version}. {how_long(args)} "
           "Completions: "
           f"greedy, prompts of {args.prompt_len - 8}-{args.prompt_len + 8} ids, {args.max_tokens} tokens; steps/s "
           "counts prompt + generated steps; latency and time to first token (TTFT): p50 / p99 ms.\n",
           "| API servers | c | client procs | engine steps/s | HTTP steps/s | HTTP/engine | SSE steps/s | SSE/engine "
           "| engine latency | HTTP latency | SSE latency | engine TTFT | SSE TTFT |", "|" + " ---: |" * 13]
    for count in args.api_server_counts:
        for c in [c for c in args.concurrency if ("http", count, c, True) in r]:
            e, h, s = median_run(r["engine_rounds", count, c]), r["http", count, c, False], r["http", count, c, True]
            out.append(f"| {count} | {c} | {h.procs} | {n(e.rate)} | {n(h.rate)} | {x(h, e)} | {n(s.rate)} | {x(s, e)} "
                       f"| {pp(e.latencies)} | {pp(h.latencies)} | {pp(s.latencies)} | {pp(e.ttfts)} | {pp(s.ttfts)} |")
    if args.rounds > 1:
        out.append(f"\nMedians of {args.rounds} rounds (engine direct, HTTP and SSE in turn at each level). Every "
                   "round's HTTP/engine and SSE/engine, engine direct of the same round:\n")
        for count in args.api_server_counts:
            for c in [c for c in args.concurrency if ("http_rounds", count, c, True) in r]:
                engines = r["engine_rounds", count, c]
                ratios = [f"{x(h, e)} / {x(s, e)}" for e, h, s in zip(engines, r["http_rounds", count, c, False],
                                                                     r["http_rounds", count, c, True])]
                out.append(f"- {count} API server(s), c = {c}: " + ", ".join(ratios))
    e, win = r.get("ws_engine"), args.window
    if e is None:
        return "\n".join(out)
    appends = (f"{args.chunks} JSON appends" if args.seconds is None else
               f"JSON appends (cycling through {args.chunks} chunks for {args.seconds:g} s)")
    out += [f"\nWebsocket appends: {args.ws_sessions} sessions x {appends} of {args.chunk_steps} "
            f"steps, no outputs. Engine direct (one outstanding per session): {n(e.rate)} steps/s, p50 / p99 "
            f"{pp(e.latencies)} ms per append.\n",
            f"| API servers | one at a time steps/s | /engine | window {win} steps/s | /engine | latency (one at a time) "
            f"| latency (window {win}) |", "|" + " ---: |" * 7]
    for count in [count for count in args.api_server_counts if ("ws", count, win) in r]:
        one, many = r["ws", count, 1], r["ws", count, win]
        out.append(f"| {count} | {n(one.rate)} | {x(one, e)} | {n(many.rate)} | {x(many, e)} | {pp(one.latencies)} "
                   f"| {pp(many.latencies)} |")
    m, le, lw = r.get("long_model"), r.get("long_engine"), r.get("long_ws")
    if lw is None:
        return "\n".join(out)
    out += [f"\nLong append: {args.long_ids:,} ids in frames of {args.frame} (binary int32 over one websocket, "
            f"window {win}; {args.api_server_counts[0]} API server(s)), no outputs.\n",
            "| model alone tokens/s | engine direct tokens/s | websocket tokens/s | engine/model | websocket/model |",
            "|" + " ---: |" * 5, f"| {n(m.rate)} | {n(le.rate)} | {n(lw.rate)} | {x(le, m)} | {x(lw, m)} |"]
    return "\n".join(out)


def split_cpus(num_server: int) -> tuple[list[int] | None, list[int] | None]:
    """The server's CPUs and the clients', or (None, None) for no split."""
    cpus = sorted(os.sched_getaffinity(0))
    num_server = len(cpus) // 2 if num_server < 0 else num_server
    if num_server == 0 or len(cpus) < 2:
        return None, None
    num_server = min(num_server, len(cpus) - 1)
    return cpus[:num_server], cpus[num_server:]


def main() -> int:
    args = parse_args()
    import torch

    from server.config import ServerConfig
    from server.serve import make_loader, resolve_device_dtype

    top = max(args.concurrency + [args.ws_sessions])
    config = ServerConfig(device=args.device, max_num_streams=max(64, 2 * top),
                          max_num_batched_tokens=max(args.max_num_batched_tokens, 2 * top))
    if args.max_prefill_wait_steps is not None:
        config.max_prefill_wait_steps = args.max_prefill_wait_steps
    config.async_scheduling = {"auto": "auto", "true": True, "false": False}[args.async_scheduling]
    config.device = resolve_device_dtype(config)[0]
    model, tokenizer = make_loader(config, args.model)()
    card = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    cfg = model.config
    title = (f"Server vs engine: {card}, {cfg.name} (d_model {cfg.d_model}, {cfg.n_layers} layers, "
             f"{str(model.dtype).replace('torch.', '')}), async scheduling {args.async_scheduling}")
    progress(f"{title}; HTTP load generators: {args.http_client} {args.http_version}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (timeout) stop the server, print what was measured
    w, r, clients, engine = Workload(args, min(cfg.vocab_size, 256)), {}, None, None
    server_cpus, client_cpus = split_cpus(args.server_cpus)
    args.cpu_note = (f"server and engine direct on {len(server_cpus)} of {len(server_cpus) + len(client_cpus)} CPUs, "
                     "load generators on the others" if server_cpus else "no CPU split")
    if server_cpus:
        progress(f"server and engine direct on CPUs {server_cpus}, load generators on {client_cpus}")
        os.sched_setaffinity(0, server_cpus)
    try:
        engine = bench_engine(args, model, tokenizer, config, w, r)
        clients = Clients(min(args.client_procs, top), client_cpus)
        for count in args.api_server_counts:
            server = Server(args, config, count, server_cpus)
            try:
                bench_server(args, server, clients, count, w, r, engine)
            finally:
                server.stop()
    finally:
        if "ws_engine" in r:
            print(summary(args, r, config, title), flush=True)
        if clients is not None:
            clients.close()
        if engine is not None:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
