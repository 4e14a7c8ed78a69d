"""The windowed-attention chunk kernel against its reference: outputs and the rings it writes, with -1 slots,
grouped-query heads, windows of 1 and longer than the stream, and streams that wrapped their ring many times."""
import pytest
import torch
from kernel_testing import DEVICE, ON_GPU, assert_close, packed_batch, split_packed, join_parts

from kernels.window_attention import _window_attention, window_attention, window_attention_ref

# attention outputs in the input dtype (bf16/fp16 dots on a GPU) against the fp32 reference
ATT_TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (6e-2, 5e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
if ON_GPU:
    HEADS, D_HEAD, LENGTHS, WINDOWS = (12, 4), 64, [1, 7, 300, 700, 33, 0], [1, 64, 4096]
else:
    HEADS, D_HEAD, LENGTHS, WINDOWS = (4, 2), 6, [5, 1, 37, 0, 12], [1, 6, 40]  # 40: longer than the stream
# (dtype, window) pairs: every pair on a GPU; on the CPU the interpreter computes in fp32 whatever the dtype, so
# each window once in fp32 and the low-precision dtypes once each
if ON_GPU:
    CASES = [(dtype, window) for dtype in DTYPES for window in WINDOWS]
else:
    CASES = [(torch.float32, 1), (torch.float32, 6), (torch.float32, 40), (torch.bfloat16, 6), (torch.float16, 40)]
# steps seen before the chunk, per slot: a fresh stream, one shy of a window, and streams deep into wraparound
SEEN = [0, 5, 1_000_003, 79, 2, 123_457, 0, 9]


def attention_inputs(lengths, window, dtype, heads=HEADS, d_head=D_HEAD, seed=0):
    n_heads, n_kv_heads = heads
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, n_heads, d_head, generator=g).to(DEVICE, dtype)
    k = torch.randn(total, n_kv_heads, d_head, generator=g).to(DEVICE, dtype)
    v = torch.randn(total, n_kv_heads, d_head, generator=g).to(DEVICE, dtype)
    slots = len(SEEN)
    rings = [torch.randn(slots, n_kv_heads, window, d_head, generator=g).to(DEVICE, dtype) for _ in range(2)]
    steps = torch.tensor(SEEN, dtype=torch.int64, device=DEVICE)
    return q, k, v, rings, steps


@pytest.mark.parametrize("dtype, window", CASES)
def test_window_attention_matches_ref(dtype, window):
    q, k, v, rings, steps = attention_inputs(LENGTHS, window, dtype)
    cu, idx = packed_batch(LENGTHS, len(SEEN), dead=(1,))
    ref_rings, our_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    scale = D_HEAD ** -0.5
    want = window_attention_ref(q, k, v, *ref_rings, steps, cu, idx, scale)
    got = window_attention(q, k, v, *our_rings, steps, cu, idx, scale)
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got, want, ATT_TOL[dtype], "out")
    assert torch.equal(our_rings[0], ref_rings[0]) and torch.equal(our_rings[1], ref_rings[1])
    dead = slice(int(cu[1]), int(cu[2]))
    assert (got[dead] == 0).all()
    untouched = [s for s in range(len(SEEN)) if s not in idx.tolist() or s == int(idx[LENGTHS.index(0)])]
    assert torch.equal(our_rings[0][untouched], rings[0][untouched])  # -1 rows, empty sequences, unused slots
    assert not torch.equal(our_rings[0], rings[0])  # the live sequences did write

def test_grouped_query_heads_see_their_own_key_head_and_odd_head_widths_work():
    # 6 query heads on 2 key/value heads of width 5: the kernel's head-group and width masking
    q, k, v, rings, steps = attention_inputs([9, 4], 4, torch.float32, heads=(6, 2), d_head=5, seed=1)
    cu, idx = packed_batch([9, 4], len(SEEN), seed=1)
    ref_rings, our_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    want = window_attention_ref(q, k, v, *ref_rings, steps, cu, idx, 0.4)
    got = _window_attention(q, k, v, *our_rings, steps, cu, idx, 0.4, block_m=16, block_n=16)
    assert_close(got, want, ATT_TOL[torch.float32], "out")
    assert torch.equal(our_rings[0], ref_rings[0]) and torch.equal(our_rings[1], ref_rings[1])


@pytest.mark.parametrize("window", [3, 50])
def test_chunks_equal_one_pass(window):
    """Three consecutive chunks per sequence, the steps advanced between them, equal one pass (outputs and
    rings): the ring hands the window over from one chunk to the next, across its wraparound."""
    lengths = [12, 5, 1] if not ON_GPU else [200, 70, 1]
    q, k, v, rings, steps = attention_inputs(lengths, window, torch.float32, seed=2)
    cu, idx = packed_batch(lengths, len(SEEN), seed=2)
    whole_rings, part_rings = [r.clone() for r in rings], [r.clone() for r in rings]
    whole = window_attention(q, k, v, *whole_rings, steps, cu, idx, 0.5)
    part_steps, outs, parts_cu = steps.clone(), [], []
    for (x, cu_p), (kp, _), (vp, _) in zip(split_packed(q, cu, 3), split_packed(k, cu, 3), split_packed(v, cu, 3)):
        outs.append(window_attention(x, kp, vp, *part_rings, part_steps, cu_p, idx, 0.5))
        parts_cu.append(cu_p)
        part_steps[idx.long()] += (cu_p[1:] - cu_p[:-1]).long()
    assert_close(join_parts(outs, parts_cu), whole, ATT_TOL[torch.float32], "out")
    assert_close(part_rings[0], whole_rings[0], ATT_TOL[torch.float32], "key ring")
    assert_close(part_rings[1], whole_rings[1], ATT_TOL[torch.float32], "value ring")
