"""Programmatic dependent launch (kernels/pdl.py) changes when a decode kernel starts, never what it computes: with it
on, a kernel that read an activation or state before its wait would race the kernel before it, and the outputs
would differ from the same steps launched plainly."""
import pytest
import torch

from helpers import make_model
from kernels import pdl
from kernels.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
CUDA = torch.cuda.is_available()
HAS_PDL = CUDA and pdl.available(torch.device("cuda"))


def test_used_where_it_can_run_and_pays(monkeypatch):
    assert not pdl.use(torch.device("cpu"), 1)
    assert pdl.options(False) == {}
    if not CUDA:  # the interpreter runs no inline assembly
        assert not pdl.available(torch.device("cuda"))
    monkeypatch.setattr(pdl, "available", lambda device: True)
    gpu = torch.device("cuda", 0)
    assert pdl.use(gpu, 1) and pdl.use(gpu, pdl.MAX_ROWS)
    assert not pdl.use(gpu, pdl.MAX_ROWS + 1)  # cuBLAS's products there: nothing to gain
    monkeypatch.setattr(pdl, "ENABLED", False)  # INFOMAMBA_PDL=0
    assert not pdl.use(gpu, 1)


def decode_steps(model, batch: int, steps: int, graphs: bool, with_pdl: bool, monkeypatch):
    """The head's outputs of `steps` decode steps of `batch` streams from a fresh pool, and the pool after them."""
    from server.engine.cuda_graphs import CudaGraphDecoder

    monkeypatch.setattr(pdl, "ENABLED", with_pdl)
    pool = model.empty_state(batch + 2)
    slots = torch.arange(batch, dtype=torch.int32, device="cuda").flip(0) + 2  # not the pool's first rows
    generator = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (steps, batch), device="cuda", generator=generator)
    heads = []
    with torch.inference_mode():
        decode = (CudaGraphDecoder(model, pool, batch_sizes=(batch,)) if graphs
                  else lambda t, s: model.decode_step(t, pool, s).head)
        for step in range(steps):
            heads.append(decode(tokens[step], slots).clone())
    torch.cuda.synchronize()
    return torch.stack(heads), pool


@pytest.mark.skipif(not HAS_PDL, reason="needs a GPU with programmatic dependent launch (sm_90+)")
@pytest.mark.parametrize("k", [0, 16])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_decode_with_pdl_equals_plain_launches(k, batch, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    model = make_model(0, d_model=768, n_layers=4, d_state=16, d_conv=4, n_concepts=k, d_concept=192,
                       vocab_size=512).to("cuda", torch.bfloat16)
    for graphs in (False, True):
        plain, plain_pool = decode_steps(model, batch, 12, graphs, False, monkeypatch)
        for _ in range(3):  # a race would show in some runs and not others
            got, pool = decode_steps(model, batch, 12, graphs, True, monkeypatch)
            assert torch.equal(got, plain), f"graphs={graphs}: outputs differ with PDL"
            for name, tensor in plain_pool.tensors().items():
                assert torch.equal(pool.tensors()[name], tensor), f"graphs={graphs}: state {name} differs with PDL"
