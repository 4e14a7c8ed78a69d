"""The windowed-attention decode kernel against its reference, split over the window or not, and T decode steps
against one chunk of T tokens."""
import pytest
import torch
from kernel_testing import DEVICE, ON_GPU, assert_close, packed_batch
from test_window_attention import ATT_TOL, CASES, D_HEAD, SEEN, attention_inputs

from kernels.window_attention import window_attention
from kernels.window_attention_update import (_window_attention_update, window_attention_update,
                                             window_attention_update_ref)

BATCHES = [1, 64, 256] if ON_GPU else [1, 5]


@pytest.mark.parametrize("dtype, window", CASES)
@pytest.mark.parametrize("batch", BATCHES)
def test_window_attention_update_matches_ref(dtype, window, batch):
    num_slots = max(batch + 3, len(SEEN))
    q, k, v, rings, _ = attention_inputs([1] * batch, window, dtype)
    rings = [r.repeat(-(-num_slots // r.shape[0]), 1, 1, 1)[:num_slots].contiguous() for r in rings]
    steps = torch.tensor((SEEN * num_slots)[:num_slots], dtype=torch.int64, device=DEVICE)
    _, idx = packed_batch([1] * batch, num_slots, dead=(batch // 2,) if batch > 1 else ())
    ref_rings, our_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    want = window_attention_update_ref(q, k, v, *ref_rings, steps, idx, D_HEAD ** -0.5)
    got = window_attention_update(q, k, v, *our_rings, steps, idx, D_HEAD ** -0.5)
    assert_close(got, want, ATT_TOL[dtype], "out")
    assert torch.equal(our_rings[0], ref_rings[0]) and torch.equal(our_rings[1], ref_rings[1])
    if batch > 1:
        assert (got[batch // 2] == 0).all()


@pytest.mark.parametrize("num_splits", [4])
def test_a_window_split_among_programs_merges_to_the_same_output(num_splits):
    # splits that get nothing (a stream younger than the window) and splits past the ring's wraparound
    q, k, v, rings, steps = attention_inputs([1] * 5, 13, torch.float32, seed=3)
    _, idx = packed_batch([1] * 5, len(SEEN), dead=(2,), seed=3)
    ref_rings, our_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    want = window_attention_update_ref(q, k, v, *ref_rings, steps, idx, 0.3)
    got = _window_attention_update(q, k, v, *our_rings, steps, idx, 0.3, num_splits=num_splits)
    assert_close(got, want, ATT_TOL[torch.float32], "out")
    assert torch.equal(our_rings[0], ref_rings[0]) and torch.equal(our_rings[1], ref_rings[1])
    assert (got[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_equal_one_chunk(dtype):
    """T decode steps of a batch of slots equal the chunk kernel over the same T tokens per sequence."""
    batch, steps_per_seq, window = 3, 5, 3
    q, k, v, rings, steps = attention_inputs([steps_per_seq] * batch, window, dtype, seed=4)
    cu, idx = packed_batch([steps_per_seq] * batch, len(SEEN), dead=(1,), seed=4)
    stepped_rings, chunk_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    stepped_steps, outs = steps.clone(), []
    live = idx[idx >= 0].long()
    for t in range(steps_per_seq):
        rows = torch.arange(batch, device=DEVICE) * steps_per_seq + t  # token t of each sequence
        outs.append(window_attention_update(q[rows], k[rows], v[rows], *stepped_rings, stepped_steps, idx, 0.5))
        stepped_steps[live] += 1
    stepped = torch.stack(outs, 1).reshape(q.shape)
    chunked = window_attention(q, k, v, *chunk_rings, steps, cu, idx, 0.5)
    assert_close(stepped, chunked, ATT_TOL[dtype], "out")
    assert torch.equal(stepped_rings[0], chunk_rings[0]) and torch.equal(stepped_rings[1], chunk_rings[1])
