"""Scale-out costs, measured with real parts on this machine (Redis, nginx and `infomamba serve` processes on
loopback; results in bench/RESULTS.md):

  store:  one snapshot written through the store and acknowledged (the write-through cost of an append), one at a
          time and pipelined (snapshots/s), for the bundled model's state and the 130M config's; Redis against the
          state dir (fsync'd files).
  server: append latency over HTTP (one session, one chunk at a time) with the state dir, Redis write-through and
          Redis async; the same through nginx (the proxy's cost); throughput of concurrent sessions on one replica
          against two behind nginx.
  log:    what an acknowledged append costs Redis: bytes Redis received per 16-token append (its INFO counters)
          and the append's latency, with a snapshot per answer (--snapshot-every 1, as before the log) and with
          the log; and a log record written through the store alone, beside a snapshot.

  replicas: (--only-replicas) input steps/s of many sessions through nginx to one replica, then to two, each
          replica pinned to its own --cpus-per-replica CPUs and the load generators (processes) to the rest, so a
          second replica brings its own hardware, as it would on a second machine.

    python bench/bench_scale.py [--quick] [--json OUT] [--only-log] [--only-replicas --cpus-per-replica 4]
                                [--sessions 128] [--sustained-seconds 20]

Needs redis-server and nginx (Debian packages) and the bundled model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import InfoMambaConfig  # noqa: E402
from model.state import StreamState  # noqa: E402
from model.weights import load_config  # noqa: E402
from tests.server.scale import NginxProxy, RedisServer  # noqa: E402  (real redis-server / nginx on loopback)
from tests.server.test_processes import ServeProcess  # noqa: E402

MODEL_DIR = ROOT / "model" / "default_model"
CONFIG_130M = InfoMambaConfig(d_model=768, n_layers=24, vocab_size=50280, n_concepts=16, d_concept=192,
                              name="130m-k16")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(ms: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(pct(ms, 0.99), 3), "n": len(ms)}


def random_state(config: InfoMambaConfig) -> StreamState:
    state = StreamState.empty(config, 1)
    for tensor in (state.conv, state.ssm, state.concept_mean):
        tensor.copy_(torch.randn_like(tensor) * 0.1)
    state.concept_mass.fill_(100.0)
    state.steps += 1000
    return state


# -- store -------------------------------------------------------------------------------------------------------

def bench_store(make_store, config: InfoMambaConfig, n: int, label: str) -> dict:
    done = threading.Semaphore(0)
    store = make_store(lambda _persisted: done.release())
    store.start()
    state = random_state(config)
    latencies = []
    for i in range(n):  # write-through: one at a time, acknowledged when the store has it
        t0 = time.perf_counter()
        store.write(f"bench-{label}-{i % 8}", state, None)
        done.acquire()
        latencies.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(n):  # many sessions' writes in flight at once
        store.write(f"bench-{label}-{i % 64}", state, None)
    for _ in range(n):
        done.acquire()
    rate = n / (time.perf_counter() - t0)
    store.stop()
    from model.state import save_snapshot

    size = len(save_snapshot(state, config.name, "x" * 64))
    return {**summary(latencies), "snapshots_per_s": round(rate, 1), "snapshot_bytes": size}


def bench_log_store(redis_url: str, n: int) -> dict:
    """One 16-token log record through the Redis store until acknowledged (the write-through cost of an append
    with the log), and 64 sessions' records in one group commit."""
    import numpy as np

    from server.engine.redis_store import RedisSessionStore
    from server.engine.wal import LogRecord

    config = load_config(MODEL_DIR)
    done = threading.Semaphore(0)
    store = RedisSessionStore(redis_url, config.name, "x" * 64, lambda _persisted: done.release(), replica_id="bench")
    store.start()
    state = random_state(config)
    sids = [f"bench-log-{i}" for i in range(64)]
    for sid in sids:
        store.write(sid, state, None)
        done.acquire()
    steps = {sid: int(state.steps[0]) for sid in sids}
    tokens = np.arange(16)
    latencies, group = [], []
    for i in range(n):
        sid = sids[i % 8]
        t0 = time.perf_counter()
        store.append_log([LogRecord.of(sid, steps[sid], tokens)])
        done.acquire()
        latencies.append((time.perf_counter() - t0) * 1000)
        steps[sid] += 16
    for _ in range(max(5, n // 20)):
        t0 = time.perf_counter()
        store.append_log([LogRecord.of(sid, steps[sid], tokens) for sid in sids])
        done.acquire()
        group.append((time.perf_counter() - t0) * 1000)
        for sid in sids:
            steps[sid] += 16
    store.stop()
    return {"one_record": summary(latencies), "64_records_one_round_trip": summary(group)}


def redis_bytes_in(redis: RedisServer) -> int:
    return int(redis.client.info("stats")["total_net_input_bytes"])


def log_server_benchmarks(redis: RedisServer, n: int, tmp: Path) -> dict:
    """Bytes Redis received per acknowledged append, and the append's latency, with a snapshot per answer and
    with the log (bundled model, one session appending 16-token chunks)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for label, every in (("snapshot per ack", "1"), ("log", "4096")):
        p = ServeProcess(MODEL_DIR, tmp / label.replace(" ", "-"), "--state-store", redis.url, "--replica-id",
                         label.replace(" ", "-"), "--snapshot-every", every, "--session-ttl", "3600",
                         "--log-level", "error")
        try:
            p.wait_ready(300)
            before = []  # Redis's input bytes once the session is created and warm, before the timed appends
            latencies = append_latencies(p.url, n, on_start=lambda: before.append(redis_bytes_in(redis)))
            results[label] = {**summary(latencies),
                              "redis_bytes_per_ack": round((redis_bytes_in(redis) - before[0]) / n)}
        finally:
            p.kill_all()
        print(label, results[label], flush=True)
    return results


def store_benchmarks(redis_url: str, n: int) -> dict:
    from server.engine.redis_store import RedisSessionStore
    from server.engine.store import SessionStore

    results = {}
    for label, config in (("bundled", load_config(MODEL_DIR)), ("130m", CONFIG_130M)):
        state_dir = tempfile.mkdtemp(prefix="bench-state-", dir=os.environ.get("BENCH_STATE_DIR"))
        results[f"redis/{label}"] = bench_store(
            lambda cb: RedisSessionStore(redis_url, config.name, "x" * 64, cb, replica_id="bench"), config, n, label)
        results[f"state-dir/{label}"] = bench_store(lambda cb: SessionStore(state_dir, config.name, "x" * 64, cb),
                                                    config, n, label)
        shutil.rmtree(state_dir, ignore_errors=True)
        print(label, {k: v for k, v in results.items() if k.endswith(label)}, flush=True)
    return results


# -- server ------------------------------------------------------------------------------------------------------

def append_latencies(url: str, n: int, chunk: int = 16, on_start=None) -> list[float]:
    with httpx.Client(base_url=url, timeout=60) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        ids = list(range(1, chunk + 1))
        for _ in range(5):
            http.post(f"/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": []})
        if on_start is not None:
            on_start()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post(f"/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": []})
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
        return out


def proxy_overhead(direct: str, proxied: str, n: int) -> dict:
    """GET /v1/models (answered by the frontend alone), direct and through nginx in alternation, so that the load
    of a shared machine drifts alike over both; the difference of the medians is the proxy's cost."""
    times = {"direct": [], "nginx": []}
    with httpx.Client(base_url=direct, timeout=30) as a, httpx.Client(base_url=proxied, timeout=30) as b:
        for i in range(n + 20):
            for label, http in (("direct", a), ("nginx", b)):
                t0 = time.perf_counter()
                assert http.get("/v1/models").status_code == 200
                if i >= 20:
                    times[label].append((time.perf_counter() - t0) * 1000)
    direct_ms, nginx_ms = statistics.median(times["direct"]), statistics.median(times["nginx"])
    return {"direct_p50_ms": round(direct_ms, 3), "nginx_p50_ms": round(nginx_ms, 3),
            "added_p50_ms": round(nginx_ms - direct_ms, 3), "n": n}


def throughput(url: str, sessions: int, appends: int, chunk: int = 64) -> float:
    """Input steps/s of `sessions` clients, each appending `appends` chunks to its own session."""
    ids = list(range(1, chunk + 1))

    def client(_):
        with httpx.Client(base_url=url, timeout=120) as http:
            sid = http.post("/v1/sessions", json={}).json()["id"]
            for _ in range(appends):
                r = http.post(f"/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": []})
                assert r.status_code == 200, r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(client, range(sessions)))
    return sessions * appends * chunk / (time.perf_counter() - t0)


