import pytest
import torch
from kernel_testing import (DTYPES, LENGTHS, ON_GPU, STATE_TOL, TOL, assert_close, join_parts, packed_batch,
                            split_packed, ssm_inputs)

from kernels.selective_scan import _selective_scan, selective_scan, selective_scan_ref

D_INNER = [1536, 40] if ON_GPU else [24, 40]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_inner", D_INNER)
@pytest.mark.parametrize("d_state", [4, 16])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_selective_scan_matches_ref(dtype, d_inner, d_state, lengths):
    num_slots = len(lengths) + 2
    dead = (2,) if len(lengths) > 2 else ()
    cu, idx = packed_batch(lengths, num_slots, dead)
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(sum(lengths), d_inner, d_state, dtype, num_slots)
    s_ref, s_ours = state.clone(), state.clone()
    y_ref = selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, s_ref, cu, idx)
    y = selective_scan(x, dt, A, B, C, D, z, dt_bias, s_ours, cu, idx)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(s_ours, s_ref, STATE_TOL[dtype], "ssm_state")
    for i in dead:
        assert (y[int(cu[i]):int(cu[i + 1])] == 0).all()
        assert torch.equal(s_ours[int(idx[i])], state[int(idx[i])]) if idx[i] >= 0 else True


@pytest.mark.parametrize("chunk_size", [16, 32] if not ON_GPU else [64, 128, 256])
@pytest.mark.parametrize("optional", ["all", "none"])
@pytest.mark.parametrize("token_loop", [True, False])
def test_selective_scan_internal_chunking(chunk_size, optional, token_loop):
    """Multi-chunk path (passes 1-3) at several chunk sizes against the ref, optional tensors on and off,
    both in-chunk variants (the scan variant at a tiny width on the CPU: the interpreter's scan is slow)."""
    lengths = LENGTHS[0]
    d_inner, d_state = (D_INNER[-1], 16) if ON_GPU or token_loop else (12, 4)
    cu, idx = packed_batch(lengths, len(lengths) + 1, dead=(2,))
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(sum(lengths), d_inner, d_state, torch.float32, len(lengths) + 1)
    if optional == "none":  # no softplus: pass positive step sizes (negative ones make the state grow)
        D = z = dt_bias = None
        dt = torch.nn.functional.softplus(dt.float()).to(dt.dtype)
    s_ref, s_ours = state.clone(), state.clone()
    y_ref = selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, s_ref, cu, idx, dt_softplus=optional == "all")
    y = _selective_scan(x, dt, A, B, C, D, z, dt_bias, s_ours, cu, idx, dt_softplus=optional == "all",
                        chunk_size=chunk_size, block_d=16, token_loop=token_loop)
    assert_close(y, y_ref, TOL[torch.float32], "y")
    assert_close(s_ours, s_ref, STATE_TOL[torch.float32], "ssm_state")
    assert (y[int(cu[2]):int(cu[3])] == 0).all()


@pytest.mark.parametrize("token_loop", [True, False])
def test_selective_scan_single_chunk_scan_variant(token_loop):
    """The one-launch path (every sequence within one chunk) with both in-chunk variants."""
    lengths = [3, 1, 9, 0]
    d_state = 16 if ON_GPU or token_loop else 4
    cu, idx = packed_batch(lengths, 6, dead=(1,))
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(sum(lengths), 12, d_state, torch.float32, 6)
    s_ref, s_ours = state.clone(), state.clone()
    y_ref = selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, s_ref, cu, idx)
    y = _selective_scan(x, dt, A, B, C, D, z, dt_bias, s_ours, cu, idx, chunk_size=16, token_loop=token_loop)
    assert_close(y, y_ref, TOL[torch.float32], "y")
    assert_close(s_ours, s_ref, STATE_TOL[torch.float32], "ssm_state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [2, 3])
def test_selective_scan_chunks_carry_state(dtype, pieces):
    """Calling the op on consecutive pieces, state carried in the pool, equals one pass."""
    lengths = LENGTHS[0]
    cu, idx = packed_batch(lengths, len(lengths) + 1, dead=(0,))
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(sum(lengths), D_INNER[-1], 16, dtype, len(lengths) + 1)
    one = state.clone()
    y_one = selective_scan(x, dt, A, B, C, D, z, dt_bias, one, cu, idx)
    chunked = state.clone()
    outs, cus = [], []
    parts = {name: split_packed(t, cu, pieces) for name, t in dict(x=x, dt=dt, B=B, C=C, z=z).items()}
    for p in range(pieces):
        cup = parts["x"][p][1]
        outs.append(selective_scan(parts["x"][p][0], parts["dt"][p][0], A, parts["B"][p][0], parts["C"][p][0], D,
                                   parts["z"][p][0], dt_bias, chunked, cup, idx))
        cus.append(cup)
    assert_close(join_parts(outs, cus), y_one, TOL[dtype], "chunked y")
    assert_close(chunked, one, STATE_TOL[dtype], "chunked state")
