"""The whole model on the Triton kernels matches the PyTorch path (interpreter on CPU; real sizes on a GPU)."""
import pytest
import torch

from helpers import MIXED, attention, make_inputs, make_model, set_decays
from kernels.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# fp32: the chunked scan sums in another order than the sequential reference, over 4 layers of d_model 768
TOL = {torch.float32: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


def run(model, inputs, cuts, kernels, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", kernels)
    state = model.empty_state(inputs.shape[0])
    heads, start = [], 0
    with torch.inference_mode():
        for end in list(cuts) + [inputs.shape[1]]:
            out, state = model(inputs[:, start:end].to(DEVICE), state)
            heads.append(out.head.float().view(inputs.shape[0], end - start, -1))
            start = end
    return torch.cat(heads, 1), state


SIZES = [dict(d_model=24, n_layers=2, d_state=4, d_conv=3, n_concepts=3, d_concept=6),
         dict(d_model=24, n_layers=2, d_state=4, d_conv=3, n_concepts=3, d_concept=6, concept_decay="learned"),
         dict(d_model=24, d_state=4, d_conv=3, n_concepts=3, d_concept=6, layers=MIXED, n_layers=0)]
if CUDA:
    SIZES.append(dict(d_model=768, n_layers=4, d_state=16, d_conv=4, n_concepts=16, d_concept=192, vocab_size=512))
    SIZES.append({**SIZES[-1], "concept_decay": "learned"})
    # a 130M-class hybrid's layer kinds at 4 layers: 12 heads on 4 key/value heads, a window the stream wraps
    SIZES.append({**SIZES[-2], "n_layers": 0, "layers": ({"type": "infomamba"}, attention(12, 48, n_kv_heads=4),
                                                         {"type": "mlp", "d_mlp": 1536}, attention(12, 4096))})


def size_id(fields):
    return f"d{fields['d_model']}-{'hybrid' if fields.get('layers') else fields.get('concept_decay', 'none')}"


@pytest.mark.parametrize("fields", SIZES, ids=size_id)
def test_kernels_match_torch_path_in_one_pass_chunks_and_steps(fields, monkeypatch):
    model = make_model(0, **fields)
    model = (set_decays(model) if model.config.has_concept_decay else model).to(DEVICE)
    length = 64 if CUDA else 10
    inputs = make_inputs(model, 2, length)
    cuts = [length // 3, length // 3 + 1, length - 2]
    expected, expected_state = run(model, inputs, [], "torch", monkeypatch)
    for split in ([], cuts, range(1, min(length, 12))):
        got, state = run(model, inputs, split, "triton", monkeypatch)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])
        torch.testing.assert_close(state.ssm, expected_state.ssm, **TOL[torch.float32])
        torch.testing.assert_close(state.concept_mean, expected_state.concept_mean, **TOL[torch.float32])
        for name, ring in expected_state.rings.items():
            torch.testing.assert_close(state.rings[name], ring, **TOL[torch.float32])
        assert torch.equal(state.steps, expected_state.steps)


@pytest.mark.skipif(not CUDA, reason="bf16 arithmetic needs a GPU (the interpreter gets it wrong)")
@pytest.mark.parametrize("fields", SIZES[-3:], ids=size_id)
def test_bf16_kernels_err_no_more_than_the_bf16_torch_path(fields, monkeypatch):
    # Random bf16 models drift from their fp32 selves through every layer; the kernels must not drift further
    # than the PyTorch path does, in one pass and in chunks.
    model = make_model(0, **fields).to(DEVICE)
    inputs = make_inputs(model, 2, 64)
    truth, _ = run(model, inputs, [], "torch", monkeypatch)
    model = model.to(torch.bfloat16)
    torch_err = (run(model, inputs, [], "torch", monkeypatch)[0] - truth).abs()
    for split in ([], [21, 22, 62]):
        kernel_err = (run(model, inputs, split, "triton", monkeypatch)[0] - truth).abs()
        assert kernel_err.mean() <= 1.5 * torch_err.mean() + 1e-3, (kernel_err.mean(), torch_err.mean())
        assert kernel_err.max() <= 3 * torch_err.max() + 1e-2, (kernel_err.max(), torch_err.max())


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fields", SIZES[-2:], ids=size_id)
def test_cuda_graph_decode_matches_eager_decode(dtype, fields, monkeypatch):
    from server.engine.cuda_graphs import CudaGraphDecoder

    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    model = make_model(1, **fields).to(DEVICE, dtype)
    inputs = make_inputs(model, 5, 8).to(DEVICE)
    eager, graphed = model.empty_state(16), model.empty_state(16)
    decoder = CudaGraphDecoder(model, graphed, batch_sizes=(1, 2, 4, 8))
    slots = torch.tensor([3, 7, 0, 12, 5], dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        for t in range(8):
            want = model.decode_step(inputs[:, t], eager, slots).head
            got = decoder(inputs[:, t], slots)
            torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(graphed.ssm, eager.ssm, **TOL[dtype])
    for name, ring in eager.rings.items():  # the hybrid's key/value rings live in the graphed pool too
        torch.testing.assert_close(graphed.rings[name], ring, **TOL[dtype])
    assert torch.equal(graphed.steps, eager.steps)


@pytest.mark.parametrize("path", ["0", "concept"])
@pytest.mark.parametrize("fields", SIZES, ids=size_id)
def test_unfused_decode_step_matches_the_fused_one(fields, path, monkeypatch):
    # INFOMAMBA_FUSED_STEP keeps main's one-op-a-kernel decode step selectable so that a GPU run can time both; it
    # must compute the same step (the fused one keeps its intermediates in fp32, hence a tolerance), state included.
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    model = make_model(2, **fields)
    model = (set_decays(model) if model.config.has_concept_decay else model).to(DEVICE)
    inputs = make_inputs(model, 4, 3).to(DEVICE)
    slots = torch.tensor([5, 1, -1, 3], dtype=torch.int32, device=DEVICE)
    runs = {}
    for choice in ("1", path):
        monkeypatch.setenv("INFOMAMBA_FUSED_STEP", choice)
        state = model.empty_state(6)
        with torch.inference_mode():
            heads = [model.decode_step(inputs[:, t], state, slots).head.float() for t in range(inputs.shape[1])]
        runs[choice] = torch.stack(heads), state
    (want, want_state), (got, state) = runs["1"], runs[path]
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert (got[:, 2] == want[:, 2]).all()
    for name in ("conv", "ssm", "concept_mean", "concept_mass"):
        torch.testing.assert_close(getattr(state, name), getattr(want_state, name), **TOL[torch.float32])
    for name, ring in want_state.rings.items():
        torch.testing.assert_close(state.rings[name], ring, **TOL[torch.float32])


@pytest.mark.parametrize("above", [False, True], ids=["fused-mamba", "unfused-mamba"])
@pytest.mark.parametrize("fields", [dict(SIZES[0], n_concepts=0), SIZES[1]], ids=["k0", "k3-learned"])
def test_default_decode_step_matches_torch_path_on_both_sides_of_the_fused_batch(fields, above, monkeypatch):
    # INFOMAMBA_FUSED_STEP's default takes the fused Mamba step up to mamba_step.FUSED_MAMBA_MAX_BATCH rows and
    # main's unfused one above (tests/model/test_launches.py checks which runs): both must compute the reference's
    # step, state included, with the fused concept step beside either.
    from kernels.mamba_step import FUSED_MAMBA_MAX_BATCH

    monkeypatch.delenv("INFOMAMBA_FUSED_STEP", raising=False)
    model = make_model(3, **fields)
    model = (set_decays(model) if model.config.has_concept_decay else model).to(DEVICE)
    rows = FUSED_MAMBA_MAX_BATCH + 1 if above else FUSED_MAMBA_MAX_BATCH
    inputs = make_inputs(model, rows, 2).to(DEVICE)
    slots = torch.randperm(rows + 2, generator=torch.Generator().manual_seed(rows))[:rows].to(torch.int32)
    slots[rows // 3] = -1
    slots = slots.to(DEVICE)
    runs = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("INFOMAMBA_KERNELS", kernels)
        state = model.empty_state(rows + 2)
        with torch.inference_mode():
            heads = [model.decode_step(inputs[:, t], state, slots).head.float() for t in range(inputs.shape[1])]
        runs[kernels] = torch.stack(heads), state
    (want, want_state), (got, state) = runs["torch"], runs["triton"]
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for name in ("conv", "ssm", "concept_mean", "concept_mass"):
        torch.testing.assert_close(getattr(state, name), getattr(want_state, name), **TOL[torch.float32])


def test_fused_step_choice_is_checked(monkeypatch):
    from kernels.dispatch import fused_step

    monkeypatch.setenv("INFOMAMBA_FUSED_STEP", "no")
    with pytest.raises(ValueError, match="INFOMAMBA_FUSED_STEP"):
        fused_step()
