"""Launches per layer of a decode step and a prefill (issue 10 fused the decode step to cut them; the H200 profile
shows the step device-bound, not launch-bound, so this count is a regression guard rather than its cost)."""
import pytest
import torch

from helpers import make_inputs, make_model
from kernels.add_rms_norm import add_rms_norm
from kernels.dispatch import triton_available
from kernels.launches import counting_launches
from kernels.mamba_step import FUSED_MAMBA_MAX_BATCH

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Decode at batch 3 (up to small_linear.NORM_LINEAR_MAX_BATCH and mamba_step.FUSED_MAMBA_MAX_BATCH), per layer.
# k = 0: add+RMSNorm and in_proj in one launch (kernels/small_linear.py), conv update + x_proj, dt_proj + z (+
# injection), the state update + gate (the Mamba step in three launches from mamba_step.THREE_LAUNCH_MIN_BATCH, 1
# since the H200 sweep; two under it), out_proj. k > 0 adds two launches: the norm and the single product of h give
# the routing logits, values, the h half of the gates and in_proj(h) at once, and the concept step is two kernels
# (the state update, then the gates spread over column blocks; one kernel over concept_step.SPLIT_MAX_BATCH)
# (before issue 10: about 25 per layer).
DECODE_PER_LAYER = {0: 5, 3: 7}
# Above small_linear.SMALL_LINEAR_MAX_BATCH rows the norm is a launch of its own again and the products go to cuBLAS.
DECODE_PER_LAYER_CUBLAS = {0: 6, 3: 8}
# Decode above mamba_step.FUSED_MAMBA_MAX_BATCH rows: main's Mamba step (conv update, x_proj, dt_proj, state update +
# gate) between in_proj and out_proj, so k = 0 is main's 7; k > 0 keeps the one product of h and the fused concept
# step, and adds the injection (one addmm) and the copy of the mixer's output into its half of the last product's
# input.
DECODE_PER_LAYER_ABOVE = {0: 7, 3: 11}
FUSED_MAMBA = ("_mamba_step_conv_kernel", "_mamba_step_dt_kernel")
UNFUSED_MAMBA = ("_causal_conv1d_update_kernel",)
# Prefill, per layer, one sequence of one chunk of 9 tokens: past small_linear.SMALL_LINEAR_MAX_BATCH rows, so the
# norm is a launch of its own and the products go to cuBLAS. k = 0: norm, in_proj, conv (outputs and the carried
# window), x_proj, dt_proj, scan, out_proj; k > 0 adds the concept filter's two passes (the softmax is taken in
# both), the read-back and gates, and the injection into in_proj's output (in_proj itself is in the one product of
# h). A sequence longer than a chunk adds the passes across chunks: one for the concept filter, two for the scan.
PREFILL_PER_LAYER = {0: 7, 3: 11}


def per_layer(k, fn):
    """Launches of one layer: the count with two layers less the count with one (the embedding, head and step
    bookkeeping cancel out), with the Triton kernels on (interpreted on the CPU)."""
    counts = []
    for n_layers in (1, 2):
        model = make_model(0, n_layers=n_layers, n_concepts=k).to(DEVICE)
        with torch.inference_mode():
            fn(model)  # warm-up: the first call builds the fused weights
            with counting_launches() as launches:
                fn(model)
        counts.append(launches)
    return counts[1].total - counts[0].total, counts[1]


def decode(model):
    pool = model.empty_state(4)
    tokens = torch.tensor([1, 2, 3], device=DEVICE)
    model.decode_step(tokens, pool, torch.tensor([0, 2, -1], dtype=torch.int32, device=DEVICE))


def decode_rows(rows):
    """A decode step of `rows` rows (one of them padding, -1)."""
    def fn(model):
        pool = model.empty_state(rows)
        tokens = torch.arange(rows, device=DEVICE) % model.config.vocab_size
        slots = torch.arange(rows, dtype=torch.int32, device=DEVICE)
        slots[rows // 2] = -1
        model.decode_step(tokens, pool, slots)
    return fn


def prefill(model):
    model(make_inputs(model, 1, 9).to(DEVICE), model.empty_state(1))


@pytest.mark.parametrize("k", sorted(DECODE_PER_LAYER))
def test_decode_launches_per_layer(k, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    count, launches = per_layer(k, decode)
    assert count == DECODE_PER_LAYER[k], launches.describe()
    assert not any("copy" in name for name in launches.torch), launches.describe()


@pytest.mark.parametrize("rows", [FUSED_MAMBA_MAX_BATCH, FUSED_MAMBA_MAX_BATCH + 1])
@pytest.mark.parametrize("k", sorted(DECODE_PER_LAYER))
def test_decode_takes_the_fused_mamba_step_up_to_its_batch(k, rows, monkeypatch):
    # INFOMAMBA_FUSED_STEP's default: the fused Mamba step up to FUSED_MAMBA_MAX_BATCH rows, main's above (the H200
    # timed it faster there); the fused concept step at both.
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    monkeypatch.delenv("INFOMAMBA_FUSED_STEP", raising=False)
    count, launches = per_layer(k, decode_rows(rows))
    fused = rows <= FUSED_MAMBA_MAX_BATCH
    assert count == (DECODE_PER_LAYER_CUBLAS if fused else DECODE_PER_LAYER_ABOVE)[k], launches.describe()
    assert "_small_linear_kernel" not in launches.triton, launches.describe()
    for name in FUSED_MAMBA:
        assert launches.triton[name] == (2 if fused else 0), launches.describe()  # per layer, two layers
    for name in UNFUSED_MAMBA:
        assert launches.triton[name] == (0 if fused else 2), launches.describe()
    assert launches.triton["_selective_state_update_kernel"] == 2, launches.describe()
    for name in ("_concept_step_update_kernel", "_concept_step_gates_kernel"):
        assert launches.triton[name] == (2 if k else 0), launches.describe()


@pytest.mark.parametrize("k", sorted(DECODE_PER_LAYER))
def test_decode_products_of_a_few_rows_take_the_small_linear_kernel(k, monkeypatch):
    """At a few rows (small_linear.takes_kernel), each layer's first product (fused with the norm) and its last one
    run in kernels/small_linear.py; only the head's product goes to cuBLAS."""
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    _, launches = per_layer(k, decode_rows(2))
    assert launches.triton["_small_linear_kernel"] == 4, launches.describe()  # two a layer, two layers
    assert launches.torch.get("linear", 0) == 1 and "_add_rms_norm_kernel" in launches.triton, launches.describe()


@pytest.mark.parametrize("k", sorted(PREFILL_PER_LAYER))
def test_prefill_launches_per_layer(k, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    count, launches = per_layer(k, prefill)
    assert count == PREFILL_PER_LAYER[k], launches.describe()


def test_the_counter_counts_kernels_and_computing_ops_only():
    x, weight = torch.randn(4, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with counting_launches() as launches:
        add_rms_norm(x, None, weight, 1e-5)  # a Triton kernel (two allocations inside)
        y = x.t()[:, 1:].unsqueeze(0)  # views
        torch.empty(3, device=DEVICE)
        y.sum()  # an op that computes
    assert launches.triton == {"_add_rms_norm_kernel": 1}
    assert launches.torch == {"sum": 1}
    assert launches.total == 2
