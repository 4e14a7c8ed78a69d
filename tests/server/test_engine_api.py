"""Batched serving equals one-at-a-time decoding, under concurrency and cancellations; the openai client works."""
import asyncio
import json
import random
import time

import httpx
import openai
import pytest
import torch

from tests.server.conftest import tiny_lm


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        state = model.empty_state(1)
        out, _ = model(torch.tensor([prompt]), state)
        tokens = []
        for _ in range(max_tokens):
            tokens.append(int(out.head[-1].argmax()))
            out, _ = model(torch.tensor([[tokens[-1]]]), state)
        return tokens


def wait_all_slots_free(srv, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = srv.stats()
        if counts["slots_used"] == 0 and counts["running"] == 0 and counts["waiting"] == 0:
            return counts
        time.sleep(0.02)
    raise AssertionError(f"slots still held: {srv.stats()}")


def test_concurrent_batched_equals_sequential_with_cancellations(lm_server):
    model = tiny_lm()
    rng = random.Random(0)
    jobs = []
    for i in range(24):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 90))]
        jobs.append({"prompt": prompt, "max_tokens": rng.randint(1, 12), "cancel_after": rng.choice([None, None, 1, 3]),
                     "stream": rng.random() < 0.6})
    expected = [greedy_reference(model, j["prompt"], j["max_tokens"]) for j in jobs]

    async def one(client, job):
        body = {"prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0, "stream": job["stream"]}
        if not job["stream"]:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"], False
        ids, cancelled = [], False
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["finish_reason"] is None:
                    ids += chunk["choices"][0]["token_ids"]
                n += 1
                if job["cancel_after"] is not None and n >= job["cancel_after"]:
                    cancelled = True
                    break  # closes the connection mid-stream
        return ids, cancelled

    async def main():
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, j) for j in jobs))

    results = asyncio.run(main())
    steps_before = lm_server.stats()["num_steps"]
    for job, want, (got, cancelled) in zip(jobs, expected, results):
        if cancelled:
            assert got == want[:len(got)]
        else:
            assert got == want
    assert any(cancelled for _, cancelled in results)
    reg = lm_server.core.metrics.registry
    assert reg.get_sample_value("infomamba:batch_size_sum") > reg.get_sample_value("infomamba:batch_size_count")
    wait_all_slots_free(lm_server)
    assert steps_before > len(jobs) // 2  # the work really went through the engine
    counts = lm_server.stats()
    assert counts["slots_used"] == 0 and counts["slots_total"] == 8


def test_seeded_sampling_reproduces(lm_server):
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}
    a = httpx.post(lm_server.url + "/v1/completions", json=body).json()["choices"][0]["token_ids"]
    b = httpx.post(lm_server.url + "/v1/completions", json=body).json()["choices"][0]["token_ids"]
    assert a == b and len(a) == 8


def test_stop_string_cuts_text(lm_server):
    r = httpx.post(lm_server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 12, "temperature": 0})
    text = r.json()["choices"][0]["text"]
    stop = text[3:5]
    r = httpx.post(lm_server.url + "/v1/completions",
                   json={"prompt": "hello", "max_tokens": 12, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.index(stop)]


def test_openai_client_streamed_and_not(lm_server):
    client = openai.OpenAI(base_url=lm_server.url + "/v1", api_key="unused")
    assert client.models.list().data[0].id == "tiny-lm"
    full = client.completions.create(model="tiny-lm", prompt="Once upon", max_tokens=10, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len("Once upon") and full.usage.completion_tokens == 10
    pieces, reasons = [], []
    for chunk in client.completions.create(model="tiny-lm", prompt="Once upon", max_tokens=10, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 10
    assert "".join(pieces) == full.choices[0].text
    assert reasons[-1] == "length"


def test_pool_sized_automatically_when_max_num_streams_is_zero():
    from tests.server.conftest import TEST_DEVICE, running

    with running(tiny_lm(), None, max_num_streams=0, max_num_batched_tokens=16) as srv:
        counts = srv.stats()
        # the CPU gets a fixed pool, a GPU as many as fit; batched tokens grow to cover every stream's decode step
        assert counts["slots_total"] == 64 if TEST_DEVICE == "cpu" else counts["slots_total"] > 64
        assert counts["max_num_batched_tokens"] >= counts["slots_total"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3


def test_a_plain_completion_whose_client_goes_away_stops_in_the_engine(lm_server):
    """A non-streamed answer: the client's disconnect cancels the request's wait, and so its engine request, long
    before its max_tokens would have run (a request left running would hold its slot for its 60,000 steps)."""
    body = {"prompt": [1, 2, 3], "max_tokens": 60_000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(lm_server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    counts = wait_all_slots_free(lm_server, timeout=10)
    assert counts["slots_used"] == 0
    assert lm_server.stats()["num_steps"] < 40_000
    # and the server answers the next request as usual
    r = httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
