"""Async scheduling (EngineCore): each step is launched before the last one's sampled tokens are read, feeding them
from the device. The real runner and model (tiny, CPU): whatever the requests ask, the answers, the sessions'
states and their logs equal those of the engine that reads every step back before the next."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from model.tokenizer import ByteTokenizer
from server.config import ServerConfig
from server.engine.process import choose_async_scheduling
from server.engine.protocol import Abort, Sampling
from tests.server.conftest import running, tiny_lm
from tests.server.test_engine_core import add, finish_of, make_real_core, op, run_until_quiet


def tokens_of(outs) -> list[int]:
    return sum((o.token_ids for o in outs), [])


def probe(tmp_path, prompt, sampling: Sampling) -> list[int]:
    core = make_real_core(tmp_path / "probe", async_scheduling=False)
    add(core, "p", prompt, sampling=sampling)
    return tokens_of(run_until_quiet(core)["outputs"]["p"])


# the tiny model's greedy text repeats the last input; seeded hot sampling varies from token to token
VARIED = dict(temperature=4.0, seed=5)


def serve_workload(tmp_path, async_scheduling: bool, stops: dict) -> dict:
    """Stateless requests of every kind at once, then a session that generates to a stop id and answers a forward:
    every answer by rid, and the session's final logits."""
    core = make_real_core(tmp_path, async_scheduling=async_scheduling, max_num_streams=8)
    assert core.async_scheduling is async_scheduling
    add(core, "plain", [3, 1, 4, 1, 5], sampling=Sampling(max_tokens=12, temperature=0))
    add(core, "stop", [2, 7, 1, 8], sampling=Sampling(max_tokens=10, stop_token_ids=[stops["stop"]], **VARIED))
    add(core, "seeded", [9, 2, 6], sampling=Sampling(max_tokens=9, temperature=0.8, top_p=0.9, seed=7))
    add(core, "short", [1], sampling=Sampling(max_tokens=1, temperature=0))
    add(core, "long", list(range(1, 150)), sampling=Sampling(max_tokens=4, temperature=0))  # in several chunks
    got = run_until_quiet(core)
    # what makes a step be read back at once, beside a stream that could go on
    add(core, "logprobs", [3, 1, 4, 1, 5], sampling=Sampling(max_tokens=5, temperature=0, logprobs=2))
    add(core, "forks", [5, 3, 5, 8, 9, 7], n=2, sampling=Sampling(max_tokens=6, temperature=0.9, seed=3))
    add(core, "beside", [2, 7, 1, 8], sampling=Sampling(max_tokens=7, **VARIED))
    got["outputs"].update(run_until_quiet(core)["outputs"])
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    add(core, "gen", [4, 4, 2], session=sid, sampling=Sampling(max_tokens=8, stop_token_ids=[stops["gen"]],
                                                               **VARIED))
    got["outputs"].update(run_until_quiet(core)["outputs"])
    add(core, "gen2", [], session=sid, sampling=Sampling(max_tokens=3, temperature=0))  # from the last logits
    got["outputs"].update(run_until_quiet(core)["outputs"])
    add(core, "after", [6, 6], session=sid, outputs=["logits"])
    got["outputs"].update(run_until_quiet(core)["outputs"])
    got["log"] = [r.array().tolist() for r in core.store.read_log()]
    assert core.pool.num_used == 1 and not core.requests  # the session's slot only
    return got


def test_answers_and_session_states_equal_those_of_the_engine_that_reads_every_step(tmp_path):
    stops = {"stop": probe(tmp_path / "a", [2, 7, 1, 8], Sampling(max_tokens=10, **VARIED))[4],
             "gen": probe(tmp_path / "b", [4, 4, 2], Sampling(max_tokens=8, **VARIED))[3]}
    sync = serve_workload(tmp_path / "sync", False, stops)
    ahead = serve_workload(tmp_path / "async", True, stops)
    outs_sync, outs_async = sync["outputs"], ahead["outputs"]
    assert sorted(outs_sync) == sorted(outs_async)
    for rid in outs_sync:
        want, got = finish_of(outs_sync[rid]), finish_of(outs_async[rid])
        assert tokens_of(outs_async[rid]) == tokens_of(outs_sync[rid]), rid
        assert (got.finish_reason, got.steps, got.error) == (want.finish_reason, want.steps, want.error), rid
    # the cases the workload is there for did happen
    assert finish_of(outs_sync["stop"]).finish_reason == "stop" and 1 < len(tokens_of(outs_sync["stop"])) <= 5
    assert finish_of(outs_sync["gen"]).finish_reason == "stop" and 1 < len(tokens_of(outs_sync["gen"])) <= 4
    assert len(tokens_of(outs_sync["forks.1"])) == 6
    lp_sync = [o.logprobs for o in outs_sync["logprobs"] if o.logprobs is not None]
    lp_async = [o.logprobs for o in outs_async["logprobs"] if o.logprobs is not None]
    assert lp_sync and sum((lp.chosen for lp in lp_async), []) == pytest.approx(
        sum((lp.chosen for lp in lp_sync), []), abs=1e-5)
    logits = [finish_of(r["outputs"]["after"]) for r in (sync, ahead)]
    after_sync, after_async = (np.concatenate([o.outputs["logits"].numpy() for o in r["outputs"]["after"]
                                               if o.outputs]) for r in (sync, ahead))
    assert logits[0].steps == logits[1].steps
    np.testing.assert_allclose(after_async, after_sync, rtol=1e-5, atol=1e-5)  # the same state
    assert ahead["log"] == sync["log"]  # the same inputs logged: a restart replays the same state


