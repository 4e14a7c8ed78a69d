"""A hybrid model directory (recurrent, attention and MLP layers) served by `infomamba serve --model DIR`: a session
fed in chunks equals one /v1/forward, concurrent completions equal one-at-a-time decoding, a snapshot resumes on a
fresh server with the same outputs, and a server of a plain model refuses it with a 4xx naming the rings."""
from __future__ import annotations

import asyncio
import base64

import httpx
import torch

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba
from model.state import state_nbytes_per_stream
from model.tokenizer import ByteTokenizer
from model.weights import load_model, save_model
from tests.server.conftest import running, tiny_lm
from tests.server.test_engine_api import greedy_reference
from tests.server.test_processes import ServeProcess

ATOL = 1e-4


def tiny_hybrid_lm(seed: int = 0) -> InfoMamba:
    """MambaFormer's order: a recurrent layer first; grouped-query attention with rotary positions over 8 steps, an
    MLP, multi-head attention over 3 steps without positions; the test streams run many windows long."""
    torch.manual_seed(seed)
    layers = [{"type": "infomamba"},
              {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "attention_window": 8, "rope": True},
              {"type": "mlp", "d_mlp": 64},
              {"type": "attention", "n_heads": 2, "attention_window": 3}]
    model = InfoMamba(InfoMambaConfig(d_model=32, vocab_size=260, n_concepts=4, d_state=8, layers=layers,
                                      name="tiny-hybrid"))
    with torch.no_grad():
        model.embedding.weight.mul_(25)  # spread the logits so that greedy decoding varies, as tiny_lm does
    return model.eval()


def logits_of(client: httpx.Client, sid: str, ids: list[int]) -> list:
    r = client.post(f"/v1/sessions/{sid}/append", json={"input_ids": ids, "outputs": ["logits"]})
    assert r.status_code == 200, r.text
    return r.json()["results"]["logits"]


def test_a_hybrid_directory_serves_chunks_like_one_pass_and_its_snapshots_move_only_between_hybrids(tmp_path):
    model_dir = save_model(tiny_hybrid_lm(), tmp_path / "tiny-hybrid")
    # fp32 on any device (a GPU's default is bf16), so chunks = one pass holds to fp32 rounding and the state's
    # size below is the fp32 one; boots while the rest is prepared
    served = ServeProcess(model_dir, tmp_path / "sessions", "--dtype", "float32")
    try:
        model = load_model(model_dir).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (45,), generator=gen).tolist()  # 5 windows of 8, 15 of 3
        prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
                   for n in torch.randint(1, 30, (12,), generator=gen)]
        expected = [greedy_reference(model, p, 6) for p in prompts]
        with running(load_model(model_dir).eval(), ByteTokenizer(), max_num_streams=4) as fresh, \
                running(tiny_lm(), ByteTokenizer(), max_num_streams=4) as plain:
            served.wait_ready()
            client = httpx.Client(base_url=served.url, timeout=60)
            card = client.get("/v1/models").json()["data"][0]
            assert card["config"]["layers"][1]["attention_window"] == 8
            rings = 2 * 4 * (2 * 8 * 8 + 2 * 3 * 16)  # K and V of both attention layers: kv heads x W x d_head, fp32
            one_recurrent_layer = InfoMambaConfig(d_model=32, n_layers=1, vocab_size=260, n_concepts=4, d_state=8)
            assert card["state_bytes_per_stream"] == state_nbytes_per_stream(one_recurrent_layer) + rings

            whole = client.post("/v1/forward", json={"input_ids": [ids], "outputs": ["logits"]}).json()
            whole = torch.tensor(whole["results"][0]["logits"])
            sid = client.post("/v1/sessions", json={}).json()["id"]
            got, start = [], 0
            for size in (1, 6, 13, 2, 3):  # chunks across the windows' wraparound; 25 steps in all
                got += logits_of(client, sid, ids[start:start + size])
                start += size
            torch.testing.assert_close(torch.tensor(got), whole[:25], atol=ATOL, rtol=1e-4)
            snapshot = client.get(f"/v1/sessions/{sid}/snapshot").content
            got += logits_of(client, sid, ids[25:])
            torch.testing.assert_close(torch.tensor(got), whole, atol=ATOL, rtol=1e-4)

            async def complete(prompt):  # batched with each other: prefill chunks and decode steps share steps
                async with httpx.AsyncClient(base_url=served.url, timeout=120) as c:
                    r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                              "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["token_ids"]

            async def all_of():
                return await asyncio.gather(*(complete(p) for p in prompts))

            assert asyncio.run(all_of()) == expected

            body = {"snapshot": base64.b64encode(snapshot).decode()}
            resumed = httpx.post(fresh.url + "/v1/sessions", json=body, timeout=60).json()
            assert resumed["steps"] == 25
            with httpx.Client(base_url=fresh.url, timeout=60) as other:
                rest = logits_of(other, resumed["id"], ids[25:])
            torch.testing.assert_close(torch.tensor(rest), whole[25:], atol=ATOL, rtol=1e-4)

            refused = httpx.post(plain.url + "/v1/sessions", json=body, timeout=60)
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert error["code"] == "invalid_snapshot" and error["field"] == "snapshot"
            assert "attention key/value rings of a hybrid model" in error["message"]
            assert plain.stats()["slots_used"] == 0
    finally:
        served.kill_all()


def test_the_bundled_mqar_hybrid_recalls_through_the_server(tmp_path):
    """model/task_models/mqar-hybrid (trained on the GPU: bench/RESULTS.md, issue 11) served as a user would: at
    every query of unseen multi-query associative recall sequences, its greedy answer is the queried key's value,
    through /v1/forward and through a session fed in chunks that split the pairs from the queries."""
    from pathlib import Path

    from model.training.tasks import MqarTask

    model_dir = Path(__file__).resolve().parents[2] / "model" / "task_models" / "mqar-hybrid"
    task = MqarTask(num_pairs=16, num_queries=16, num_keys=64, num_values=64)
    batch = task.sample(8, torch.Generator().manual_seed(1234))
    srv = ServeProcess(model_dir, tmp_path / "sessions").wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            r = client.post("/v1/forward", json={"input_ids": batch.inputs.tolist(), "outputs": ["logits"]})
            assert r.status_code == 200, r.text
            answers = torch.tensor([res["logits"] for res in r.json()["results"]]).argmax(-1)
            accuracy = (answers[batch.scored] == batch.targets[batch.scored]).float().mean().item()
            assert accuracy >= 0.95, accuracy
            sid = client.post("/v1/sessions", json={}).json()["id"]
            ids = batch.inputs[0].tolist()
            logits_of(client, sid, ids[:2 * task.num_pairs])  # the pairs, then the queries in a second chunk
            asked = torch.tensor(logits_of(client, sid, ids[2 * task.num_pairs:])).argmax(-1)
            assert torch.equal(asked, answers[0, 2 * task.num_pairs:])
    finally:
        srv.kill_all()
