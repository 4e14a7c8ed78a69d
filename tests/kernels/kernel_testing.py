"""Shared helpers for the kernel tests: packed batches with -1 slots, sizes and tolerances per device/dtype.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py), about 1.5 ms a step,
so CPU sizes stay small and odd; on a CUDA machine the same tests run at the 130M model's sizes.
"""
from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) for outputs in the input dtype, against the fp32-internal reference on the same inputs
TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
# fp32 state (and fp32 outputs) computed from low-precision inputs: only summation order differs
STATE_TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-4, 2e-4),
    torch.bfloat16: (2e-4, 2e-4),
}

# per-sequence lengths: mixed, with a length-1 sequence; one of them gets slot -1
if ON_GPU:
    LENGTHS = [[1, 7, 300, 700, 33], [1500]]
else:
    LENGTHS = [[5, 1, 37, 12], [70]]


def packed_batch(lengths, num_slots, dead=(), device=DEVICE, seed=0):
    """cu_seqlens (batch+1,) int32 and state_indices (batch,) int32: distinct random slots, -1 at `dead`."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    slots = torch.randperm(num_slots, generator=g)[: len(lengths)].to(torch.int32)
    for i in dead:
        slots[i] = -1
    return cu.to(device), slots.to(device)


def split_packed(x, cu_seqlens, pieces):
    """Split every sequence of a packed (total, ...) tensor into `pieces` consecutive parts (some may be
    empty). Returns a list of (x_part, cu_part): sequence i's part p is the p-th of its equal splits."""
    bounds = cu_seqlens.tolist()
    parts = []
    for p in range(pieces):
        rows, lens = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            lo, hi = a + n * p // pieces, a + n * (p + 1) // pieces
            rows.append(x[lo:hi])
            lens.append(hi - lo)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        parts.append((torch.cat(rows), cu.to(cu_seqlens.device)))
    return parts


def join_parts(outs, parts_cu):
    """Inverse of split_packed for outputs: interleave the parts back into per-sequence order."""
    batch = parts_cu[0].shape[0] - 1
    rows = []
    for i in range(batch):
        for out, cu in zip(outs, parts_cu):
            rows.append(out[int(cu[i]):int(cu[i + 1])])
    return torch.cat(rows)


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float().to(actual.device), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def ssm_inputs(rows, d_inner, d_state, dtype, slots, seed=0):
    """Inputs of a selective scan or state update over `rows` tokens: x, dt, A, B, C, D, z, dt_bias, state."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x = rand(rows, d_inner).to(DEVICE, dtype)
    dt = (rand(rows, d_inner) - 1.0).to(DEVICE, dtype)  # softplus(dt + dt_bias) around 0.1..1
    A = -torch.exp(rand(d_inner, d_state) * 0.5).to(DEVICE)
    B = rand(rows, d_state).to(DEVICE, dtype)
    C = rand(rows, d_state).to(DEVICE, dtype)
    D = rand(d_inner).to(DEVICE)
    z = rand(rows, d_inner).to(DEVICE, dtype)
    dt_bias = (rand(d_inner) * 0.5 - 1.0).to(DEVICE)
    state = rand(slots, d_inner, d_state).to(DEVICE)
    return x, dt, A, B, C, D, z, dt_bias, state
