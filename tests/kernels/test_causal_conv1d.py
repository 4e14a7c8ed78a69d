import pytest
import torch
from kernel_testing import DEVICE, DTYPES, LENGTHS, ON_GPU, TOL, assert_close, join_parts, packed_batch, split_packed

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

D_INNER = [1536, 40] if ON_GPU else [24, 40]


def make(d_inner, d_conv, dtype, total, slots, has_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, d_inner, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(d_inner, d_conv, generator=g) / d_conv ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(d_inner, generator=g).to(DEVICE, dtype) if has_bias else None
    state = torch.randn(slots, d_inner, d_conv - 1, generator=g).to(DEVICE, dtype)
    return x, weight, bias, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_inner", D_INNER)
@pytest.mark.parametrize("d_conv", [3, 4])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("has_bias,silu", [(True, True), (False, False)])
def test_causal_conv1d_matches_ref(dtype, d_inner, d_conv, lengths, has_bias, silu):
    num_slots = len(lengths) + 3
    dead = (1,) if len(lengths) > 1 else ()
    cu, idx = packed_batch(lengths, num_slots, dead)
    x, w, b, state = make(d_inner, d_conv, dtype, sum(lengths), num_slots, has_bias)
    state_ref, state_ours = state.clone(), state.clone()
    out_ref = causal_conv1d_ref(x, w, b, state_ref, cu, idx, silu=silu)
    out = causal_conv1d(x, w, b, state_ours, cu, idx, silu=silu)
    assert_close(out, out_ref, TOL[dtype], "output")
    torch.testing.assert_close(state_ours, state_ref, atol=0, rtol=0)  # pure copies of inputs
    for i in dead:
        a, e = int(cu[i]), int(cu[i + 1])
        assert out[a:e].abs().max() == 0 if e > a else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [2, 3])
def test_causal_conv1d_chunks_carry_state(dtype, pieces):
    lengths = LENGTHS[0]
    cu, idx = packed_batch(lengths, len(lengths) + 2, dead=(2,))
    x, w, b, state = make(D_INNER[-1], 4, dtype, sum(lengths), len(lengths) + 2, True)
    one = state.clone()
    out_one = causal_conv1d(x, w, b, one, cu, idx)
    chunked = state.clone()
    parts = split_packed(x, cu, pieces)
    outs = [causal_conv1d(xp, w, b, chunked, cup, idx) for xp, cup in parts]
    assert_close(join_parts(outs, [cup for _, cup in parts]), out_one, TOL[dtype], "chunked output")
    torch.testing.assert_close(chunked, one, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_inner", D_INNER)
@pytest.mark.parametrize("d_conv", [2, 4])
@pytest.mark.parametrize("batch", [1, 5])
def test_causal_conv1d_update_matches_ref_and_chunk(dtype, d_inner, d_conv, batch):
    num_slots = batch + 3
    _, idx = packed_batch([1] * batch, num_slots, dead=(batch - 1,) if batch > 1 else ())
    steps = 3
    x, w, b, state = make(d_inner, d_conv, dtype, batch * steps, num_slots, True, seed=batch)
    s_ref, s_ours = state.clone(), state.clone()
    for t in range(steps):
        xt = x[t * batch:(t + 1) * batch]
        o_ref = causal_conv1d_update_ref(xt, w, b, s_ref, idx)
        o = causal_conv1d_update(xt, w, b, s_ours, idx)
        assert_close(o, o_ref, TOL[dtype], f"step {t} output")
        assert (o[idx < 0] == 0).all()
    torch.testing.assert_close(s_ours, s_ref, atol=0, rtol=0)
    # stepping equals one chunk of `steps` tokens per sequence
    s_chunk = state.clone()
    xs = x.view(steps, batch, d_inner).transpose(0, 1).reshape(batch * steps, d_inner)
    cu = torch.arange(0, batch * steps + 1, steps, dtype=torch.int32, device=DEVICE)
    causal_conv1d(xs, w, b, s_chunk, cu, idx)
    torch.testing.assert_close(s_chunk, s_ours, atol=0, rtol=0)


def test_non_contiguous_pool_is_refused():
    x, w, b, state = make(24, 4, torch.float32, 3, 4, True)
    pool = torch.zeros(4, 3, 24, device=DEVICE).transpose(1, 2)  # (slots, d_inner, 3) but not contiguous
    cu, idx = packed_batch([3], 4)
    with pytest.raises(ValueError, match="contiguous"):
        causal_conv1d(x, w, b, pool, cu, idx)
