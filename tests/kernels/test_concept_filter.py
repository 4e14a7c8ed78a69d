import math

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, LENGTHS, ON_GPU, assert_close, join_parts, packed_batch, split_packed

from kernels.concept_filter import (_concept_filter, concept_filter, concept_filter_ref, concept_filter_update,
                                    concept_filter_update_ref)

EPS = 1e-6
SIZES = [(16, 192), (5, 40)] if ON_GPU else [(3, 24), (5, 40)]  # (k, d_c)
# fp32 outputs and state; inputs in `dtype` are upcast on load, so only summation order differs
OUT_TOL = (2e-4, 2e-4)
# Decays far from 1 and near it (horizons 2 steps .. 10^5 steps), cycled over the concepts.
GAMMAS = (0.5, 1 - 1e-5, 0.99, 0.9, 1 - 1e-3)
# (dtype, decay, deep): decay changes no load or store, so the "mixed" kernels run in fp32 only, deep into a stream
# (the interpreter is slow; the internal-chunking test covers a shallow state).
CASES = [(dtype, None, deep) for dtype in DTYPES for deep in (False, True)] + [(torch.float32, "mixed", True)]


def log_decay(kind, k):
    """λ = log γ (k,) fp32 for `kind` ("mixed": GAMMAS cycled), or None (no decay)."""
    if kind is None:
        return None
    return torch.tensor([math.log(GAMMAS[j % len(GAMMAS)]) for j in range(k)], device=DEVICE)


def mass_tol(kind):
    # fp64 mass: with no decay only the order of sums differs; decays are fp32 exponentials in the kernels
    return dict(atol=1e-9, rtol=1e-12) if kind is None else dict(atol=1e-6, rtol=1e-6)


def make(total, k, d_c, dtype, slots, deep=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(total, k, generator=g) * 2, -1).to(DEVICE, dtype)
    v = torch.randn(total, d_c, generator=g).to(DEVICE, dtype)
    mix = (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g)).to(DEVICE)
    mean = torch.randn(slots, k, d_c, generator=g).to(DEVICE)
    # a stream deep into its life: mass ~1e6 per concept (DESIGN.md §2)
    scale = 1e6 if deep else 3.0
    mass = (torch.rand(slots, k, generator=g, dtype=torch.float64) * scale).to(DEVICE)
    return a, v, mix, mean, mass


@pytest.mark.parametrize("dtype,decay,deep", CASES)
@pytest.mark.parametrize("k,d_c", SIZES)
@pytest.mark.parametrize("lengths", LENGTHS)
def test_concept_filter_matches_ref(dtype, k, d_c, lengths, deep, decay):
    num_slots = len(lengths) + 2
    dead = (1,) if len(lengths) > 1 else ()
    cu, idx = packed_batch(lengths, num_slots, dead)
    a, v, mix, mean, mass = make(sum(lengths), k, d_c, dtype, num_slots, deep)
    lam = log_decay(decay, k)
    m_ref, s_ref, m_ours, s_ours = mean.clone(), mass.clone(), mean.clone(), mass.clone()
    out_ref = concept_filter_ref(a, v, mix, m_ref, s_ref, cu, idx, EPS, lam)
    out = concept_filter(a, v, mix, m_ours, s_ours, cu, idx, EPS, lam)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, OUT_TOL, "read")
    assert_close(m_ours, m_ref, OUT_TOL, "concept_mean")
    torch.testing.assert_close(s_ours, s_ref, **mass_tol(decay))
    for i in dead:
        assert (out[int(cu[i]):int(cu[i + 1])] == 0).all()


@pytest.mark.parametrize("chunk_size,decay,block_chunks", [(16, None, 16), (32, None, None), (16, "mixed", 16)])
def test_concept_filter_internal_chunking(chunk_size, decay, block_chunks):
    # 290 tokens: 19 chunks of 16, scanned across chunks in blocks of `block_chunks` (the carry between blocks)
    lengths = [290, 1, 0, 33]
    cu, idx = packed_batch(lengths, 6, dead=(1,))
    a, v, mix, mean, mass = make(sum(lengths), 5, 24, torch.float32, 6)
    lam = log_decay(decay, 5)
    m_ref, s_ref, m_ours, s_ours = mean.clone(), mass.clone(), mean.clone(), mass.clone()
    out_ref = concept_filter_ref(a, v, mix, m_ref, s_ref, cu, idx, EPS, lam)
    out = _concept_filter(a, v, mix, m_ours, s_ours, cu, idx, EPS, lam, chunk_size=chunk_size,
                          block_chunks=block_chunks)
    assert_close(out, out_ref, OUT_TOL, "read")
    assert_close(m_ours, m_ref, OUT_TOL, "concept_mean")
    torch.testing.assert_close(s_ours, s_ref, **mass_tol(decay))


