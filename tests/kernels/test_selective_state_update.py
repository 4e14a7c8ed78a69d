import pytest
import torch
from kernel_testing import DEVICE, DTYPES, ON_GPU, STATE_TOL, TOL, assert_close, packed_batch, ssm_inputs

from kernels.selective_scan import selective_scan
from kernels.selective_state_update import selective_state_update, selective_state_update_ref

D_INNER = [1536, 40] if ON_GPU else [24, 40]
BATCHES = [1, 64, 256] if ON_GPU else [1, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_inner", D_INNER)
@pytest.mark.parametrize("d_state", [4, 16])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("optional", ["all", "none"])
def test_selective_state_update_matches_ref(dtype, d_inner, d_state, batch, optional):
    num_slots = batch + 3
    dead = (batch // 2,) if batch > 1 else ()
    _, idx = packed_batch([1] * batch, num_slots, dead)
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(batch, d_inner, d_state, dtype, num_slots)
    if optional == "none":  # no softplus: pass positive step sizes (negative ones make the state grow)
        D = z = dt_bias = None
        dt = torch.nn.functional.softplus(dt.float()).to(dt.dtype)
    s_ref, s_ours = state.clone(), state.clone()
    soft = optional == "all"
    y_ref = selective_state_update_ref(x, dt, A, B, C, D, z, dt_bias, s_ref, idx, dt_softplus=soft)
    y = selective_state_update(x, dt, A, B, C, D, z, dt_bias, s_ours, idx, dt_softplus=soft)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(s_ours, s_ref, STATE_TOL[dtype], "ssm_state")
    for i in dead:
        assert (y[i] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_equal_one_chunk(dtype):
    """Stepping a batch of slots T times equals the chunk scan over the same T tokens per sequence."""
    batch, steps, d_inner, d_state = 3, 5, D_INNER[-1], 16
    _, idx = packed_batch([steps] * batch, batch + 2, dead=(1,))
    x, dt, A, B, C, D, z, dt_bias, state = ssm_inputs(batch * steps, d_inner, d_state, dtype, batch + 2, seed=3)
    stepped = state.clone()
    ys = []
    for t in range(steps):
        rows = torch.arange(batch, device=DEVICE) * steps + t  # token t of each sequence (packed layout)
        ys.append(selective_state_update(x[rows], dt[rows], A, B[rows], C[rows], D, z[rows], dt_bias, stepped, idx))
    y_steps = torch.stack(ys, 1).reshape(batch * steps, d_inner)
    chunked = state.clone()
    cu = torch.arange(0, batch * steps + 1, steps, dtype=torch.int32, device=DEVICE)
    y_chunk = selective_scan(x, dt, A, B, C, D, z, dt_bias, chunked, cu, idx)
    assert_close(y_steps, y_chunk, TOL[dtype], "y")
    assert_close(stepped, chunked, STATE_TOL[dtype], "ssm_state")
