"""Sampling: batched unseeded rows and per-request seeded rows obey temperature, top-k and top-p."""
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
    first = sample(logits, [seq(temperature=0), seq(seed=7), seq(), seq(seed=8, top_p=0.9)])
    again = sample(logits.flip(0), [seq(seed=8, top_p=0.9), seq(), seq(seed=7), seq(temperature=0)])
    assert first[0] == int(logits[0].argmax()) == again[3]
    assert first[1] == again[2] and first[3] == again[0]


def test_draws_follow_the_softmax_at_temperature_one():
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = torch.stack([_sample_rows(logits, [SamplingParams()], torch.rand(1, 3)) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