def sustained_appends(url: str, sessions: int, chunk: int, start_at: float, end_at: float) -> int:
    """Appends of `chunk` steps that `sessions` clients (each with its own session, all created before start_at)
    completed between the wall-clock times start_at and end_at, every client appending back to back throughout."""
    ids = list(range(1, chunk + 1))

    def client(_) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=120) as http:
            sid = http.post("/v1/sessions", json={}).json()["id"]
            time.sleep(max(0.0, start_at - time.time()))
            while time.time() < end_at:
                r = http.post(f"/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": []})
                assert r.status_code == 200, r.text
                done += start_at <= time.time() <= end_at
        return done

    with ThreadPoolExecutor(sessions) as pool:
        return sum(pool.map(client, range(sessions)))


def _client_process(url: str, sessions: int, appends: int, chunk: int, cpus: list[int],
                    window: tuple[float, float] | None = None) -> int:
    os.sched_setaffinity(0, (set(cpus) & os.sched_getaffinity(0)) or os.sched_getaffinity(0))
    if window is not None:
        return sustained_appends(url, sessions, chunk, *window)
    throughput(url, sessions, appends, chunk)
    return sessions * appends


def _pinned_replica(cpus: list[int], tmp: Path, label: str, args: list[str]) -> ServeProcess:
    """A replica whose processes (frontends, engine) run on `cpus` only: they inherit this process's affinity."""
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return ServeProcess(MODEL_DIR, tmp / label, *args)
    finally:
        os.sched_setaffinity(0, everything)


