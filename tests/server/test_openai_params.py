"""OpenAI completions parameters through the real server, each checked against the model run directly with the
same rule applied in plain Python (or by transformers' own processor): logit_bias, repetition / presence /
frequency penalties, min_tokens, logprobs, echo and n > 1 (one prefill, forked state)."""
import json

import httpx
import openai
import pytest
import torch

from tests.server.conftest import tiny_lm
from tests.server.test_engine_api import wait_all_slots_free

EOS = 257  # the byte tokenizer's
PROMPT = [10, 20, 30, 40, 50, 20, 30]


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def reference(model, prompt, max_tokens, process=None, temperature=0.0, seed=0):
    """Decoding by the model alone; process(logits, generated) -> logits before each pick. Greedy, or at a
    temperature the server's seeded draw: Gumbel-max with the request's generator's uniforms given by rank.
    Returns the tokens and, per step, the unprocessed log-softmax."""
    generator = torch.Generator(device=model.device).manual_seed(seed)  # where the server draws (on a GPU too)
    with torch.inference_mode():
        state = model.empty_state(1)
        out, _ = model(torch.tensor([prompt]), state)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logits = out.head[-1].float()
            logprobs.append(torch.log_softmax(logits, -1))
            if process is not None:
                logits = process(logits.clone(), tokens)
            if temperature:
                ranked, order = torch.sort(logits / temperature, descending=True)
                uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
                tokens.append(int(order[torch.argmax(ranked - torch.log(-torch.log(uniform)))]))
            else:
                tokens.append(int(logits.argmax()))
            out, _ = model(torch.tensor([[tokens[-1]]]), state)
        return tokens, logprobs


def prompt_logprobs(model, prompt):
    with torch.inference_mode():
        out, _ = model(torch.tensor([prompt]), model.empty_state(1))
        return torch.log_softmax(out.head.float(), -1)  # (len, vocab): row i predicts token i + 1


def complete(srv, **body):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_logit_bias_forces_and_bans_tokens(lm_server, model):
    plain = complete(lm_server, max_tokens=6)["choices"][0]["token_ids"]
    assert plain == reference(model, PROMPT, 6)[0]
    forced = complete(lm_server, max_tokens=6, logit_bias={"65": 100})["choices"][0]["token_ids"]
    assert forced == [65] * 6
    banned = complete(lm_server, max_tokens=6, logit_bias={str(plain[0]): -100})["choices"][0]["token_ids"]
    assert plain[0] not in banned

    def ban(logits, generated):
        logits[plain[0]] -= 100
        return logits
    assert banned == reference(model, PROMPT, 6, ban)[0]


def test_repetition_penalty_is_hugging_face_s(lm_server, model):
    from transformers import RepetitionPenaltyLogitsProcessor

    hf = RepetitionPenaltyLogitsProcessor(penalty=3.0)

    def penalise(logits, generated):
        return hf(torch.tensor([PROMPT + generated], device=logits.device), logits[None])[0]
    want = reference(model, PROMPT, 12, penalise)[0]
    assert want != reference(model, PROMPT, 12)[0]  # the penalty changes what greedy picks
    assert complete(lm_server, max_tokens=12, repetition_penalty=3.0)["choices"][0]["token_ids"] == want


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (-0.5, 1.0)])
def test_presence_and_frequency_penalties_are_openai_s(lm_server, model, frequency, presence):
    def penalise(logits, generated):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=logits.device),
                                minlength=logits.shape[0]).float()
        return logits - frequency * counts - presence * (counts > 0).float()
    sampled = {"temperature": 3.0, "seed": 4}  # this tiny model's greedy picks are too sure for a penalty of 2
    want = reference(model, PROMPT, 12, penalise, **sampled)[0]
    assert want != reference(model, PROMPT, 12, **sampled)[0]
    got = complete(lm_server, max_tokens=12, frequency_penalty=frequency, presence_penalty=presence, **sampled)
    assert got["choices"][0]["token_ids"] == want