@pytest.mark.parametrize("pieces,decay", [(2, None), (3, None), (3, "mixed")])
def test_concept_filter_chunks_carry_state(pieces, decay):
    lengths = LENGTHS[0]
    cu, idx = packed_batch(lengths, len(lengths) + 1, dead=(3,))
    a, v, mix, mean, mass = make(sum(lengths), 5, 40, torch.float32, len(lengths) + 1, deep=True)
    lam = log_decay(decay, 5)
    m1, s1 = mean.clone(), mass.clone()
    out_one = concept_filter(a, v, mix, m1, s1, cu, idx, EPS, lam)
    m2, s2 = mean.clone(), mass.clone()
    pa, pv = split_packed(a, cu, pieces), split_packed(v, cu, pieces)
    outs = [concept_filter(pa[p][0], pv[p][0], mix, m2, s2, pa[p][1], idx, EPS, lam) for p in range(pieces)]
    assert_close(join_parts(outs, [cup for _, cup in pa]), out_one, OUT_TOL, "chunked read")
    assert_close(m2, m1, OUT_TOL, "chunked concept_mean")
    torch.testing.assert_close(s2, s1, **mass_tol(decay))


@pytest.mark.parametrize("dtype,decay,deep", CASES)
@pytest.mark.parametrize("k,d_c", SIZES)
@pytest.mark.parametrize("batch", [1, 64, 256] if ON_GPU else [1, 5])
def test_concept_filter_update_matches_ref_and_chunk(dtype, k, d_c, batch, deep, decay):
    num_slots = batch + 2
    dead = (batch - 1,) if batch > 1 else ()
    steps = 3
    _, idx = packed_batch([1] * batch, num_slots, dead)
    a, v, mix, mean, mass = make(batch * steps, k, d_c, dtype, num_slots, deep, seed=batch)
    lam = log_decay(decay, k)
    m_ref, s_ref, m_ours, s_ours = mean.clone(), mass.clone(), mean.clone(), mass.clone()
    outs = []
    for t in range(steps):
        rows = torch.arange(batch, device=DEVICE) * steps + t
        o_ref = concept_filter_update_ref(a[rows], v[rows], mix, m_ref, s_ref, idx, EPS, lam)
        o = concept_filter_update(a[rows], v[rows], mix, m_ours, s_ours, idx, EPS, lam)
        assert_close(o, o_ref, OUT_TOL, f"step {t} read")
        assert (o[idx < 0] == 0).all()
        outs.append(o)
    assert_close(m_ours, m_ref, OUT_TOL, "concept_mean")
    torch.testing.assert_close(s_ours, s_ref, **mass_tol(decay))
    # stepping equals one chunk of `steps` tokens per sequence
    m_c, s_c = mean.clone(), mass.clone()
    cu = torch.arange(0, batch * steps + 1, steps, dtype=torch.int32, device=DEVICE)
    out_chunk = concept_filter(a, v, mix, m_c, s_c, cu, idx, EPS, lam)
    assert_close(torch.stack(outs, 1).reshape(batch * steps, d_c), out_chunk, OUT_TOL, "chunk read")
    assert_close(m_c, m_ours, OUT_TOL, "chunk concept_mean")
    torch.testing.assert_close(s_c, s_ours, **mass_tol(decay))


@pytest.mark.parametrize("lengths,decay", [([70, 5], "mixed"), ([5, 30], None)])
def test_concept_filter_from_logits(lengths, decay):
    """is_logits: the kernels take the routing logits and softmax them on load, in every pass (70 tokens: two chunks;
    5 and 30: one chunk each, no pass across chunks)."""
    cu, idx = packed_batch(lengths, len(lengths) + 1)
    _, v, mix, mean, mass = make(sum(lengths), 5, 24, torch.float32, len(lengths) + 1, deep=True)
    logits = 2 * torch.randn(sum(lengths), 5, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lam = log_decay(decay, 5)
    m_ref, s_ref, m_ours, s_ours = mean.clone(), mass.clone(), mean.clone(), mass.clone()
    out_ref = concept_filter_ref(torch.softmax(logits, -1), v, mix, m_ref, s_ref, cu, idx, EPS, lam)
    out = concept_filter(logits, v, mix, m_ours, s_ours, cu, idx, EPS, lam, is_logits=True)
    assert_close(out, out_ref, OUT_TOL, "read")
    assert_close(m_ours, m_ref, OUT_TOL, "concept_mean")
    torch.testing.assert_close(s_ours, s_ref, atol=1e-6, rtol=1e-6)  # the kernel's own softmax: fp32 rounding of a
