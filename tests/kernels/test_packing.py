"""PackedLayout: the per-pass host values and chunk tables every chunk kernel of every layer reads."""
import pytest
import torch

from kernels.packing import PackedLayout


def chunk_tables_by_loop(bounds, chunk):
    """Per sequence: ceil(length / chunk) chunks, at least one (an empty sequence still carries its state)."""
    chunk_seq, chunk_pos, chunk_cu = [], [], [0]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        count = max(-(-(b - a) // chunk), 1)
        chunk_seq += [i] * count
        chunk_pos += list(range(count))
        chunk_cu.append(chunk_cu[-1] + count)
    return chunk_seq, chunk_pos, chunk_cu


@pytest.mark.parametrize("bounds", [[0], [0, 1, 2, 3], [0, 0, 5, 5], [0, 1, 2, 50, 98], [0, 64], [0, 65, 70],
                                    [0, 2048], [0, 1, 130, 130]])
@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_chunk_tables(bounds, chunk):
    layout = PackedLayout(torch.tensor(bounds, dtype=torch.int32), bounds)
    got = [t.tolist() for t in layout.chunk_tables(chunk)]
    assert got == list(chunk_tables_by_loop(bounds, chunk))
    assert layout.chunk_tables(chunk)[0] is layout.chunk_tables(chunk)[0]  # built once per pass
    assert layout.num_seqs == len(bounds) - 1
    assert layout.max_len == max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 4, 5])
def test_chunk_tables_and_a_steps_slots_start_on_16_bytes_whatever_the_batch(num_seqs):
    # Triton compiles a kernel variant per pointer alignment: tables at offsets that moved with the batch compiled
    # new variants mid-serving on the H200
    from kernels.packing import aligned

    bounds = list(range(0, 3 * num_seqs + 1, 3))
    for table in PackedLayout.of(torch.tensor(bounds, dtype=torch.int32), bounds).chunk_tables(2):
        assert table.storage_offset() % 4 == 0
    assert [aligned(n) for n in (0, 1, 4, 5, 8)] == [0, 4, 4, 8, 8]
