"""The invariant (DESIGN.md §2): one pass = any chunking = step by step = the reference; a batch = each alone."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import GAMMAS, make_inputs, make_model, one_thread, set_decays
from kernels import ops
from model.reference import concept_step, reference_forward

TOL = dict(atol=2e-5, rtol=1e-4)


def assert_states_close(a, b):
    theirs = b.tensors()
    assert a.tensors().keys() == theirs.keys()
    for name, x in a.tensors().items():
        y = theirs[name]
        if name == "steps":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"state {name}: {m}")


def build(seed, **fields):
    """make_model, with decays far from 1 and near it when the concepts decay (DESIGN.md §1)."""
    model = make_model(seed, **fields)
    return set_decays(model) if model.config.has_concept_decay else model


def run_chunks(model, inputs, cuts):
    state = model.empty_state(inputs.shape[0])
    heads, start = [], 0
    for end in list(cuts) + [inputs.shape[1]]:
        if end > start:
            out, state = model(inputs[:, start:end], state)
            heads.append(out.head.view(inputs.shape[0], end - start, -1))
        start = end
    return torch.cat(heads, dim=1), state


configs = st.fixed_dictionaries({
    "d_model": st.integers(5, 24),
    "n_layers": st.integers(1, 3),
    "d_state": st.integers(1, 6),
    "d_conv": st.integers(2, 5),
    "expand": st.integers(1, 2),
    "n_concepts": st.sampled_from([0, 1, 3, 5]),
    "dt_rank": st.integers(0, 4),
    "concept_decay": st.sampled_from(["none", "learned"]),
})


@settings(max_examples=25, deadline=None)
@given(fields=configs, length=st.integers(1, 24), data=st.data(), seed=st.integers(0, 1000))
def test_one_pass_equals_any_chunking_and_steps(fields, length, data, seed):
    model = build(seed, **fields)
    inputs = make_inputs(model, 2, length, seed)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4), label="cuts"))
    _, whole_state = assert_one_pass_equals_chunks_and_steps(model, inputs, cuts)
    assert int(whole_state.steps[0]) == length


def assert_one_pass_equals_chunks_and_steps(model, inputs, cuts):
    """inputs (batch, T) in one pass, in chunks ending at `cuts`, and one step at a time: the same outputs and final
    states. Returns the one pass's (head (batch, T, d_out), state)."""
    with torch.no_grad():
        whole, whole_state = run_chunks(model, inputs, [])
        chunked, chunked_state = run_chunks(model, inputs, cuts)
        stepped, stepped_state = run_chunks(model, inputs, range(1, inputs.shape[1]))
    torch.testing.assert_close(chunked, whole, **TOL)
    torch.testing.assert_close(stepped, whole, **TOL)
    assert_states_close(chunked_state, whole_state)
    assert_states_close(stepped_state, whole_state)
    return whole, whole_state


@settings(max_examples=15, deadline=None)
@given(fields=configs, length=st.integers(1, 16), seed=st.integers(0, 1000))
def test_batched_model_matches_reference(fields, length, seed):
    model = build(seed, **fields)
    inputs = make_inputs(model, 2, length, seed)
    with torch.no_grad():
        out, _ = model(inputs)
    heads = out.head.view(2, length, -1)
    for i in range(2):
        torch.testing.assert_close(heads[i], reference_forward(model, inputs[i]), **TOL)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), k=st.sampled_from([0, 4]),
       decay=st.sampled_from(["none", "learned"]), seed=st.integers(0, 1000))
def test_packed_batch_equals_each_sequence_alone(lengths, k, decay, seed):
    assert_packed_batch_equals_each_alone(build(seed, n_concepts=k, concept_decay=decay), lengths, seed)


