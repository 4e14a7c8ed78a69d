"""The fused concept decode step and the prefill read-back (kernels/concept_step.py, kernels/concept_readout.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPES, ON_GPU, STATE_TOL, TOL, assert_close, packed_batch

from kernels.concept_filter import concept_filter
from kernels.concept_readout import concept_readout, concept_readout_ref
from kernels import concept_step as concept_step_mod
from kernels.concept_step import _concept_step, concept_step, concept_step_ref

EPS, NORM_EPS = 1e-6, 1e-5
SIZES = [(16, 192, 768), (5, 40, 24)] if ON_GPU else [(3, 6, 24), (5, 40, 24)]  # (k, d_c, d_model)
GAMMAS = (0.5, 1 - 1e-5, 0.99, 0.9, 1 - 1e-3)
# (dtype, decay, deep): decay changes no load or store, so it runs in fp32 only, deep into a stream as well
CASES = [(dtype, None, False) for dtype in DTYPES] + [(torch.float32, None, True), (torch.float32, "mixed", True)]
# The routing weights come from the kernel's own softmax, so the fp64 mass differs from the reference's by
# fp32 rounding of a (not only by the order of sums, as with kernels/concept_filter.py's given a).
MASS_TOL = dict(atol=1e-6, rtol=1e-6)


def log_decay(kind, k):
    if kind is None:
        return None
    return torch.tensor([math.log(GAMMAS[j % len(GAMMAS)]) for j in range(k)], device=DEVICE)


def make(batch, k, d_c, d_model, dtype, num_slots, deep=False, seed=0):
    """The layer's projections of h (as column blocks of one buffer, as the layer has them), the weights, a state."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEVICE)  # noqa: E731
    pre = rand(batch, k + 3 * d_c + 4).to(dtype)
    logits, v, gate_h = pre[:, :k], pre[:, k:k + d_c], pre[:, k + d_c:k + 3 * d_c]
    weights = dict(mix=torch.eye(k, device=DEVICE) + rand(k, k, scale=0.1),
                   norm_weight=(1 + rand(d_c, scale=0.1)).to(dtype),
                   gate_weight=rand(2 * d_c, d_model + d_c, scale=(d_model + d_c) ** -0.5).to(dtype)[:, d_model:])
    mean = rand(num_slots, k, d_c)
    mass = (torch.rand(num_slots, k, generator=g, dtype=torch.float64) * (1e6 if deep else 3.0)).to(DEVICE)
    return (logits, v, gate_h), weights, mean, mass


def step(fn, inputs, weights, mean, mass, idx, lam, **kwargs):
    w = weights
    return fn(*inputs, w["mix"], w["norm_weight"], w["gate_weight"], mean, mass, idx, EPS, NORM_EPS, lam, **kwargs)


@pytest.mark.parametrize("split_max", [None, 8])  # the wrapper's threshold as it is, and one that batch 21 passes
@pytest.mark.parametrize("dtype,decay,deep", CASES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("batch", [1, 64, 256] if ON_GPU else [1, 21])
def test_concept_step_matches_ref_over_steps(dtype, decay, deep, sizes, batch, split_max, monkeypatch):
    """Both launch paths as the wrapper picks them: at or under SPLIT_MAX_BATCH the two-launch path (one row a
    program up to batch 16, 16 rows a program above), over it the one-launch path."""
    if split_max is not None:
        monkeypatch.setattr(concept_step_mod, "SPLIT_MAX_BATCH", split_max)
    k, d_c, _ = sizes
    num_slots = batch + 2
    dead = (batch - 1,) if batch > 1 else ()
    _, idx = packed_batch([1] * batch, num_slots, dead)
    lam = log_decay(decay, k)
    m_ref, s_ref = None, None
    for t in range(2):  # the second step reads the state the first one wrote
        inputs, weights, mean, mass = make(batch, *sizes, dtype, num_slots, deep, seed=t)
        if t == 0:
            m_ref, s_ref, m_ours, s_ours, initial = mean.clone(), mass.clone(), mean.clone(), mass.clone(), mean
        want_in, want_out = step(concept_step_ref, inputs, weights, m_ref, s_ref, idx, lam)
        buffer = torch.full((batch, d_c + 3), 5.0, device=DEVICE, dtype=dtype)  # g_o ⊙ r lands in columns 3:
        got_in, got_out = step(concept_step, inputs, weights, m_ours, s_ours, idx, lam, out_output=buffer[:, 3:])
        assert got_out.data_ptr() == buffer[:, 3:].data_ptr() and (buffer[:, :3] == 5.0).all()
        assert got_in.dtype == got_out.dtype == dtype
        assert_close(got_in, want_in, TOL[dtype], f"step {t} g_s r")
        assert_close(got_out, want_out, TOL[dtype], f"step {t} g_o r")
        for i in dead:
            assert (got_in[i] == 0).all() and (got_out[i] == 0).all()
        assert_close(m_ours, m_ref, STATE_TOL[dtype], f"step {t} concept_mean")
        torch.testing.assert_close(s_ours, s_ref, **MASS_TOL)
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEVICE)
    untouched[idx[idx >= 0].long()] = False
    assert torch.equal(m_ours[untouched], initial[untouched])
    assert not torch.equal(m_ours[~untouched], initial[~untouched])


