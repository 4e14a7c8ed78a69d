import json

import pytest
import torch
from safetensors.torch import save as st_save

from helpers import attention, make_hybrid, make_inputs, make_model
from model.state import (LAST_OUTPUT, MAX_OUTPUT_MAGNITUDE, MAX_STATE_MAGNITUDE, MAX_STEPS, SnapshotError, StreamState,
                         _checksum, _snapshot_header, load_snapshot, read_snapshot, save_snapshot,
                         state_nbytes_per_stream)


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


# --- Integrity: every tampered snapshot is refused with a message that names what failed -----------------------

def _blob(seed: int = 1, length: int = 13, last_output: bool = True, edit=None):
    """A model, a snapshot of one of its streams (optionally edited before saving: save_snapshot checks nothing,
    so this is how a crafted snapshot with a valid checksum is made), and the state it holds."""
    model = make_model(seed)
    with torch.no_grad():
        out, state = model(make_inputs(model, 1, length))
    if edit is not None:
        edit(state)
    blob = save_snapshot(state, model.config.name, model.fingerprint(),
                         last_output=out.head[-1] if last_output else None)
    return model, blob, state


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, body: bytes, resign: bool = True) -> bytes:
    """Rebuild a blob from an edited header; with resign, recompute its checksum the way a forger would, so the
    checks behind the checksum are what has to catch the edit."""
    def pack(h):
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + body
    if resign:
        metadata, entries = _snapshot_header(pack(header))
        header["__metadata__"]["checksum"] = _checksum(metadata, entries)
    return pack(header)


def _refused(model, blob: bytes, message: str, dtype=torch.float32) -> str:
    with pytest.raises(SnapshotError, match=message) as info:
        read_snapshot(blob, model.config, model.fingerprint(), dtype=dtype)
    return str(info.value)


def test_snapshot_carries_a_checksum_and_round_trips_exactly_with_its_last_output():
    model, blob, state = _blob()
    metadata = _split(blob)[0]["__metadata__"]
    assert metadata["format_version"] == "2" and metadata["checksum"].startswith("sha256:")
    restored, last = read_snapshot(blob, model.config, model.fingerprint())
    for name, tensor in state.tensors().items():
        assert torch.equal(getattr(restored, name), tensor) and getattr(restored, name).dtype == tensor.dtype, name
    # saved again, the same header (key order aside: safetensors does not keep it) and the same bytes
    again = save_snapshot(restored, model.config.name, model.fingerprint(), last)
    assert last is not None and _split(again) == _split(blob)


def test_a_flipped_bit_anywhere_in_the_tensor_bytes_is_a_checksum_mismatch():
    model, blob, _ = _blob()
    header, body = _split(blob)
    start = len(blob) - len(body)
    for offset in range(start, len(blob)):  # every byte of every tensor, a different bit each time
        bad = bytearray(blob)
        bad[offset] ^= 1 << (offset % 8)
        _refused(model, bytes(bad), "checksum mismatch")


@pytest.mark.parametrize("field, value", [
    ("steps", "12"), ("model_name", "renamed"), ("shapes", "{}"), ("format_version", "1 "), ("extra", "x"),
])
def test_edited_metadata_is_a_checksum_mismatch(field, value):
    model, blob, _ = _blob()
    header, body = _split(blob)
    header["__metadata__"][field] = value
    if field == "format_version":  # a version this server does not read is refused before the checksum
        _refused(model, _join(header, body, resign=False), "version '1 ' is not supported")
        return
    _refused(model, _join(header, body, resign=False), "checksum mismatch")


def test_a_flipped_bit_in_the_fingerprint_is_a_checksum_mismatch_not_another_model():
    model, blob, _ = _blob()
    fp = model.fingerprint().encode()
    at = blob.index(fp) + 3
    bad = bytearray(blob)
    bad[at] ^= 0x01
    _refused(model, bytes(bad), "checksum mismatch")


