import pytest
import torch
from kernel_testing import DEVICE, DTYPES, ON_GPU, TOL, assert_close

from kernels.add_rms_norm import add_rms_norm, add_rms_norm_ref

WIDTHS = [768, 2560, 24] if ON_GPU else [24, 40, 7]
TOKENS = [1, 5, 300] if ON_GPU else [1, 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("has_residual", [True, False])
def test_add_rms_norm_matches_ref(dtype, d, tokens, has_residual):
    g = torch.Generator().manual_seed(d + tokens)
    x = torch.randn(tokens, d, generator=g).to(DEVICE, dtype)
    residual = torch.randn(tokens, d, generator=g).to(DEVICE) * 3 if has_residual else None
    weight = (1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dtype)
    normed_ref, res_ref = add_rms_norm_ref(x, residual, weight, 1e-5)
    normed, res = add_rms_norm(x, residual, weight, 1e-5)
    assert normed.dtype == weight.dtype and res.dtype == torch.float32
    assert_close(normed, normed_ref, TOL[dtype], "normed")
    torch.testing.assert_close(res, res_ref, atol=1e-6, rtol=1e-6)
    if residual is not None:
        assert residual.shape == x.shape  # the input residual is not modified in place


def test_add_rms_norm_empty():
    x = torch.randn(0, 8, device=DEVICE)
    normed, res = add_rms_norm(x, None, torch.ones(8, device=DEVICE), 1e-5)
    assert normed.shape == (0, 8) and res.shape == (0, 8)