@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_concept_step_rows_per_program_agree(rows):
    """The benchmark sweeps rows per program; every choice must compute the same step (21 rows: a ragged end)."""
    sizes, batch = SIZES[-1], 21
    _, idx = packed_batch([1] * batch, batch + 1, dead=(2,))
    inputs, weights, mean, mass = make(batch, *sizes, torch.float32, batch + 1)
    m_ref, s_ref = mean.clone(), mass.clone()
    want = step(concept_step_ref, inputs, weights, m_ref, s_ref, idx, None)
    got = step(_concept_step, inputs, weights, mean, mass, idx, None, rows=rows)
    for a, b, what in zip(got, want, ("g_s r", "g_o r")):
        assert_close(a, b, TOL[torch.float32], what)
    assert_close(mean, m_ref, STATE_TOL[torch.float32], "concept_mean")


@pytest.mark.parametrize("block_m,block_o", [(1, 16), (2, 32), (4, 16), (16, 16), (16, 32)])
@pytest.mark.parametrize("decay", [None, "mixed"])
def test_concept_step_two_launch_configs_agree(block_m, block_o, decay):
    """The benchmark sweeps the gates launch's (rows, columns) a program: every choice computes the same step, twice
    in a row, and leaves the slots no row names as they were (21 rows: a ragged end; a -1 row)."""
    sizes, batch = SIZES[-1], 21
    _, idx = packed_batch([1] * batch, batch + 3, dead=(2,))
    lam = log_decay(decay, sizes[0])
    _, _, mean, mass = make(batch, *sizes, torch.float32, batch + 3)
    m_ref, s_ref, initial = mean.clone(), mass.clone(), mean.clone()
    for t in range(2):
        inputs, weights, _, _ = make(batch, *sizes, torch.float32, batch + 3, seed=t + 1)
        want = step(concept_step_ref, inputs, weights, m_ref, s_ref, idx, lam)
        got = step(_concept_step, inputs, weights, mean, mass, idx, lam, split=(block_m, block_o))
        for a, b, what in zip(got, want, ("g_s r", "g_o r")):
            assert_close(a, b, TOL[torch.float32], f"step {t} {what}")
            assert (a[2] == 0).all()
        assert_close(mean, m_ref, STATE_TOL[torch.float32], f"step {t} concept_mean")
        torch.testing.assert_close(mass, s_ref, **MASS_TOL)
    untouched = torch.ones(batch + 3, dtype=torch.bool, device=DEVICE)
    untouched[idx[idx >= 0].long()] = False
    assert torch.equal(mean[untouched], initial[untouched])


