"""Hybrid models (DESIGN.md §1): the invariant one pass = any chunking = step by step = the sequential oracle, for
mixed and attention-only layer lists, windows of 1 and longer than the stream, streams many windows long (the ring
wraps many times) and streams 10^6 steps deep (rotary positions far out)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ATTENTION_ONLY, LONG_WINDOW, MIXED, attention, make_hybrid, make_inputs
from model.reference import reference_forward
from test_invariance import (TOL, assert_one_pass_equals_chunks_and_steps, assert_packed_batch_equals_each_alone,
                            assert_states_close)

LAYER_LISTS = {"mixed": MIXED, "attention-only": ATTENTION_ONLY, "long-window": LONG_WINDOW}

layer = st.one_of(
    st.just({"type": "infomamba"}),
    st.just({"type": "mlp", "d_mlp": 8}),
    st.builds(lambda heads, window, rope: attention(heads[0], window, n_kv_heads=heads[1], rope=rope),
              st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 1)]), st.integers(1, 7), st.booleans()),
)


@settings(max_examples=20, deadline=None)
@given(layers=st.lists(layer, min_size=1, max_size=4), length=st.integers(1, 24), data=st.data(),
       seed=st.integers(0, 1000))
def test_one_pass_equals_any_chunking_steps_and_the_oracle(layers, length, data, seed):
    model = make_hybrid(seed, layers, d_model=8, d_state=2, n_concepts=2, d_concept=4)
    inputs = make_inputs(model, 2, length, seed)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4), label="cuts"))
    whole, whole_state = assert_one_pass_equals_chunks_and_steps(model, inputs, cuts)
    oracle_state = model.empty_state(1)
    torch.testing.assert_close(reference_forward(model, inputs[1], oracle_state), whole[1], **TOL)
    assert_states_close(oracle_state, whole_state.select([1]))


@pytest.mark.parametrize("layers", LAYER_LISTS.values(), ids=LAYER_LISTS.keys())
def test_a_stream_deep_into_its_ring_continues_like_the_oracle(layers):
    # 10^6 steps in, every ring full of keys from the past (wrapped about 2 * 10^5 times for W = 5): one pass,
    # odd chunks, single steps and the oracle agree, rotary angles 10^6 steps out included
    model = make_hybrid(2, layers)
    length = 23
    inputs = make_inputs(model, 1, length, 2)
    deep = model.empty_state(1)
    gen = torch.Generator().manual_seed(2)
    for name, tensor in deep.tensors().items():
        if name == "concept_mass":
            tensor.fill_(1e5)
        elif name != "steps":
            tensor.copy_(torch.randn(tensor.shape, generator=gen))
    deep.steps.fill_(10**6 + 3)
    stepped, chunked, oracle = deep.clone(), deep.clone(), deep.clone()
    with torch.no_grad():
        whole, _ = model(inputs, deep)
        heads = [model(inputs[:, t:t + 1], stepped)[0].head for t in range(length)]
        parts = [model(inputs[:, a:b], chunked)[0].head for a, b in ((0, 2), (2, 9), (9, length))]
    expected = reference_forward(model, inputs[0], oracle)
    for got, state in ((torch.cat(heads), stepped), (torch.cat(parts), chunked), (expected, oracle)):
        torch.testing.assert_close(got, whole.head, **TOL)
        assert_states_close(state, deep)
    assert int(deep.steps[0]) == 10**6 + 3 + length


def test_the_ring_holds_the_last_window_at_position_mod_w():
    # with attention first, position p's key is k_proj(RMSNorm(embedding[token_p])): after 11 steps a ring of 4
    # holds positions 7, 8, 9, 10 at entries 3, 0, 1, 2
    model = make_hybrid(3, (attention(2, 4), {"type": "mlp", "d_mlp": 8}))
    inputs = make_inputs(model, 1, 11, 3)
    with torch.no_grad():
        _, state = model(inputs)
        attn = model.layers[0]
        keys = attn.attention.k_proj(attn.norm(model.embedding(inputs[0]))).view(11, 2, 12)  # (T, G, Dh)
    ring = state.rings["attention.0.key"][0]  # (G, W, Dh)
    assert ring.shape == (2, 4, 12)
    for position in range(7, 11):
        torch.testing.assert_close(ring[:, position % 4], keys[position], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layers", [MIXED, ATTENTION_ONLY], ids=["mixed", "attention-only"])
def test_packed_batch_equals_each_sequence_alone(layers):
    assert_packed_batch_equals_each_alone(make_hybrid(4, layers), [3, 1, 12, 6], 4)


def test_decode_step_over_a_pool_equals_forward_steps_and_leaves_other_slots_alone():
    model = make_hybrid(5)
    inputs = make_inputs(model, 3, 8, 5)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32)
    pool_a, pool_b = model.empty_state(4), model.empty_state(4)
    pool_a.rings["attention.1.key"][3] = 7.0  # a slot nobody uses keeps its keys
    pool_b.rings["attention.1.key"][3] = 7.0
    with torch.no_grad():
        for t in range(8):
            a = model.decode_step(inputs[:, t], pool_a, slots).head
            b, _ = model(inputs[:, t:t + 1], pool_b, state_indices=slots)
            torch.testing.assert_close(a[[0, 2]], b.head[[0, 2]], **TOL)
    assert_states_close(pool_a, pool_b)
    assert pool_a.steps.tolist() == [8, 0, 8, 0]
    assert torch.all(pool_a.rings["attention.1.key"][3] == 7.0) and torch.all(pool_a.rings["attention.1.key"][1] == 0)
