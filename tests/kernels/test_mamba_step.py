import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPES, ON_GPU, STATE_TOL, TOL, assert_close, packed_batch

from kernels.causal_conv1d import causal_conv1d_update_ref
from kernels import mamba_step as mamba_step_mod
from kernels.mamba_step import _mamba_step, mamba_step, mamba_step_ref
from kernels.selective_state_update import selective_state_update_ref

# (d_inner, d_state, dt_rank, d_conv, d_inject): the 130M config on a GPU; odd small ones on the CPU
SIZES = [(1536, 16, 48, 4, 192)] if ON_GPU else [(48, 4, 3, 4, 6), (20, 5, 2, 2, 3)]
BATCHES = [1, 64, 256] if ON_GPU else [1, 19]


def make(batch, d_inner, d_state, dt_rank, d_conv, d_inject, dtype, num_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEVICE)  # noqa: E731
    d_proj = dt_rank + 2 * d_state
    weights = dict(
        conv_weight=rand(d_inner, d_conv, scale=0.5).to(dtype), conv_bias=rand(d_inner, scale=0.1).to(dtype),
        x_proj_weight=rand(d_proj, d_inner, scale=d_inner ** -0.5).to(dtype),
        dt_proj_weight=rand(d_inner, dt_rank, scale=dt_rank ** -0.5).to(dtype),
        dt_bias=rand(d_inner, scale=0.5) - 1.0, A=-torch.exp(rand(d_inner, d_state, scale=0.5)), D=rand(d_inner),
    )
    # xz as columns of a wider buffer, the way the layer hands it over (a view of its one projection of h)
    xz = rand(batch, 2 * d_inner + 3).to(dtype)[:, 3:]
    inject = rand(batch, d_inject).to(dtype)
    inject_weight = rand(2 * d_inner, d_inject, scale=d_inject ** -0.5).to(dtype)
    conv_state = rand(num_slots, d_inner, d_conv - 1).to(dtype)
    ssm_state = rand(num_slots, d_inner, d_state)
    return xz, inject, inject_weight, weights, conv_state, ssm_state


def call(fn, xz, weights, conv_state, ssm_state, idx, inject=None, inject_weight=None, **kwargs):
    w = weights
    return fn(xz, w["conv_weight"], w["conv_bias"], w["x_proj_weight"], w["dt_proj_weight"], w["dt_bias"], w["A"],
              w["D"], conv_state, ssm_state, idx, inject, inject_weight, **kwargs)