@pytest.mark.parametrize("decay", [None, "mixed"])
def test_concept_step_ref_is_design_md_layer_in_fp64(decay):
    """concept_step_ref against DESIGN.md §1 written out in fp64 from h and the layer's weights (the projections the
    layer computes in one product are done one by one here)."""
    k, d_c, d_model = SIZES[-1]
    batch = 4
    g = torch.Generator().manual_seed(5)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    h = rand(batch, d_model)
    w_a, b_a, w_v = rand(k, d_model, scale=0.3), rand(k, scale=0.3), rand(d_c, d_model, scale=0.3)
    w_g, b_g = rand(2 * d_c, d_model + d_c, scale=0.2), rand(2 * d_c, scale=0.5)
    mix, norm_w = torch.eye(k, dtype=torch.float64) + rand(k, k, scale=0.1), 1 + rand(d_c, scale=0.1)
    mean, mass = rand(batch, k, d_c), torch.rand(batch, k, generator=g, dtype=torch.float64) * 3
    gamma = torch.ones(k, dtype=torch.float64) if decay is None else torch.exp(log_decay(decay, k).cpu().double())

    a = torch.softmax(h @ w_a.t() + b_a, -1)  # (batch, k)
    v = h @ w_v.t()
    S = gamma[:, None] * (mass + EPS)[..., None] * mean + a[..., None] * v[:, None, :]  # (batch, k, d_c) raw sums
    m = gamma * mass + a
    read = ((a @ mix)[:, None, :] @ (S / (m + EPS)[..., None])).squeeze(1)  # a^T M c
    r = F.gelu(read * torch.rsqrt(read.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm_w)
    gates = torch.sigmoid(torch.cat([h, r], -1) @ w_g.t() + b_g)
    want_in, want_out = gates[:, :d_c] * r, gates[:, d_c:] * r

    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    state_mean, state_mass = f32(mean), mass.to(DEVICE)
    got_in, got_out = concept_step_ref(
        f32(h @ w_a.t() + b_a), f32(v), f32(h @ w_g[:, :d_model].t() + b_g), f32(mix), f32(norm_w),
        f32(w_g[:, d_model:]), state_mean, state_mass, torch.arange(batch, dtype=torch.int32, device=DEVICE), EPS,
        NORM_EPS, None if decay is None else log_decay(decay, k))
    assert_close(got_in, want_in, (1e-5, 1e-4), "g_s r")
    assert_close(got_out, want_out, (1e-5, 1e-4), "g_o r")
    assert_close(state_mean, S / (m + EPS)[..., None], (1e-5, 1e-5), "concept_mean")
    torch.testing.assert_close(state_mass.cpu(), m, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("decay", [None, "mixed"])
def test_steps_equal_the_prefill_path(decay):
    """Three decode steps per stream equal the prefill path over the same three tokens: the chunked concept filter
    from the routing logits, then concept_readout (the chunk kernels' and the step kernel's state agree too)."""
    k, d_c, _ = SIZES[-1]
    batch, steps = 5, 3
    _, idx = packed_batch([1] * batch, batch + 1, dead=(2,))
    lam = log_decay(decay, k)
    inputs, weights, mean, mass = make(batch * steps, *SIZES[-1], torch.float32, batch + 1, deep=True)
    m_step, s_step, m_chunk, s_chunk = mean.clone(), mass.clone(), mean.clone(), mass.clone()
    outs = []
    for t in range(steps):
        rows = torch.arange(batch, device=DEVICE) * steps + t
        outs.append(step(concept_step, [x[rows] for x in inputs], weights, m_step, s_step, idx, lam))
    stepped = [torch.stack([o[i] for o in outs], 1).reshape(batch * steps, d_c) for i in range(2)]
    logits, v, gate_h = inputs
    cu = torch.arange(0, batch * steps + 1, steps, dtype=torch.int32, device=DEVICE)
    read = concept_filter(logits, v, weights["mix"], m_chunk, s_chunk, cu, idx, EPS, lam, is_logits=True)
    chunked = concept_readout(read, gate_h, weights["norm_weight"], weights["gate_weight"], NORM_EPS)
    for a, b, what in zip(stepped, chunked, ("g_s r", "g_o r")):
        assert_close(a, b, TOL[torch.float32], what)
    assert_close(m_step, m_chunk, STATE_TOL[torch.float32], "concept_mean")
    torch.testing.assert_close(s_step, s_chunk, **MASS_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 70] if not ON_GPU else [1, 70, 4099])
@pytest.mark.parametrize("sizes", SIZES)
def test_concept_readout_matches_ref(dtype, tokens, sizes):
    k, d_c, d_model = sizes
    (_, _, gate_h), weights, _, _ = make(tokens, *sizes, dtype, 1, seed=tokens)
    read = torch.randn(tokens, d_c, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = concept_readout_ref(read, gate_h, weights["norm_weight"], weights["gate_weight"], NORM_EPS)
    buffer = torch.zeros(tokens, d_c + 2, device=DEVICE, dtype=dtype)
    got = concept_readout(read, gate_h, weights["norm_weight"], weights["gate_weight"], NORM_EPS,
                          out_output=buffer[:, 2:])
    assert got[1].data_ptr() == buffer[:, 2:].data_ptr() and (buffer[:, :2] == 0).all()
    for a, b, what in zip(got, want, ("g_s r", "g_o r")):
        assert a.dtype == dtype
        assert_close(a, b, TOL[dtype], what)


def test_concept_step_rejects_mismatched_shapes():
    inputs, weights, mean, mass = make(3, *SIZES[-1], torch.float32, 4)
    idx = torch.arange(3, dtype=torch.int32, device=DEVICE)
    logits, v, gate_h = inputs
    with pytest.raises(ValueError, match="gate_h"):
        step(concept_step, (logits, v, gate_h[:, 1:]), weights, mean, mass, idx, None)
    with pytest.raises(ValueError, match="out_output"):
        step(concept_step, inputs, weights, mean, mass, idx, None, out_output=torch.empty(3, 2, device=DEVICE))