def test_a_session_generate_cancelled_while_its_next_step_runs_keeps_state_logits_and_log_together(tmp_path):
    core = make_real_core(tmp_path, max_num_streams=4, async_scheduling=True)
    op(core, "create", "create")
    sid = run_until_quiet(core)["replies"]["create"].session
    add(core, "gen", [1, 2, 3], session=sid, sampling=Sampling(max_tokens=50, ignore_eos=True, **VARIED))
    outs = []
    for _ in range(6):
        outs += [o for batch in core.run_once(timeout=0).values() for o in batch.request_outputs()]
    assert core.running_ahead  # a step is in flight when the abort comes
    core.inbox.put(Abort("c", "gen"))
    outs += run_until_quiet(core)["outputs"]["gen"]
    done = finish_of(outs)
    generated = tokens_of(outs)
    assert done.finish_reason == "cancelled" and 0 < len(generated) < 50
    session = core.sessions.get(sid)
    steps = core.pool.steps(session.slot)
    fed = [x for record in core.store.read_log() for x in record.array().tolist()]
    assert session.steps == steps == len(fed) == done.steps  # the state holds exactly the logged inputs
    assert fed == [1, 2, 3] + generated[:len(fed) - 3]
    # the kept logits are those of the state: generating on from them equals replaying the log in a fresh stream
    add(core, "next", [], session=sid, sampling=Sampling(max_tokens=1, temperature=0))
    following = tokens_of(run_until_quiet(core)["outputs"]["next"])
    fresh = make_real_core(tmp_path / "fresh", async_scheduling=False)
    add(fresh, "replay", fed, sampling=Sampling(max_tokens=1, temperature=0))
    assert following == tokens_of(run_until_quiet(fresh)["outputs"]["replay"])


def test_concurrent_http_completions_answer_alike_with_and_without_async_scheduling():
    plain = [{"prompt": [i, 7, 1 + i], "max_tokens": 8 + i % 7, "temperature": 2.0, "seed": i,
              "stop_token_ids": list(range(100, 100 + 12 * i))} for i in range(12)]  # some stop, some run out
    # beside those, what makes steps be read back at once: samples that fork, logprobs
    mixed = [{"prompt": [3, 3, i], "max_tokens": 6, "temperature": 4.0, "seed": i, "n": 2} for i in range(2)]
    mixed += [{"prompt": [9, 9, i], "max_tokens": 5, "temperature": 0, "logprobs": 1} for i in range(2)]
    mixed += plain[:4]

    async def answers(url, bodies):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            got = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
        assert all(r.status_code == 200 for r in got), [r.text for r in got]
        return [[(c["token_ids"], c["finish_reason"]) for c in r.json()["choices"]] for r in got]

    results = {}
    for mode in (True, False):
        with running(tiny_lm(), ByteTokenizer(), max_num_streams=16, max_num_batched_tokens=64,
                     async_scheduling=mode) as srv:
            assert srv.core.async_scheduling is mode and srv.stats()["async_scheduling"] is mode  # /health says
            results[mode] = [asyncio.run(answers(srv.url, bodies)) for bodies in (plain, mixed)]
    assert results[True] == results[False]
    assert {reason for answer in results[True][0] for _, reason in answer} == {"stop", "length"}


def test_auto_leaves_it_off_without_a_device_to_overlap_and_bad_values_are_refused(tmp_path):
    core = make_real_core(tmp_path)  # "auto", the default
    choose_async_scheduling(core)
    assert core.config.async_scheduling == "auto" and core.async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling"):
        ServerConfig(async_scheduling="sometimes")
