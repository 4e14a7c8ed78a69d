"""A mixed step replayed from a CUDA graph (server/engine/prefill_graphs.py) runs the kernels as they were
launched for the bucket's capture layout (host bounds: sequences of MAX_CHUNK, then empty ones) on the real layout
padded into it (device bounds; pad sequences on slot -1). Here the same is done without a graph, on the Triton
kernels (the interpreter on the CPU): the padded pass must equal the real layout run as it is, rows and states,
and leave every other slot alone."""
import pytest
import torch

from helpers import make_model, set_decays
from kernels.dispatch import triton_available
from kernels.packing import PackedLayout
from server.engine.prefill_graphs import MAX_CHUNK, buckets, choose_bucket, long_lengths, pad_layout

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TOL = dict(atol=1e-4, rtol=1e-4)


def by_seqs(max_seqs=32, max_tokens=256):
    found = {}
    for n, t in buckets(max_seqs, max_tokens):
        found.setdefault(n, []).append(t)
    return found


def test_buckets_and_padding():
    table = by_seqs()
    assert choose_bucket(table, [0, 1, 2, 3], 1) == (4, 64)  # three decodes: one pad sequence takes 61 tokens
    assert choose_bucket(table, [0, 1, 2, 50], 48) == (4, 64)
    assert choose_bucket(table, [0, 64, 128], 64) == (2, 128)  # a full bucket needs no pad sequence
    assert choose_bucket(table, [0, 65], 65) is None  # longer than a chunk: eager
    assert choose_bucket(table, list(range(18)), 1) == (32, 64)  # 17 sequences: the next count up
    assert choose_bucket(table, [0, 300], 64) is None  # more tokens than any bucket
    bounds = pad_layout([0, 1, 2, 50], 8, 256)
    assert bounds[:4] == [0, 1, 2, 50] and bounds[-1] == 256 and len(bounds) == 9
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= MAX_CHUNK
    with pytest.raises(ValueError):
        pad_layout([0, 1], 2, 256)


def test_long_buckets_take_one_sequence_of_exactly_their_length():
    assert long_lengths(1000) == [256, 512, 768] and long_lengths(200) == []
    long = frozenset(long_lengths(2048))
    table = by_seqs(max_tokens=2048)
    assert choose_bucket(table, [0, 1792], 1792, long) == (1, 1792)
    assert choose_bucket(table, [0, 1800], 1800, long) is None  # not a captured length: eager
    assert choose_bucket(table, [0, 10, 522], 512, long) is None  # beside another sequence: eager
    assert choose_bucket(table, [0, 1792], 1792) is None  # no long buckets captured
    assert choose_bucket(table, [0, 1, 2, 50], 48, long) == (4, 64)  # short layouts as before
    assert pad_layout([0, 1792], 1, 1792) == [0, 1792]  # the replay's layout is the real one


@pytest.mark.parametrize("fields", [dict(n_concepts=0), dict(n_concepts=3),
                                    dict(n_concepts=3, concept_decay="learned")], ids=["k0", "k3", "decay"])
def test_padded_capture_layout_equals_the_real_layout(fields, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")
    model = make_model(0, **fields)
    model = set_decays(model) if model.config.has_concept_decay else model
    lengths, slots = [1, 1, 1, 37, 5], [6, 2, 0, 4, 7]  # three decodes, a prompt, an append
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.config.vocab_size, (starts[-1],), generator=gen)
    pool = model.empty_state(8)
    with torch.inference_mode():  # a carried state in every slot
        model(torch.randint(0, model.config.vocab_size, (8, 6), generator=gen), pool)
        padded_pool = pool.clone()
        expected, _ = model(tokens, pool, cu_seqlens=torch.tensor(starts, dtype=torch.int32),
                            state_indices=torch.tensor(slots, dtype=torch.int32), bounds=starts)
        n, t = choose_bucket(by_seqs(), starts, max(lengths))
        assert (n, t) == (8, 64)
        device_bounds = torch.tensor(pad_layout(starts, n, t), dtype=torch.int32)
        layout = PackedLayout(device_bounds, pad_layout([0], n, t))  # the kernels configured as when captured
        padded = torch.zeros(t, dtype=torch.long)
        padded[:starts[-1]] = tokens
        padded_slots = torch.tensor(slots + [-1] * (n - len(slots)), dtype=torch.int32)
        got, _ = model(padded, padded_pool, state_indices=padded_slots, layout=layout)
    torch.testing.assert_close(got.head[:starts[-1]], expected.head, **TOL)
    for name in ("conv", "ssm", "concept_mean", "concept_mass"):
        want, have = getattr(pool, name, None), getattr(padded_pool, name, None)
        if want is not None:
            torch.testing.assert_close(have, want, **TOL)  # the real slots moved alike; slots 1, 3, 5 untouched
    assert torch.equal(padded_pool.steps, pool.steps)