def replica_benchmarks(redis_url: str, tmp: Path, cpus_per_replica: int, sessions: int, appends: int,
                       chunk: int = 64, device: str = "cpu", sustained_s: float = 0.0) -> dict:
    """One replica against two, both behind nginx, with the same clients; each replica on its own CPUs.

    Two measures: every session makes `appends` appends and the run ends with the last (steps/s over that time:
    the busier replica sets it), and, with sustained_s, every session appends back to back for sustained_s seconds
    (steps/s completed in that window: both replicas busy throughout)."""
    import multiprocessing

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 * cpus_per_replica + 2:
        raise SystemExit(f"--only-replicas needs at least {2 * cpus_per_replica + 2} CPUs, this machine has "
                         f"{len(cpus)}: lower --cpus-per-replica")
    client_cpus = cpus[2 * cpus_per_replica:]
    common = ["--session-ttl", "3600", "--log-level", "error", "--state-store", redis_url, "--device", device,
              "--max-num-streams", str(max(64, sessions)), "--max-num-batched-tokens", "2048"]
    replicas = [_pinned_replica(cpus[i * cpus_per_replica:(i + 1) * cpus_per_replica], tmp, f"r{i}",
                                [*common, "--replica-id", f"r{i}"]) for i in range(2)]
    results = {"cpus_per_replica": cpus_per_replica, "client_cpus": len(client_cpus), "sessions": sessions,
               "appends_per_session": appends, "chunk": chunk, "device": device}
    try:
        for r in replicas:
            r.wait_ready(300)
        workers = min(len(client_cpus), sessions)
        per_worker = sessions // workers

        def run(url: str) -> float:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                t0 = time.perf_counter()
                pool.starmap(_client_process, [(url, per_worker, appends, chunk, client_cpus)] * workers)
                return workers * per_worker * appends * chunk / (time.perf_counter() - t0)

        def run_for(url: str, seconds: float) -> float:
            # every session appends back to back for the same wall-clock window: the replicas' capacity, where
            # run() ends with the busier replica (and so counts the hash's imbalance against two)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                start_at = time.time() + 5 + sessions / 100  # every client's session created by then
                window = (start_at, start_at + seconds)
                counts = pool.starmap(_client_process, [(url, per_worker, 0, chunk, client_cpus, window)] * workers)
            return sum(counts) * chunk / seconds

        def owners() -> dict[str, str | None]:
            listing = httpx.get(replicas[0].url + "/v1/sessions", timeout=60).json()["data"]
            return {entry["id"]: entry.get("owner") for entry in listing}

        for label, upstreams in (("one", replicas[:1]), ("two", replicas)):
            proxy = NginxProxy([f"127.0.0.1:{r.port}" for r in upstreams])
            try:
                run(proxy.url)  # warm: compiles, first sessions
                before = owners()
                results[f"{label}_replica_steps_per_s"] = round(run(proxy.url))
                # how the proxy's hash spread this run's sessions (a lease names its replica while it lives)
                split = Counter(o for sid, o in owners().items() if sid not in before)
                results[f"{label}_replica_sessions_by_owner"] = dict(sorted(split.items(), key=str))
                if sustained_s:
                    results[f"{label}_replica_sustained_steps_per_s"] = round(run_for(proxy.url, sustained_s))
            finally:
                proxy.stop()
            print(label, results[f"{label}_replica_steps_per_s"], results[f"{label}_replica_sessions_by_owner"],
                  results.get(f"{label}_replica_sustained_steps_per_s"), flush=True)
        results["ratio"] = round(results["two_replica_steps_per_s"] / results["one_replica_steps_per_s"], 2)
        if sustained_s:
            results["sustained_seconds"] = sustained_s
            results["sustained_ratio"] = round(results["two_replica_sustained_steps_per_s"]
                                               / results["one_replica_sustained_steps_per_s"], 2)
    finally:
        for r in replicas:
            r.kill_all()
    return results