def test_a_missing_or_foreign_checksum_is_refused():
    model, blob, _ = _blob()
    header, body = _split(blob)
    del header["__metadata__"]["checksum"]
    _refused(model, _join(header, body, resign=False), "no checksum")
    header["__metadata__"]["checksum"] = "md5:" + "0" * 32
    _refused(model, _join(header, body, resign=False), "not a sha256 checksum")
    header["__metadata__"]["checksum"] = "sha256:\u00e9"  # not ASCII: refused, not a TypeError
    _refused(model, _join(header, body, resign=False), "checksum mismatch")


@pytest.mark.parametrize("name, relabel, expected", [
    ("ssm", "F16", "F32"), ("ssm", "BF16", "F32"), ("ssm", "I32", "F32"), ("concept_mean", "F16", "F32"),
    ("concept_mass", "I64", "F64"), ("concept_mass", "F32", "F64"), ("steps", "F64", "I64"),
    ("steps", "U64", "I64"), ("last_output", "BF16", "F32"), ("conv", "I32", "one of F32, BF16, F16"),
])
def test_a_relabelled_dtype_is_refused_naming_the_tensor_and_both_dtypes(name, relabel, expected):
    model, blob, _ = _blob()
    header, body = _split(blob)
    header[name]["dtype"] = relabel
    _refused(model, _join(header, body, resign=False), "checksum mismatch")
    message = _refused(model, _join(header, body), f"tensor '{name}' has dtype {relabel}, expected ")
    assert message.endswith(f"expected {expected}")


def test_conv_relabelled_to_another_model_dtype_is_refused_by_its_byte_length():
    # conv may legitimately be F32, BF16 or F16 (the writer's model dtype), so the relabel shows in its length
    model, blob, _ = _blob()
    header, body = _split(blob)
    header["conv"]["dtype"] = "BF16"
    _refused(model, _join(header, body), "corrupt: tensor 'conv' holds .* bytes, but BF16 of shape")


@pytest.mark.parametrize("name, shape", [
    ("ssm", lambda s: s[::-1]), ("ssm", lambda s: [s[0] * s[1], *s[2:]]), ("conv", lambda s: [*s[:-1], 1, s[-1]]),
    ("steps", lambda s: []), ("last_output", lambda s: [1, *s]), ("concept_mass", lambda s: [s[0], s[2], s[1]]),
])
def test_an_edited_shape_is_refused(name, shape):
    model, blob, _ = _blob()
    header, body = _split(blob)
    old = header[name]["shape"]
    header[name]["shape"] = shape(old)
    _refused(model, _join(header, body, resign=False), "checksum mismatch")
    message = _refused(model, _join(header, body), f"tensor '{name}' has shape")
    assert str(tuple(shape(old))) in message


