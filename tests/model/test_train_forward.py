"""The training forward computes InfoMamba.forward's function (from a zero state), and its scan's gradient."""
import pytest
import torch

from helpers import ATTENTION_ONLY, MIXED, make_hybrid, make_inputs, make_model, one_thread, set_decays
from model import train_forward as train_forward_module
from model.reference import reference_forward
from model.train_forward import _scan, linear_scan, train_forward


def sequential_scan(a, b):
    s, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        s = a[:, t] * s + b[:, t]
        out.append(s)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_scan_matches_sequential(length):
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(2, length, 3, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_scan(a, b, chunk=8), sequential_scan(a, b))


def test_scan_gradient():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 19, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, 19, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(linear_scan, (a, b))


def build(seed, **overrides):
    model = make_model(seed=seed, **overrides)
    return set_decays(model) if model.config.has_concept_decay else model


@pytest.mark.parametrize("overrides", [{}, {"n_concepts": 0}, {"n_concepts": 1, "expand": 1, "d_conv": 4},
                                       {"tie_embeddings": False, "proj_bias": True, "conv_bias": False},
                                       {"concept_decay": "learned"}])
@pytest.mark.parametrize("length", [1, 7, 40])
def test_matches_model_forward(overrides, length):
    model = build(length, **overrides)
    ids = make_inputs(model, batch=3, length=length, seed=1)
    with torch.no_grad():
        expected, _ = model(ids)
        got = train_forward(model, ids)
    torch.testing.assert_close(got.logits.reshape(-1, got.logits.shape[-1]), expected.head, atol=2e-5, rtol=1e-4)
    assert len(got.branches) == (model.config.n_layers if model.config.n_concepts else 0)


@pytest.mark.parametrize("layers", [MIXED, ATTENTION_ONLY], ids=["mixed", "attention-only"])
def test_a_hybrid_matches_model_forward_and_trains(layers):
    # streams past every window (5, 3; 4 and 1), rotary positions, grouped-query heads, an MLP
    model = make_hybrid(6, layers)
    ids = make_inputs(model, batch=3, length=17, seed=2)
    with torch.no_grad():
        expected, _ = model(ids)
        got = train_forward(model, ids)
    torch.testing.assert_close(got.logits.reshape(-1, got.logits.shape[-1]), expected.head, atol=2e-5, rtol=1e-4)
    train_forward(model, ids).logits.logsumexp(-1).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if ".attention." in name or ".mlp." in name)
    with pytest.raises(NotImplementedError, match="hybrid"):
        train_forward(model, ids, model.empty_state(3))


def test_float_inputs_and_per_step_head():
    model = make_model(vocab_size=None, d_input=5, head="per_step", d_output=3)
    inputs = make_inputs(model, batch=2, length=9)
    with torch.no_grad():
        expected, _ = model(inputs)
        got = train_forward(model, inputs)
    torch.testing.assert_close(got.logits.reshape(-1, 3), expected.head, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("decay", ["none", "learned"])
@pytest.mark.parametrize("overrides", [{}, {"n_concepts": 0}])
def test_windows_continue_a_carried_state_like_the_model(decay, overrides):
    # Truncated BPTT: a window from a carried state (deep into a stream, spanning several concept chunks with
    # padding) computes what the serving path computes from that state, and hands on the same state.
    model = build(7, concept_decay=decay, **overrides)
    ids = make_inputs(model, batch=2, length=150, seed=2)
    state = model.empty_state(2)
    with torch.no_grad():
        model(make_inputs(model, batch=2, length=30, seed=3), state)  # a real conv window and SSM state
    state.concept_mass.mul_(1e4)  # as if 10^4+ steps in
    expected_state = state.clone()
    with torch.no_grad():
        got = train_forward(model, ids, state)
        expected, _ = model(ids, expected_state)
    torch.testing.assert_close(got.logits.reshape(-1, got.logits.shape[-1]), expected.head, atol=2e-5, rtol=1e-4)
    for name, tensor in expected_state.tensors().items():
        torch.testing.assert_close(getattr(got.state, name), tensor, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert got.state.steps.tolist() == [180, 180] and state.steps.tolist() == [30, 30]  # the input is not written


@pytest.mark.parametrize("decay", ["none", "learned"])
def test_gradients_match_plain_autograd(monkeypatch, decay):
    # The model's own forward writes state in place, so the custom scan's backward is checked against
    # autograd through a sequential scan instead.
    model = build(3, concept_decay=decay)
    ids = make_inputs(model, batch=2, length=70)  # two concept chunks: their scan's backward is used too

    def grads():
        model.zero_grad()
        train_forward(model, ids).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads()
    monkeypatch.setattr(train_forward_module, "linear_scan", sequential_scan)
    slow = grads()
    for name, grad in fast.items():
        torch.testing.assert_close(grad, slow[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if decay == "learned":  # training can move the horizons
        assert bool((fast["layers.0.concept.decay_logit"] != 0).all())


DEEP_TOL = dict(atol=2e-5, rtol=1e-4)  # measured: logits within 3e-6 of each other (scale 1) at 10^5 steps


@pytest.mark.parametrize("decay", ["none", "learned"])
def test_whole_model_holds_the_invariant_1e5_steps_into_a_stream(decay):
    # The fast chunked PyTorch path over 10^5 steps in one pass equals it in odd windows with the state carried;
    # from there the serving path, one step at a time, and the sequential fp64 oracle continue it identically.
    model = build(11, n_layers=2, d_model=8, d_state=2, d_conv=3, expand=1, n_concepts=3, d_concept=4,
                  concept_decay=decay)
    deep, tail = 100_000, 48
    ids = make_inputs(model, batch=1, length=deep + tail, seed=5)
    with torch.no_grad(), one_thread():
        whole = train_forward(model, ids, model.empty_state(1))
        state, cuts = model.empty_state(1), [0, 1, 777, 64_001, deep]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            part = train_forward(model, ids[:, lo:hi], state)
            torch.testing.assert_close(part.logits, whole.logits[:, lo:hi], **DEEP_TOL)
            state = part.state
        assert int(state.steps[0]) == deep
        if decay == "learned":  # the γ = 1 - 1e-5 concepts remember most of 10^5 steps, the γ = 0.5 ones two
            assert float(state.concept_mass[:, 0, 1].min()) > 1e4 and float(state.concept_mass[:, 0, 0].max()) < 4
        oracle = state.clone()
        stepped = [model(ids[:, t:t + 1], state)[0].head for t in range(deep, deep + tail)]
    expected = whole.logits[0, deep:]
    torch.testing.assert_close(torch.cat(stepped), expected, **DEEP_TOL)
    torch.testing.assert_close(reference_forward(model, ids[0, deep:], oracle), expected, **DEEP_TOL)
    for name, tensor in whole.state.tensors().items():
        for other in (state, oracle):
            torch.testing.assert_close(getattr(other, name), tensor, **DEEP_TOL, msg=lambda m: f"{name}: {m}")
