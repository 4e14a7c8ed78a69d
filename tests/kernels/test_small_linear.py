"""kernels/small_linear.py against its references: every row count on both sides of the broadcast/tensor-core
split and of SMALL_LINEAR_MAX_BATCH, with and without a residual and a bias, odd sizes, and explicit configs."""
import pytest
import torch
from kernel_testing import DEVICE, DTYPES, ON_GPU, TOL, assert_close

from kernels import small_linear
from kernels.small_linear import LinearConfig, add_rms_norm_linear, add_rms_norm_linear_ref, linear, linear_ref

# (N, K): the 130M model's in_proj / out_proj / a concept layer's products on the GPU; small odd ones on the CPU
SHAPES = [(3072, 768), (768, 1536), (3664, 768), (768, 1728)] if ON_GPU else [(40, 24), (19, 72)]
BATCHES = [1, 2, 3, 16, 17, 40] if ON_GPU else [1, 3, 17]


def inputs(batch, n, k, dtype, seed, has_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if has_bias else None
    return g, x, weight, bias


@pytest.fixture(autouse=True)
def kernel_up_to_16_rows(monkeypatch):
    """Plain products in the kernel up to 16 rows, past the default limit: BATCHES cross it at 17."""
    monkeypatch.setattr(small_linear, "SMALL_LINEAR_MAX_BATCH", 16)


def over_sizes(test):
    """Every dtype, shape and row count."""
    for name, values in (("dtype", DTYPES), ("n,k", SHAPES), ("batch", BATCHES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@over_sizes
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_matches_ref(dtype, n, k, batch, has_bias):
    _, x, weight, bias = inputs(batch, n, k, dtype, seed=batch * 7 + n, has_bias=has_bias)
    out = linear(x, weight, bias)
    assert out.shape == (batch, n) and out.dtype == dtype
    assert_close(out, linear_ref(x.float(), weight.float(), None if bias is None else bias.float()).to(dtype),
                 TOL[dtype], "linear")


@over_sizes
@pytest.mark.parametrize("has_residual", [True, False])
def test_add_rms_norm_linear_matches_ref(dtype, n, k, batch, has_residual):
    g, x, weight, bias = inputs(batch, n, k, dtype, seed=batch * 5 + k)
    residual = torch.randn(batch, k, generator=g).to(DEVICE) * 3 if has_residual else None
    norm_weight = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    out, res = add_rms_norm_linear(x, residual, norm_weight, 1e-5, weight, bias)
    out_ref, res_ref = add_rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight, bias)
    assert out.dtype == dtype and res.dtype == torch.float32 and out.shape == (batch, n)
    assert_close(out, out_ref, TOL[dtype], "out")
    torch.testing.assert_close(res, res_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [LinearConfig(1, 16, 32), LinearConfig(2, 8, 64), LinearConfig(4, 16, 16),
                                    LinearConfig(16, 16, 32), LinearConfig(16, 32, 64, num_warps=2)])
def test_every_config_matches_ref(config):
    """Each configuration the benchmark's sweep may pick, at a row count that leaves a partial row block."""
    n, k = SHAPES[-1]
    g, x, weight, bias = inputs(5, n, k, torch.float32, seed=3)
    residual = torch.randn(5, k, generator=g).to(DEVICE)
    norm_weight = torch.rand(k, generator=g).to(DEVICE) + 0.5
    assert_close(linear(x, weight, bias, config=config), linear_ref(x, weight, bias), TOL[torch.float32], "linear")
    out, res = add_rms_norm_linear(x, residual, norm_weight, 1e-5, weight, None, config=config)
    out_ref, res_ref = add_rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight, None)
    assert_close(out, out_ref, TOL[torch.float32], "norm linear")
    torch.testing.assert_close(res, res_ref, atol=1e-6, rtol=1e-6)


def test_every_output_is_written():
    """Poisoned outputs (NaN) would show through any element the kernel skips."""
    n, k = SHAPES[0]
    _, x, weight, _ = inputs(3, n, k, torch.float32, seed=11)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    torch.empty = poisoned
    try:
        out = linear(x, weight)
        out2, res = add_rms_norm_linear(x, None, torch.ones(k, device=DEVICE), 1e-5, weight)
    finally:
        torch.empty = real_empty
    assert not out.isnan().any() and not out2.isnan().any() and not res.isnan().any()


def test_shape_errors_are_clear():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        linear(x, torch.randn(4, 8, device=DEVICE), torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight"):
        add_rms_norm_linear(x, None, torch.ones(7, device=DEVICE), 1e-5, torch.randn(4, 8, device=DEVICE))