# the wrapper's threshold as it is (1: three launches), and one that batch 1 is under and batch 19 passes
@pytest.mark.parametrize("three_min", [None, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_inject", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_mamba_step_matches_ref_over_steps(dtype, is_inject, sizes, batch, three_min, monkeypatch):
    """Both launch paths as the wrapper picks them: under THREE_LAUNCH_MIN_BATCH two launches, from it three."""
    if three_min is not None:
        monkeypatch.setattr(mamba_step_mod, "THREE_LAUNCH_MIN_BATCH", three_min)
    num_slots = batch + 3
    dead = (batch // 2,) if batch > 1 else ()
    _, idx = packed_batch([1] * batch, num_slots, dead)
    xz, inject, inject_weight, weights, conv_state, ssm_state = make(batch, *sizes, dtype, num_slots, seed=batch)
    extra = dict(inject=inject, inject_weight=inject_weight) if is_inject else {}
    c_ref, s_ref, c_ours, s_ours = conv_state.clone(), ssm_state.clone(), conv_state.clone(), ssm_state.clone()
    d_inner = sizes[0]
    for step in range(2):  # the second step reads the windows and states the first one wrote
        xz_t = xz * (1.0 - 0.3 * step)
        want = call(mamba_step_ref, xz_t, weights, c_ref, s_ref, idx, **extra)
        buffer = torch.full((batch, d_inner + 5), 7.0, device=DEVICE, dtype=dtype)  # y lands in columns 0:E
        got = call(mamba_step, xz_t, weights, c_ours, s_ours, idx, **extra, out=buffer[:, :d_inner])
        assert got.data_ptr() == buffer.data_ptr()
        assert_close(got, want, TOL[dtype], f"step {step} y")
        assert (buffer[:, d_inner:] == 7.0).all(), "columns past out were written"
        assert (got[idx < 0] == 0).all()
        # the carried window holds x in the model dtype: with the injection, x is a sum computed in another order
        # than the reference's, whose rounding may differ in the last bit
        assert_close(c_ours, c_ref, TOL[dtype] if is_inject else (0, 0), f"step {step} conv_state")
        assert_close(s_ours, s_ref, STATE_TOL[dtype], f"step {step} ssm_state")
        c_ref.copy_(c_ours)  # each step is checked from the same state
    assert not torch.equal(s_ours, ssm_state)  # the live slots moved ...
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEVICE)
    untouched[idx[idx >= 0].long()] = False
    assert torch.equal(s_ours[untouched], ssm_state[untouched])  # ... and no other slot did
    assert torch.equal(c_ours[untouched], conv_state[untouched])


@pytest.mark.parametrize("block_e,num_sub,block_d", [(16, 1, 16), (16, 3, 32), (32, 2, 16)])
def test_mamba_step_launch_configs_agree(block_e, num_sub, block_d):
    """The benchmark sweeps these; every configuration must compute the same step."""
    sizes, batch = SIZES[0], 19
    _, idx = packed_batch([1] * batch, batch + 1, dead=(4,))
    xz, inject, inject_weight, weights, conv_state, ssm_state = make(batch, *sizes, torch.float32, batch + 1)
    c_ref, s_ref = conv_state.clone(), ssm_state.clone()
    want = call(mamba_step_ref, xz, weights, c_ref, s_ref, idx, inject, inject_weight)
    got = call(_mamba_step, xz, weights, conv_state, ssm_state, idx, inject, inject_weight, block_e=block_e,
               num_sub=num_sub, block_d=block_d)
    assert_close(got, want, TOL[torch.float32], "y")
    assert_close(ssm_state, s_ref, STATE_TOL[torch.float32], "ssm_state")


@pytest.mark.parametrize("block_e,num_sub,block_d", [(16, 1, 16), (16, 3, 32), (32, 2, 64)])
@pytest.mark.parametrize("is_inject", [False, True])
def test_mamba_step_three_launch_configs_agree(block_e, num_sub, block_d, is_inject):
    """The three-launch path (large batches) at the configurations the benchmark sweeps, two steps in a row, against
    the reference; slots no row names stay as they were (19 rows: a ragged row block; a -1 row)."""
    sizes, batch = SIZES[0], 19
    _, idx = packed_batch([1] * batch, batch + 3, dead=(4,))
    xz, inject, inject_weight, weights, conv_state, ssm_state = make(batch, *sizes, torch.float32, batch + 3)
    extra = dict(inject=inject, inject_weight=inject_weight) if is_inject else {}
    c_ref, s_ref, c_ours, s_ours = conv_state.clone(), ssm_state.clone(), conv_state.clone(), ssm_state.clone()
    for step in range(2):
        xz_t = xz * (1.0 - 0.3 * step)
        want = call(mamba_step_ref, xz_t, weights, c_ref, s_ref, idx, **extra)
        got = call(_mamba_step, xz_t, weights, c_ours, s_ours, idx, **extra, block_e=block_e, num_sub=num_sub,
                   block_d=block_d, three=True)
        assert_close(got, want, TOL[torch.float32], f"step {step} y")
        assert (got[4] == 0).all()
        assert_close(c_ours, c_ref, TOL[torch.float32], f"step {step} conv_state")
        assert_close(s_ours, s_ref, STATE_TOL[torch.float32], f"step {step} ssm_state")
    untouched = torch.ones(batch + 3, dtype=torch.bool, device=DEVICE)
    untouched[idx[idx >= 0].long()] = False
    assert torch.equal(s_ours[untouched], ssm_state[untouched])
    assert torch.equal(c_ours[untouched], conv_state[untouched])


def test_injection_is_in_proj_of_the_injected_input():
    """mamba_step(in_proj(h), inject=g, inject_weight=W_in W_s) is the unfused step on in_proj(h + W_s g)
    (DESIGN.md §1's u), in fp32: conv update, x_proj, dt_proj, state update, each as its own op."""
    d_inner, d_state, dt_rank, d_conv, d_inject = SIZES[0]
    d_model, batch = 24, 5
    g = torch.Generator().manual_seed(3)
    h = torch.randn(batch, d_model, generator=g).to(DEVICE)
    gated = torch.randn(batch, d_inject, generator=g).to(DEVICE)
    w_in = (torch.randn(2 * d_inner, d_model, generator=g) * 0.2).to(DEVICE)
    w_s = (torch.randn(d_model, d_inject, generator=g) * 0.2).to(DEVICE)
    _, _, _, weights, conv_state, ssm_state = make(batch, *SIZES[0], torch.float32, batch)
    idx = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    c_ours, s_ours = conv_state.clone(), ssm_state.clone()
    got = call(mamba_step, h @ w_in.t(), weights, c_ours, s_ours, idx, gated, w_in @ w_s)

    xz = (h + gated @ w_s.t()) @ w_in.t()  # in_proj(u)
    xc = causal_conv1d_update_ref(xz[:, :d_inner], weights["conv_weight"], weights["conv_bias"], conv_state, idx)
    dbc = F.linear(xc, weights["x_proj_weight"])
    dt = F.linear(dbc[:, :dt_rank], weights["dt_proj_weight"])
    want = selective_state_update_ref(xc, dt, weights["A"], dbc[:, dt_rank:dt_rank + d_state],
                                      dbc[:, dt_rank + d_state:], weights["D"], xz[:, d_inner:], weights["dt_bias"],
                                      ssm_state, idx)
    assert_close(got, want, (1e-4, 1e-4), "y")
    assert_close(s_ours, ssm_state, (1e-4, 1e-4), "ssm_state")
    assert_close(c_ours, conv_state, (1e-5, 1e-5), "conv_state")


def test_mamba_step_rejects_mismatched_shapes():
    xz, inject, inject_weight, weights, conv_state, ssm_state = make(3, *SIZES[0], torch.float32, 4)
    idx = torch.arange(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="inject"):
        call(mamba_step, xz, weights, conv_state, ssm_state, idx, inject, None)
    with pytest.raises(ValueError, match="ssm_state"):
        call(mamba_step, xz, weights, conv_state, ssm_state[:, :, :1].contiguous(), idx)