def test_min_tokens_holds_back_eos_and_stop_ids(lm_server):
    eos_first = complete(lm_server, max_tokens=8, logit_bias={str(EOS): 100})["choices"][0]
    assert eos_first["token_ids"] == [EOS] and eos_first["finish_reason"] == "stop"
    held = complete(lm_server, max_tokens=8, logit_bias={str(EOS): 100}, min_tokens=3)["choices"][0]
    assert len(held["token_ids"]) == 4 and held["token_ids"][3] == EOS and EOS not in held["token_ids"][:3]
    assert held["finish_reason"] == "stop"
    stop_id = complete(lm_server, max_tokens=8, logit_bias={"66": 100}, stop_token_ids=[66],
                       min_tokens=2)["choices"][0]
    assert stop_id["token_ids"][2] == 66 and 66 not in stop_id["token_ids"][:2] and len(stop_id["token_ids"]) == 3


def test_penalties_work_in_a_session_generate(lm_server):
    sid = httpx.post(lm_server.url + "/v1/sessions", json={}).json()["id"]
    r = httpx.post(f"{lm_server.url}/v1/sessions/{sid}/generate",
                   json={"input_ids": PROMPT, "max_tokens": 4, "temperature": 0, "logit_bias": {"70": 100}})
    assert r.status_code == 200 and r.json()["ids"] == [70] * 4
    httpx.delete(f"{lm_server.url}/v1/sessions/{sid}")


def check_logprobs(got: dict, want_rows, tokens, k):
    """got: a completions logprobs object over `tokens`; want_rows: the model's log-softmax predicting each."""
    for i, (token, row) in enumerate(zip(tokens, want_rows)):
        if row is None:
            assert got["token_logprobs"][i] is None and got["top_logprobs"][i] is None
            continue
        assert got["token_logprobs"][i] == pytest.approx(float(row[token]), abs=1e-4)
        top = got["top_logprobs"][i]
        best = torch.topk(row, k).values.tolist()
        assert sorted(top.values(), reverse=True)[:k] == pytest.approx(best, abs=1e-4)
        assert len(top) in (k, k + 1)  # the chosen token is always there
        assert top[got["tokens"][i]] == pytest.approx(float(row[token]), abs=1e-4)


