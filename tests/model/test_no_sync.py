"""The kernel path reads nothing back from the device inside a pass: no .item(), .tolist() or truth value of a
tensor between launches (each would wait for the GPU to drain, host overhead the 2K-token prefill pays per layer)."""
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_inputs, make_model
from kernels.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = str(Path(__file__).resolve().parents[2])
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def packed_inputs(model, lengths):
    """Packed sequences (one spans two chunks of the concept filter), on the device, with their layout on the host."""
    seqs = [make_inputs(model, 1, n, seed=n)[0] for n in lengths]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return dict(ids=torch.cat(seqs).to(DEVICE), cu=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
                bounds=bounds, slots=torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE),
                tokens=torch.tensor([1, 2, 3], device=DEVICE))


def packed_pass(model, pool, batch):
    """A prefill of the packed sequences, then a decode step of the same streams."""
    with torch.inference_mode():
        model(batch["ids"], pool, cu_seqlens=batch["cu"], state_indices=batch["slots"], bounds=batch["bounds"])
        model.decode_step(batch["tokens"], pool, batch["slots"])


def test_the_kernel_path_never_reads_the_device(monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")  # a concept layer runs every kernel a plain Mamba layer does
    model = make_model(0, n_layers=1, n_concepts=3, concept_decay="learned").to(DEVICE)
    pool = model.empty_state(3)
    packed_pass(model, pool, packed_inputs(model, [5, 3, 1]))  # warm-up: builds the fused weights
    batch = packed_inputs(model, [70, 7, 1])
    reads = []
    for name in READS:
        def wrapper(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ROOT) and "/tests/" not in caller.f_code.co_filename:
                reads.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    packed_pass(model, pool, batch)
    assert reads == []


@pytest.mark.skipif(not CUDA, reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("k", [0, 16])
def test_no_pass_synchronizes_the_gpu(k, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    model = make_model(0, d_model=256, n_layers=2, n_concepts=k, d_state=16, d_conv=4, d_concept=64,
                       vocab_size=512).to(DEVICE, torch.bfloat16)
    pool = model.empty_state(3)
    packed_pass(model, pool, packed_inputs(model, [300, 7, 1]))  # warm-up: compiles, builds the fused weights
    batch = packed_inputs(model, [5000, 64, 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed_pass(model, pool, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
