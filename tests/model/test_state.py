import pytest
import torch

from helpers import make_inputs, make_model
from model.state import SnapshotError, load_snapshot, save_snapshot, state_nbytes_per_stream


def test_state_size_does_not_depend_on_sequence_length():
    model = make_model(0)
    sizes = set()
    with torch.no_grad():
        for length in (1, 10, 100):
            _, state = model(make_inputs(model, 1, length))
            sizes.add(state.nbytes())
    assert sizes == {state_nbytes_per_stream(model.config)}


def test_snapshot_round_trips_exactly():
    model = make_model(1)
    with torch.no_grad():
        _, state = model(make_inputs(model, 1, 13))
    blob = save_snapshot(state, model.config.name, model.fingerprint())
    restored = load_snapshot(blob, model.config, model.fingerprint())
    for name, tensor in state.tensors().items():
        assert torch.equal(getattr(restored, name), tensor), name
        assert getattr(restored, name).dtype == tensor.dtype
    assert int(restored.steps[0]) == 13


def test_resuming_from_a_snapshot_equals_never_stopping():
    model = make_model(2)
    inputs = make_inputs(model, 1, 20)
    with torch.no_grad():
        whole, _ = model(inputs)
        _, state = model(inputs[:, :8])
        blob = save_snapshot(state, model.config.name, model.fingerprint())
        rest, _ = model(inputs[:, 8:], load_snapshot(blob, model.config, model.fingerprint()))
    torch.testing.assert_close(rest.head, whole.head[8:], atol=2e-5, rtol=1e-4)


def test_snapshot_from_another_model_is_refused():
    model, other = make_model(1), make_model(2)
    with torch.no_grad():
        _, state = other(make_inputs(other, 1, 5))
    blob = save_snapshot(state, "other-model", other.fingerprint())
    with pytest.raises(SnapshotError, match="another model.*other-model"):
        load_snapshot(blob, model.config, model.fingerprint())


@pytest.mark.parametrize("blob, message", [
    (b"", "too short"),
    (b"\x00" * 64, "header length"),
    (b"not a safetensors blob at all", "header length"),
])
def test_corrupt_snapshots_are_refused(blob, message):
    model = make_model(1)
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(blob, model.config, model.fingerprint())


def test_truncated_snapshot_is_refused():
    model = make_model(1)
    blob = save_snapshot(model.empty_state(1), model.config.name, model.fingerprint())
    with pytest.raises(SnapshotError, match="corrupt"):
        load_snapshot(blob[: len(blob) - 9], model.config, model.fingerprint())


def test_snapshot_of_a_batch_is_refused():
    model = make_model(1)
    with pytest.raises(ValueError, match="one stream"):
        save_snapshot(model.empty_state(2), model.config.name, model.fingerprint())


def test_snapshot_carries_the_last_output_when_given():
    from model.state import read_snapshot

    model = make_model(1)
    with torch.no_grad():
        out, state = model(make_inputs(model, 1, 6))
    blob = save_snapshot(state, model.config.name, model.fingerprint(), last_output=out.head[-1])
    restored, last = read_snapshot(blob, model.config, model.fingerprint())
    assert torch.equal(last, out.head[-1].float()) and int(restored.steps[0]) == 6
    assert read_snapshot(save_snapshot(state, "m", model.fingerprint()), model.config, model.fingerprint())[1] is None
    wrong = save_snapshot(state, model.config.name, model.fingerprint(), last_output=torch.zeros(3))
    with pytest.raises(SnapshotError, match="last_output"):
        read_snapshot(wrong, model.config, model.fingerprint())


def test_a_snapshot_moves_between_replicas_of_one_model_in_different_dtypes(tmp_path):
    from model.weights import load_model, save_model

    save_model(make_model(3), tmp_path / "m")
    fp32, bf16 = load_model(tmp_path / "m"), load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert fp32.fingerprint() == bf16.fingerprint()
    inputs = make_inputs(fp32, 1, 9)
    with torch.no_grad():
        _, state = bf16(inputs[:, :5])
        blob = save_snapshot(state, bf16.config.name, bf16.fingerprint())
        moved = load_snapshot(blob, fp32.config, fp32.fingerprint(), dtype=fp32.dtype)
        assert moved.conv.dtype == torch.float32 and int(moved.steps[0]) == 5
        rest, _ = fp32(inputs[:, 5:], moved)
        whole, _ = fp32(inputs)
    # the bf16 prefix leaves the fp32 continuation within bf16 rounding of never having moved
    torch.testing.assert_close(rest.head, whole.head[5:], atol=0.1, rtol=0.05)