@pytest.mark.parametrize("name", ["conv", "ssm", "concept_mean", "concept_mass", "last_output"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused(name, value):
    def poison(state):
        if name != LAST_OUTPUT:
            getattr(state, name).view(-1)[3] = value
    model, blob, _ = _blob(edit=poison)
    if name == LAST_OUTPUT:
        out = torch.zeros(model.config.d_head_output)
        out[7] = value
        blob = save_snapshot(read_snapshot(blob, model.config, model.fingerprint())[0], model.config.name,
                             model.fingerprint(), last_output=out)
    _refused(model, blob, f"tensor '{name}' holds NaN or infinity")


@pytest.mark.parametrize("name", ["conv", "ssm", "concept_mean"])
@pytest.mark.parametrize("value", [1e38, -3e38, 2e6])
def test_extreme_state_values_are_refused(name, value):
    model, blob, _ = _blob(edit=lambda s: getattr(s, name).view(-1).__setitem__(5, value))
    _refused(model, blob, f"tensor '{name}' holds a value of magnitude .* beyond the bound 1e\\+06")


def test_a_state_filled_up_to_the_bound_loads_and_stays_finite_in_fp32():
    def fill(state):
        for name in ("conv", "ssm", "concept_mean"):
            tensor = getattr(state, name)
            signs = torch.randint(0, 2, tensor.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
            tensor.copy_(signs * MAX_STATE_MAGNITUDE)
    model, blob, _ = _blob(edit=fill)
    state = load_snapshot(blob, model.config, model.fingerprint())
    with torch.no_grad():
        out, state = model(make_inputs(model, 1, 4), state)
    assert torch.isfinite(out.head).all() and torch.isfinite(state.ssm).all()


def test_extreme_last_output_is_refused():
    model, blob, state = _blob()
    fine = torch.full((model.config.d_head_output,), -0.5 * MAX_OUTPUT_MAGNITUDE)
    assert torch.equal(read_snapshot(save_snapshot(state, "m", model.fingerprint(), fine), model.config,
                                     model.fingerprint())[1], fine)
    for value in (3e38, -2 * MAX_OUTPUT_MAGNITUDE):
        blob = save_snapshot(state, "m", model.fingerprint(), torch.full_like(fine, value))
        _refused(model, blob, "tensor 'last_output' holds a value of magnitude .* beyond the bound 1e\\+12")


def test_conv_beyond_the_serving_dtype_range_is_refused():
    # 1e5 is within the state bound, but float16 tops out at 65504: the cast would make it infinite
    model, blob, _ = _blob(edit=lambda s: s.conv.view(-1).__setitem__(0, 1e5))
    _refused(model, blob, "'conv' \\(F32\\) holds values beyond the range of torch.float16", dtype=torch.float16)
    assert load_snapshot(blob, model.config, model.fingerprint(), dtype=torch.bfloat16).conv.dtype == torch.bfloat16


@pytest.mark.parametrize("mass, message", [
    (-1e-3, "holds a negative mass"), (-1e300, "holds a negative mass"),
    (1e9, "holds a mass of 1000000000.0, more than the 13 steps seen allow"),
])
def test_insane_concept_masses_are_refused(mass, message):
    model, blob, _ = _blob(edit=lambda s: s.concept_mass.view(-1).__setitem__(4, mass))
    _refused(model, blob, "tensor 'concept_mass' " + message)


@pytest.mark.parametrize("steps, message", [
    (-1, "is -1: steps seen cannot be negative"),
    (-(2 ** 63), "is -9223372036854775808: steps seen cannot be negative"),
    (2 ** 53, "is 9007199254740992, beyond the limit of 2\\*\\*53"),
    (2 ** 63 - 1, "is 9223372036854775807, beyond the limit of 2\\*\\*53"),
    (2 ** 63 - 5, "is 9223372036854775803, beyond the limit of 2\\*\\*53"),
])
def test_steps_out_of_range_are_refused(steps, message):
    model, blob, _ = _blob(edit=lambda s: s.steps.fill_(steps))
    _refused(model, blob, "snapshot metadata 'steps' " + message)


def test_steps_just_below_the_limit_load_and_the_counter_does_not_wrap():
    model, blob, _ = _blob(edit=lambda s: s.steps.fill_(MAX_STEPS - 1))
    state = load_snapshot(blob, model.config, model.fingerprint())
    with torch.no_grad():
        _, state = model(make_inputs(model, 1, 5), state)
    assert int(state.steps[0]) == MAX_STEPS + 4  # int64 has 2**63 - 2**53 steps of headroom from here


def test_steps_tensor_is_checked_on_its_own():
    model, blob, _ = _blob()
    header, body = _split(blob)
    at = header["steps"]["data_offsets"][0]
    for steps, message in ((-7, "tensor 'steps' is -7: steps seen cannot be negative"),
                           (2 ** 62, "tensor 'steps' is 4611686018427387904, beyond the limit"),
                           (14, "steps mismatch: the metadata says 13 steps, the 'steps' tensor holds 14")):
        edited = body[:at] + steps.to_bytes(8, "little", signed=True) + body[at + 8:]
        _refused(model, _join(json.loads(json.dumps(header)), edited), message)


@pytest.mark.parametrize("text", ["12", "-3", "1e3", "+13", " 13", "13.0", "", "0x0d", "1_3", "9" * 23])
def test_metadata_steps_must_be_the_same_plain_integer(text):
    model, blob, _ = _blob()
    header, body = _split(blob)
    header["__metadata__"]["steps"] = text
    message = _refused(model, _join(header, body), "snapshot (metadata 'steps'|steps mismatch)")
    assert "steps" in message


def test_every_truncation_and_any_trailing_bytes_are_refused():
    model, blob, _ = _blob()
    for cut in range(len(blob)):
        _refused(model, blob[:cut], "corrupt|too short|header length")
    _refused(model, blob + b"\x00", "corrupt: 1 bytes after the last tensor")
    header, body = _split(blob)
    _refused(model, _join(header, body + b"junk", resign=False), "corrupt: 4 bytes after the last tensor")


def test_malformed_headers_are_refused():
    model, blob, _ = _blob()
    header, body = _split(blob)
    for edit, message in [
        (lambda h: h["ssm"].update(data_offsets=[0, 10 ** 12]), "bad header entry for tensor 'ssm'"),
        (lambda h: h["ssm"].update(shape=[-1, 2]), "bad header entry for tensor 'ssm'"),
        (lambda h: h["ssm"].update(shape=[True]), "bad header entry for tensor 'ssm'"),
        (lambda h: h["ssm"].update(dtype="F128"), "tensor 'ssm' has unknown dtype 'F128'"),
        (lambda h: h["ssm"].update(data_offsets=h["conv"]["data_offsets"]), "overlapping tensors or a gap"),
        (lambda h: h.update(ssm="not a dict"), "bad header entry for tensor 'ssm'"),
        (lambda h: h["__metadata__"].update(steps=13), "metadata values must be strings"),
        (lambda h: h.update(renamed=h.pop("concept_mean")), "missing tensor 'concept_mean'"),
        (lambda h: h.update(bonus={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}), "unexpected tensors"),
    ]:
        edited = json.loads(json.dumps(header))
        edit(edited)
        # structural faults are found before the checksum is looked at; the others need a valid one
        resign = "tensor" in message and ("missing" in message or "unexpected" in message)
        _refused(model, _join(edited, body, resign=resign), message)


def test_hostile_header_json_is_refused():
    model = make_model(1)
    for text, message in [(b"[" * 100_000 + b"]" * 100_000, "not JSON"), (b"[1, 2]", "not a JSON object"),
                          (b'{"__metadata__": {"format": "a"}, "__metadata__": {}}', "names '__metadata__' twice")]:
        _refused(model, len(text).to_bytes(8, "little") + text, message)


def _v1_blob(state: StreamState, model_name: str, fingerprint: str, last_output=None) -> bytes:
    """A snapshot as the previous release wrote it: format version 1, no checksum."""
    tensors = {name: t.contiguous() for name, t in state.tensors().items()}
    if last_output is not None:
        tensors[LAST_OUTPUT] = last_output.float().reshape(-1).contiguous()
    metadata = {"format": "infomamba-state", "format_version": "1", "model_name": model_name,
                "model_fingerprint": fingerprint, "steps": str(int(state.steps[0])),
                "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()})}
    return st_save(tensors, metadata=metadata)


def test_version_1_snapshots_without_a_checksum_still_load_exactly():
    # sessions spilled by the previous release, and snapshots clients kept, survive the upgrade
    model, _, state = _blob()
    with torch.no_grad():
        out, _ = model(make_inputs(model, 1, 13))
    restored, last = read_snapshot(_v1_blob(state, "m", model.fingerprint(), out.head[-1]), model.config,
                                   model.fingerprint())
    for name, tensor in state.tensors().items():
        assert torch.equal(getattr(restored, name), tensor), name
    assert torch.equal(last, out.head[-1])
    # and saving it again writes version 2 with a checksum
    again = _split(save_snapshot(restored, "m", model.fingerprint(), last))[0]["__metadata__"]
    assert again["format_version"] == "2" and "checksum" in again


def test_version_1_snapshots_get_every_content_check():
    model, _, state = _blob()
    for edit, message in [(lambda s: s.ssm.view(-1).__setitem__(0, 1e38), "'ssm' holds a value of magnitude"),
                          (lambda s: s.steps.fill_(2 ** 63 - 1), "beyond the limit of 2\\*\\*53"),
                          (lambda s: s.concept_mass.view(-1).__setitem__(0, -1.0), "negative mass")]:
        bad = state.clone()
        edit(bad)
        _refused(model, _v1_blob(bad, "m", model.fingerprint()), message)
    header, body = _split(_v1_blob(state, "m", model.fingerprint()))
    header["ssm"]["dtype"] = "I32"
    _refused(model, _join(header, body, resign=False), "tensor 'ssm' has dtype I32, expected F32")
    header["__metadata__"]["format_version"] = "3"
    _refused(model, _join(header, body, resign=False), "format version '3' is not supported .*reads versions 1, 2")


def test_extra_metadata_is_kept_and_covered_by_the_checksum_and_cannot_replace_the_format_s():
    model, _, state = _blob()
    blob = save_snapshot(state, model.config.name, model.fingerprint(), extra_metadata={"server_note": "[[1, 5]]"})
    header, body = _split(blob)
    assert header["__metadata__"]["server_note"] == "[[1, 5]]"
    read_snapshot(blob, model.config, model.fingerprint())
    header["__metadata__"]["server_note"] = "[[1, 6]]"
    _refused(model, _join(header, body, resign=False), "checksum mismatch")
    for clash in ({"steps": "99"}, {"checksum": "x"}, {"note": 5}):
        with pytest.raises(ValueError, match="extra metadata"):
            save_snapshot(state, model.config.name, model.fingerprint(), extra_metadata=clash)


# --- Hybrid models: the key/value rings of attention layers are state like any other --------------------------

def _hybrid_blob(seed: int = 1, length: int = 13, edit=None, **overrides):
    model = make_hybrid(seed, **overrides)
    with torch.no_grad():
        out, state = model(make_inputs(model, 1, length))
    if edit is not None:
        edit(state)
    return model, save_snapshot(state, model.config.name, model.fingerprint(), last_output=out.head[-1]), state


def test_a_non_hybrid_state_holds_exactly_what_it_held_before_hybrids():
    state = make_model(0).empty_state(2)
    assert list(state.tensors()) == ["conv", "ssm", "concept_mean", "concept_mass", "steps"] and not state.rings


def test_a_hybrid_state_is_fixed_size_and_counts_its_rings():
    model = make_hybrid(0)  # rings: W = 5 with 2 key/value heads of 6, W = 3 with 2 of 12
    state = model.empty_state(1)
    assert state.conv.shape[0] == 1  # one recurrent layer: the recurrent tensors skip the other three
    assert {n: tuple(t.shape) for n, t in state.rings.items()} == {
        "attention.1.key": (1, 2, 5, 6), "attention.1.value": (1, 2, 5, 6),
        "attention.3.key": (1, 2, 3, 12), "attention.3.value": (1, 2, 3, 12)}
    ring_bytes = 2 * (2 * 5 * 6 + 2 * 3 * 12) * 4
    assert state_nbytes_per_stream(model.config) == state_nbytes_per_stream(make_model(0, n_layers=1).config) + ring_bytes
    assert state_nbytes_per_stream(model.config, torch.bfloat16) < state_nbytes_per_stream(model.config)
    with torch.no_grad():
        sizes = {model(make_inputs(model, 1, n))[1].nbytes() for n in (1, 7, 40)}
    assert sizes == {state_nbytes_per_stream(model.config)}


def test_a_hybrid_snapshot_says_what_it_holds_and_resumes_like_never_stopping():
    model = make_hybrid(2)
    inputs = make_inputs(model, 1, 19)  # past both windows: the rings wrapped
    with torch.no_grad():
        whole, _ = model(inputs)
        _, state = model(inputs[:, :11])
        blob = save_snapshot(state, model.config.name, model.fingerprint())
        restored = load_snapshot(blob, model.config, model.fingerprint())
        for name, tensor in state.tensors().items():
            assert torch.equal(restored.tensors()[name], tensor), name
        rest, _ = model(inputs[:, 11:], restored)
    torch.testing.assert_close(rest.head, whole.head[11:], atol=2e-5, rtol=1e-4)
    holds = json.loads(_split(blob)[0]["__metadata__"]["holds"])
    assert holds == {"recurrent_layers": 1, "attention_layers": {
        "1": {"attention_window": 5, "n_kv_heads": 2, "d_head": 6},
        "3": {"attention_window": 3, "n_kv_heads": 2, "d_head": 12}}}


def test_a_hybrid_snapshot_is_refused_by_a_non_hybrid_model_naming_the_rings():
    hybrid, blob, _ = _hybrid_blob()
    plain = make_model(1)
    message = _refused(plain, blob, "hybrid model")
    assert "attention layers 1, 3" in message and "has no attention layers" in message
    # and the other way round: a plain snapshot into the hybrid
    _, plain_blob, _ = _blob()
    message = _refused(hybrid, plain_blob, "snapshot holds 2 recurrent layers; this model")
    assert "attention layer 1 (window 5" in message


def test_a_snapshot_of_another_window_is_refused_naming_both():
    _, blob, _ = _hybrid_blob(layers=({"type": "infomamba"}, attention(2, 8)))
    model = make_hybrid(1, layers=({"type": "infomamba"}, attention(2, 4)))
    message = _refused(model, blob, "snapshot holds 1 recurrent layers, attention layer 1 \\(window 8")
    assert "keeps 1 recurrent layers, attention layer 1 (window 4" in message


@pytest.mark.parametrize("value, message", [(float("nan"), "holds NaN or infinity"),
                                            (3e6, "holds a value of magnitude 3e\\+06, beyond the bound 1e\\+06")])
def test_poisoned_rings_are_refused(value, message):
    model, blob, _ = _hybrid_blob(edit=lambda s: s.rings["attention.3.value"].view(-1).__setitem__(4, value))
    _refused(model, blob, f"tensor 'attention.3.value' {message}")


def test_a_relabelled_or_missing_ring_is_refused():
    model, blob, state = _hybrid_blob()
    header, body = _split(blob)
    header["attention.1.key"]["dtype"] = "I32"
    _refused(model, _join(header, body), "tensor 'attention.1.key' has dtype I32")
    header, body = _split(blob)
    header["attention.9.key"] = header.pop("attention.1.key")
    _refused(model, _join(header, body), "missing tensor 'attention.1.key'")


def test_hybrid_rings_move_between_replicas_in_different_dtypes():
    model = make_hybrid(3)
    with torch.no_grad():
        _, state = model.to(torch.bfloat16)(make_inputs(model, 1, 9))
    assert state.rings["attention.1.key"].dtype == torch.bfloat16
    blob = save_snapshot(state, model.config.name, model.fingerprint())
    moved = load_snapshot(blob, model.config, model.fingerprint(), dtype=torch.float32)
    assert moved.rings["attention.1.key"].dtype == torch.float32
    assert torch.equal(moved.rings["attention.1.key"], state.rings["attention.1.key"].float())


def test_pool_reset_and_copy_carry_the_rings():
    from server.engine.state_pool import StatePool

    model = make_hybrid(4)
    pool = StatePool(model, 3)
    slot = pool.allocate()
    pool.zero_allocated()  # as the runner does before each step
    with torch.no_grad():
        model(make_inputs(model, 1, 6), pool.state, state_indices=torch.tensor([slot]))
    written = {name: ring[slot].clone() for name, ring in pool.state.rings.items()}
    assert all(ring.abs().sum() > 0 for ring in written.values())
    other = pool.allocate()
    pool.copy(slot, other)  # a fork
    for name, ring in pool.state.rings.items():
        assert torch.equal(ring[other], written[name]) and torch.equal(ring[slot], written[name]), name
    pool.free(slot)
    assert pool.allocate() == slot
    fresh = pool.read(slot)  # the reused slot shows no keys of the stream that had it
    assert all(ring.abs().sum() == 0 for ring in fresh.rings.values())
    assert torch.equal(pool.read(other).rings["attention.3.value"][0], written["attention.3.value"])


def test_layer_views_are_kept_under_inference_and_follow_replaced_tensors():
    """The pool's per-layer views are made once under inference mode (the server's steps), made again when a pool
    tensor is replaced, and made afresh with autograd on."""
    state = make_model(n_layers=2).empty_state(3)
    with torch.inference_mode():
        first = state.layer(1)
        assert state.layer(1) is first
        assert first.ssm.data_ptr() == state.ssm[1].data_ptr()
        state.ssm = torch.ones_like(state.ssm)
        again = state.layer(1)
        assert again is not first and torch.equal(again.ssm, state.ssm[1])
    assert state.layer(1) is not state.layer(1)
