"""Sampling: batched unseeded rows and per-request seeded rows obey temperature, top-k and top-p."""
import pytest
import torch

from server.engine.sampler import _sample_rows, sample
from server.engine.sequence import SamplingParams, Sequence


def seq(**params):
    return Sequence(torch.tensor([1]), sampling=SamplingParams(**params))


def test_top_k_and_top_p_restrict_the_draw_row_by_row():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(3, 1)
    params = [SamplingParams(temperature=5.0, top_k=2), SamplingParams(temperature=5.0, top_p=1e-6),
              SamplingParams(temperature=5.0)]
    draws = torch.stack([_sample_rows(logits, params, torch.rand(3, 5)) for _ in range(400)])  # (400, 3)
    assert set(draws[:, 0].tolist()) == {0, 1}  # top-k 2 keeps the two best
    assert set(draws[:, 1].tolist()) == {0}  # a tiny top-p keeps only the best
    assert len(set(draws[:, 2].tolist())) == 5  # a hot unrestricted row reaches every token


def test_top_p_is_taken_over_what_top_k_kept():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    params = [SamplingParams(top_k=2, top_p=0.5)]  # after top-k: 0.57, 0.43 -> top-p 0.5 keeps only the first
    assert {int(_sample_rows(logits, params, torch.rand(1, 4))[0]) for _ in range(100)} == {0}


def test_greedy_rows_and_seeded_rows_reproduce_whatever_their_neighbours():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    first, _ = sample(logits, [seq(temperature=0), seq(seed=7), seq(), seq(seed=8, top_p=0.9)])
    again, _ = sample(logits.flip(0), [seq(seed=8, top_p=0.9), seq(), seq(seed=7), seq(temperature=0)])
    assert first[0] == int(logits[0].argmax()) == again[3]
    assert first[1] == again[2] and first[3] == again[0]


def test_draws_follow_the_softmax_at_temperature_one():
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = torch.stack([_sample_rows(logits, [SamplingParams()], torch.rand(1, 3)) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_processors_follow_their_formulas_and_leave_the_callers_logits_alone():
    from server.engine.sampler import process_logits

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    kept = logits.clone()
    s = Sequence(torch.tensor([0, 1]), sampling=SamplingParams(
        repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: 10.0, 4: -1.0},
        min_tokens=3, stop_token_ids=(2,), eos_id=3))
    s.output_ids = [4, 4]  # generated twice; the prompt holds 0 and 1
    got = process_logits(logits, [s], [0])[0]
    assert torch.equal(logits, kept)
    # 0, 1: in the prompt -> repetition only; 2, 3: stop and eos, masked (2 of 3 tokens out); 4: bias -1, then
    # repetition (negative: times 2), then frequency 0.25 * 2 and presence 0.5; 5: bias only
    want = torch.tensor([1.0, -2.0, float("-inf"), float("-inf"), (-2.0 - 1.0) * 2 - 0.5 - 0.5, 11.0])
    torch.testing.assert_close(got, want)
    s.output_ids = [4, 4, 4]  # min_tokens reached: eos and stop ids come back
    assert torch.isfinite(process_logits(logits, [s], [0])[0][2:4]).all()


def test_plain_rows_take_the_fast_path_and_logprobs_rows_report_the_model_s_distribution():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    plain, asked = seq(temperature=0), seq(temperature=0, logprobs=3, logit_bias={7: 100.0})
    tokens, found = sample(logits, [plain, asked, seq(seed=1)])
    assert plain.history is None and tokens[0] == int(logits[0].argmax()) and tokens[1] == 7
    assert set(found) == {1}  # by row, only the row that asked
    raw = torch.log_softmax(logits[1], -1)
    assert found[1].chosen == [pytest.approx(float(raw[7]), abs=1e-6)]  # before the bias
    assert found[1].top_ids == [torch.topk(raw, 3).indices.tolist()]
    assert sample(logits, [plain, plain, plain])[1] == {}


def test_input_logprobs_score_a_long_input_block_by_block():
    from server.engine.sampler import INPUT_BLOCK, input_logprobs

    logits = torch.randn(2 * INPUT_BLOCK + 5, 12, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 12, (logits.shape[0],), generator=torch.Generator().manual_seed(4))
    found = input_logprobs(logits, targets, 2)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(torch.tensor(found.chosen), raw.gather(1, targets[:, None])[:, 0])
    assert found.top_ids == torch.topk(raw, 2).indices.tolist() and len(found.top_logprobs) == logits.shape[0]