def test_logprobs_and_echo_match_the_model(lm_server, model):
    tokens, rows = reference(model, PROMPT, 5)
    choice = complete(lm_server, max_tokens=5, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 5 and lp["tokens"][0] == chr(tokens[0]) if tokens[0] < 128 else True
    check_logprobs(lp, rows, tokens, 3)
    # text_offset counts from the prompt's start, and each token's text is where it says
    text = "".join(map(chr, PROMPT)) + choice["text"]
    assert lp["text_offset"][0] == len(PROMPT)
    for token, offset in zip(tokens, lp["text_offset"]):
        if token < 128:
            assert text[offset] == chr(token)

    echoed = complete(lm_server, max_tokens=5, logprobs=2, echo=True)["choices"][0]
    assert echoed["text"] == "".join(map(chr, PROMPT)) + choice["text"]
    lp = echoed["logprobs"]
    assert lp["tokens"] == [chr(t) for t in PROMPT] + choice["logprobs"]["tokens"]
    assert lp["text_offset"] == list(range(len(PROMPT))) + choice["logprobs"]["text_offset"]
    whole = prompt_logprobs(model, PROMPT)
    check_logprobs(lp, [None] + list(whole[:-1]) + rows, PROMPT + tokens, 2)

    scored = complete(lm_server, max_tokens=0, logprobs=1, echo=True)["choices"][0]  # the prompt alone, scored
    assert scored["text"] == "".join(map(chr, PROMPT)) and scored["finish_reason"] == "length"
    assert scored["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(PROMPT)]
    assert complete(lm_server, max_tokens=3)["choices"][0]["logprobs"] is None


def stream(srv, **body):
    chunks = []
    with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": PROMPT, "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_streamed_echo_and_logprobs_equal_the_plain_answer(lm_server):
    body = {"max_tokens": 6, "logprobs": 2, "echo": True, "temperature": 0.8, "seed": 3, "n": 2}
    plain = complete(lm_server, **body)["choices"]
    for index in (0, 1):
        text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for chunk in stream(lm_server, **body):
            for choice in chunk["choices"]:
                if choice["index"] == index:
                    text += choice["text"]
                    for key, values in (choice["logprobs"] or {}).items():
                        lp[key] += values
        assert text == plain[index]["text"] and lp == plain[index]["logprobs"]


def test_n_samples_fork_one_prefill(lm_server, model):
    reg = lm_server.core.metrics.registry
    before = reg.get_sample_value("infomamba:prompt_tokens_total")
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 4}
    choices = complete(lm_server, **body)["choices"]
    assert reg.get_sample_value("infomamba:prompt_tokens_total") - before == len(PROMPT)  # the prompt ran once
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert len({tuple(c["token_ids"]) for c in choices}) > 1  # independent samples
    for i, c in enumerate(choices):  # sample i is what a single request with seed + i draws
        alone = complete(lm_server, **{**body, "n": 1, "seed": 11 + i})["choices"][0]
        assert c["token_ids"] == alone["token_ids"]
    greedy = complete(lm_server, max_tokens=5, n=3, prompt=[PROMPT, [1, 2, 3]])
    assert [c["index"] for c in greedy["choices"]] == list(range(6))
    for k, c in enumerate(greedy["choices"]):  # prompt-major, each the model's greedy answer
        assert c["token_ids"] == reference(model, [PROMPT, [1, 2, 3]][k // 3], 5)[0]
    assert greedy["usage"]["prompt_tokens"] == len(PROMPT) + 3 and greedy["usage"]["completion_tokens"] == 30


def test_n_samples_streamed_and_cancelled(lm_server):
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3}
    plain = complete(lm_server, **body)["choices"]
    got = {0: [], 1: [], 2: []}
    for chunk in stream(lm_server, **body):
        for choice in chunk["choices"]:
            got[choice["index"]] += choice.get("token_ids", [])
    assert [got[i] for i in range(3)] == [c["token_ids"] for c in plain]
    with httpx.stream("POST", lm_server.url + "/v1/completions",  # hang up after the first chunk
                      json={"prompt": PROMPT, "max_tokens": 2000, "n": 3, "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())
    wait_all_slots_free(lm_server)
    with httpx.stream("POST", lm_server.url + "/v1/completions",  # one choice: streamed from the request's task
                      json={"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())
    wait_all_slots_free(lm_server)
    for n in (1, 3):  # a plain answer's client hanging up stops its work too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(lm_server.url + "/v1/completions", timeout=0.3,
                       json={"prompt": PROMPT, "max_tokens": 2000, "n": n, "ignore_eos": True})
        wait_all_slots_free(lm_server)


def test_openai_client_sampling_parameters(lm_server):
    client = openai.OpenAI(base_url=lm_server.url + "/v1", api_key="unused")
    out = client.completions.create(model="tiny-lm", prompt=PROMPT, max_tokens=4, temperature=0, n=2, logprobs=2,
                                    echo=True, logit_bias={"65": 100}, presence_penalty=0.1, frequency_penalty=0.1,
                                    seed=1, user="u", extra_body={"min_tokens": 1, "repetition_penalty": 1.1})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[1].text == "".join(map(chr, PROMPT)) + "AAAA"
    assert out.choices[0].logprobs.tokens[-4:] == ["A"] * 4 and out.choices[0].logprobs.token_logprobs[0] is None
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-lm", prompt=PROMPT, best_of=3)
    assert err.value.param == "best_of" and err.value.code == "invalid_request" and "best_of" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="tiny-lm", prompt=PROMPT, logit_bias={"999": 1})
    assert err.value.param == "logit_bias.999" and err.value.type == "invalid_request_error"