def assert_packed_batch_equals_each_alone(model, lengths, seed):
    """Sequences of these lengths packed in one batch get the outputs and final states each gets alone."""
    seqs = [make_inputs(model, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed, state = model(torch.cat(seqs), cu_seqlens=cu)
        for i, seq in enumerate(seqs):
            alone, alone_state = model(seq[None])
            torch.testing.assert_close(packed.head[cu[i]:cu[i + 1]], alone.head, **TOL)
            assert_states_close(state.select([i]), alone_state)


def test_pool_slots_continue_independently_and_padding_is_untouched():
    model = make_model(3)
    inputs = make_inputs(model, 2, 10, 3)
    pool = model.empty_state(5)
    pool.ssm[:, 4] = 7.0  # a slot nobody uses must keep its contents
    with torch.no_grad():
        for t in range(10):
            # stream 0 lives in slot 3, stream 1 in slot 0; a padding row (-1) rides along
            step_inputs = torch.stack([inputs[0, t], inputs[1, t], inputs[1, t]])[:, None]
            out, _ = model(step_inputs, pool, state_indices=torch.tensor([3, 0, -1]))
        whole, whole_state = model(inputs)
    assert_states_close(pool.select([3, 0]), whole_state)
    assert torch.all(pool.ssm[:, 4] == 7.0)
    assert int(pool.steps[1]) == 0 and int(pool.steps[3]) == 10


def test_float_inputs_per_step_and_classify_heads():
    with torch.no_grad():
        per_step = make_model(1, vocab_size=None, d_input=7, head="per_step", d_output=3)
        inputs = make_inputs(per_step, 1, 9, 1)
        out, _ = per_step(inputs)
        assert out.head.shape == (9, 3)
        torch.testing.assert_close(out.head, reference_forward(per_step, inputs[0]), **TOL)
        classify = make_model(2, vocab_size=None, d_input=7, head="classify", n_classes=4)
        out, _ = classify(inputs)
        assert out.head.shape == (1, 4)
        torch.testing.assert_close(out.head[0], reference_forward(classify, inputs[0]), **TOL)


@pytest.mark.parametrize("decay", ["none", "learned"])
def test_concept_state_stays_exact_deep_into_a_stream(decay):
    # After ~10^6 steps raw concept sums in fp32 would round a step away; the stored means must not. With decay
    # the mass of a concept with γ = 1 - 1e-5 levels off near 10^5, as here, 10^6 steps into the stream.
    model = build(4, n_layers=1, concept_decay=decay)
    length = 80  # more than one internal chunk of the PyTorch path
    inputs = make_inputs(model, 1, length, 4)
    deep = model.empty_state(1)
    deep.concept_mass.fill_(1e6 if decay == "none" else 1e5)
    deep.concept_mean.normal_(generator=torch.Generator().manual_seed(0))
    deep.ssm.normal_(generator=torch.Generator().manual_seed(1))
    deep.steps.fill_(10**6)
    stepped, chunked, oracle, initial = deep.clone(), deep.clone(), deep.clone(), deep.clone()
    with torch.no_grad():
        whole, _ = model(inputs, deep)
        heads = [model(inputs[:, t:t + 1], stepped)[0].head for t in range(length)]
        parts = [model(inputs[:, a:b], chunked)[0].head for a, b in ((0, 1), (1, 66), (66, length))]
    expected = reference_forward(model, inputs[0], oracle)
    for got, state in ((torch.cat(heads), stepped), (torch.cat(parts), chunked), (expected, oracle)):
        torch.testing.assert_close(got, whole.head, **TOL)
        assert_states_close(state, deep)
    # the newest steps still move the means (by about a / 1e6): their contribution is not rounded away
    moved = (deep.concept_mean - initial.concept_mean).abs().amax(dim=-1)
    assert bool((moved > 0).all())
    if decay == "none":  # routing weights sum to one: `length` steps add exactly `length` to the total fp64 mass
        added = (deep.concept_mass - initial.concept_mass).sum(-1)
        torch.testing.assert_close(added, torch.full_like(added, float(length)), atol=1e-6, rtol=0)
    else:  # the γ = 0.5 concept forgot the deep past within a few steps; the γ = 1 - 1e-5 one kept nearly all
        assert float(deep.concept_mass[0, 0, 0]) < 3 and float(deep.concept_mass[0, 0, 1]) > 0.99 * 1e5
    assert int(deep.steps[0]) == 10**6 + length


DEEP_STEPS = 100_000


def test_concept_term_holds_the_invariant_1e5_steps_into_a_stream():
    # The model's PyTorch path for the concept term over 10^5 + 256 steps, with decays near 1 and far from it:
    # one pass, odd chunks, and the last 256 steps one at a time all agree, and agree with DESIGN.md §1's sums
    # done directly in fp64. (Without decay the mass only grows; test_concept_state_stays_exact_deep_into_a_stream
    # covers 10^6 steps in.) The whole model runs 10^5 steps in test_train_forward.py, on the training forward: the
    # serving path's PyTorch SSM scan loops over steps in Python, 10 s per 10^5 steps.
    k, d_c, eps, tail = 3, 4, 1e-6, 256
    total = DEEP_STEPS + tail
    gen = torch.Generator().manual_seed(9)
    a = torch.softmax(2 * torch.randn(total, k, generator=gen), -1)  # (T, k)
    v = torch.randn(total, d_c, generator=gen) + 1.0  # (T, C), a nonzero mean to remember
    mix = torch.eye(k) + 0.1 * torch.randn(k, k, generator=gen)
    log_decay = torch.tensor([math.log(g) for g in GAMMAS])  # (k,)
    slot = torch.tensor([0], dtype=torch.int32)

    def fresh():
        return torch.zeros(1, k, d_c), torch.zeros(1, k, dtype=torch.float64)

    def chunk(state, lo, hi):
        cu = torch.tensor([0, hi - lo], dtype=torch.int32)
        return ops.concept_filter(a[lo:hi], v[lo:hi], mix, *state, cu, slot, eps, log_decay)

    whole_state, split_state = fresh(), fresh()
    cuts = [0, 1, 37_771, DEEP_STEPS]
    with one_thread():
        whole = chunk(whole_state, 0, total)
        parts = [chunk(split_state, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
        parts += [ops.concept_filter_update(a[t:t + 1], v[t:t + 1], mix, *split_state, slot, eps, log_decay)
                  for t in range(DEEP_STEPS, total)]
    torch.testing.assert_close(torch.cat(parts), whole, **TOL)
    torch.testing.assert_close(split_state[0], whole_state[0], **TOL)
    torch.testing.assert_close(split_state[1], whole_state[1], atol=1e-9, rtol=1e-12)

    # DESIGN.md §1's sums done directly in fp64 at sampled steps (the oracle's step loop would take minutes) ...
    gamma = torch.exp(log_decay.double())

    def direct(t):  # (S_t, m_t) in fp64
        weights = gamma ** torch.arange(t, -1, -1, dtype=torch.float64)[:, None] * a[:t + 1].double()  # (t+1, k)
        return weights.t() @ v[:t + 1].double(), weights.sum(0)

    for t in [0, 4_999, 77_777, DEEP_STEPS - 1]:
        S, m = direct(t)
        read = (a[t] @ mix) @ (S / (m[:, None] + eps)).float()
        torch.testing.assert_close(whole[t], read, **TOL, msg=lambda msg: f"step {t}: {msg}")
    # ... then the oracle's own steps (model/reference.py) for the last 256
    for t in range(DEEP_STEPS, total):
        read, S, m = concept_step(S, m, a[t], v[t], mix, gamma, eps)
        torch.testing.assert_close(whole[t], read, **TOL, msg=lambda msg: f"step {t}: {msg}")
    torch.testing.assert_close(whole_state[1][0], m, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(whole_state[0][0], (S / (m[:, None] + eps)).float(), **TOL)


def test_decode_step_equals_forward_steps_over_a_pool():
    model = make_model(5)
    inputs = make_inputs(model, 3, 6, 5)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32)
    pool_a, pool_b = model.empty_state(4), model.empty_state(4)
    with torch.no_grad():
        for t in range(6):
            a = model.decode_step(inputs[:, t], pool_a, slots).head
            b, _ = model(inputs[:, t:t + 1], pool_b, state_indices=slots)
            torch.testing.assert_close(a[[0, 2]], b.head[[0, 2]], **TOL)
    assert_states_close(pool_a, pool_b)
    assert pool_a.steps.tolist() == [6, 0, 6, 0]