def server_benchmarks(redis_url: str, n: int, tmp: Path) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per replica: two replicas, two cores
    common = ["--session-ttl", "3600", "--log-level", "error"]
    procs = {
        "state-dir": ServeProcess(MODEL_DIR, tmp / "s1", *common),
        "redis-sync": ServeProcess(MODEL_DIR, tmp / "s2", "--state-store", redis_url, "--replica-id", "r1",
                                   *common),
    }
    results = {}
    try:
        for p in procs.values():
            p.wait_ready(300)
        for label, p in procs.items():
            results[f"append/{label}"] = summary(append_latencies(p.url, n))
            print(label, results[f"append/{label}"], flush=True)
        proxy = NginxProxy([f"127.0.0.1:{procs['redis-sync'].port}"])
        try:
            results["append/redis-sync via nginx"] = summary(append_latencies(proxy.url, n))
            print("via nginx", results["append/redis-sync via nginx"], flush=True)
            results["proxy"] = proxy_overhead(procs["redis-sync"].url, proxy.url, 10 * n)
            print("proxy", results["proxy"], flush=True)
        finally:
            proxy.stop()
        procs["state-dir"].kill_all()
        procs["redis-async"] = ServeProcess(MODEL_DIR, tmp / "s3", "--state-store", redis_url, "--replica-id", "r3",
                                            "--state-store-mode", "async", *common).wait_ready(300)
        results["append/redis-async"] = summary(append_latencies(procs["redis-async"].url, n))
        print("redis-async", results["append/redis-async"], flush=True)
        # one replica against two behind nginx (r1 and r3; both write through to Redis for this part: r3 is
        # async, which only shifts each append's write after its answer)
        sessions, appends = 8, max(5, n // 20)
        one = throughput(procs["redis-sync"].url, sessions, appends)
        proxy = NginxProxy([f"127.0.0.1:{procs['redis-sync'].port}", f"127.0.0.1:{procs['redis-async'].port}"])
        try:
            two = throughput(proxy.url, sessions, appends)
        finally:
            proxy.stop()
        results["throughput"] = {"one_replica_steps_per_s": round(one), "two_replicas_steps_per_s": round(two),
                                 "ratio": round(two / one, 2), "sessions": sessions, "chunk": 64}
        print("throughput", results["throughput"], flush=True)
    finally:
        for p in procs.values():
            p.kill_all()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--only-log", action="store_true", help="only the log's costs (bytes and latency per ack)")
    parser.add_argument("--only-replicas", action="store_true", help="only one replica against two, CPUs pinned")
    parser.add_argument("--cpus-per-replica", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=32, help="concurrent sessions for --only-replicas")
    parser.add_argument("--device", default="cpu", help="the replicas' --device for --only-replicas")
    parser.add_argument("--sustained-seconds", type=float, default=20.0,
                        help="--only-replicas: also every session appending back to back for this long (0: skip)")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    redis = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        results = {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__}
        if args.only_replicas:
            results["replicas"] = replica_benchmarks(redis.url, tmp, args.cpus_per_replica, args.sessions,
                                                     10 if args.quick else 40, device=args.device,
                                                     sustained_s=args.sustained_seconds)
            print(json.dumps(results, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return
        results["log"] = {"store": bench_log_store(redis.url, n), "server": log_server_benchmarks(redis, n, tmp)}
        print("log", results["log"], flush=True)
        if not args.only_log:
            results["store"] = store_benchmarks(redis.url, n)
        if not args.skip_server and not args.only_log:
            results["server"] = server_benchmarks(redis.url, n, tmp)
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
