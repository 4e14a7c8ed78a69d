"""Loading a model directory: round trip, and a clear error for each kind of bad weights."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_hybrid, make_inputs, make_model
from model.weights import WeightsError, load_model, save_model


@pytest.fixture
def saved(tmp_path):
    model = make_model(0)
    save_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def rewrite(directory, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_round_trip_gives_the_same_outputs_and_fingerprint(saved):
    model, directory = saved
    loaded = load_model(directory)
    inputs = make_inputs(model, 2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(inputs)[0].head, model(inputs)[0].head)
    assert loaded.fingerprint() == model.fingerprint()


def test_missing_tensor(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.pop("layers.1.mixer.A_log"))
    with pytest.raises(WeightsError, match=r"missing tensors: layers\.1\.mixer\.A_log"):
        load_model(directory)


def test_extra_tensor(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.update({"layers.9.norm.weight": torch.ones(3)}))
    with pytest.raises(WeightsError, match=r"unexpected tensors: layers\.9\.norm\.weight"):
        load_model(directory)


def test_misshaped_tensor(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.update({"norm_f.weight": torch.ones(5)}))
    with pytest.raises(WeightsError, match=r"norm_f\.weight: shape \(5,\), expected \(24,\)"):
        load_model(directory)


def test_wrongly_typed_tensor(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.update({"norm_f.weight": torch.ones(24, dtype=torch.int32)}))
    with pytest.raises(WeightsError, match=r"norm_f\.weight: dtype torch\.int32"):
        load_model(directory)


def test_truncated_file(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_model(directory)


def test_not_a_safetensors_file(saved):
    _, directory = saved
    torch.save({"norm_f.weight": torch.ones(24)}, directory / "model.safetensors")  # a pickle
    with pytest.raises(WeightsError, match="not a safetensors file|unreadable"):
        load_model(directory)


def test_missing_weights_file(saved):
    _, directory = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors: missing"):
        load_model(directory)


def test_bad_config(saved):
    _, directory = saved
    data = json.loads((directory / "config.json").read_text())
    data["d_state"] = -1
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="d_state"):
        load_model(directory)


def test_learned_decay_adds_one_tensor_per_layer_and_round_trips(tmp_path):
    model = make_model(0, concept_decay="learned")
    save_model(model, tmp_path / "m")
    names = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert sorted(n for n in names if "decay" in n) == ["layers.0.concept.decay_logit", "layers.1.concept.decay_logit"]
    assert not any("decay" in n for n in make_model(0).state_dict())  # "none" stores nothing new
    loaded = load_model(tmp_path / "m")
    assert loaded.config.concept_decay == "learned"
    inputs = make_inputs(model, 2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(inputs)[0].head, model(inputs)[0].head)
    assert loaded.fingerprint() == model.fingerprint() != make_model(0).fingerprint()


def test_learned_decay_directory_without_its_tensors_names_them(tmp_path):
    save_model(make_model(0), tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["concept_decay"] = "learned"
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"missing tensors: layers\.0\.concept\.decay_logit, layers\.1\.concept"):
        load_model(tmp_path / "m")


def test_later_fields_at_their_first_value_keep_the_fingerprint_of_models_saved_before_them(saved):
    # Spilled sessions and snapshots of an existing model must still load after the upgrade: concept_decay "none"
    # and no layer list (not a hybrid) leave the fingerprint as it was.
    model, _ = saved
    before = hashlib.sha256(repr(sorted(
        (k, v) for k, v in model.config.to_dict().items() if k not in ("concept_decay", "layers"))).encode())
    for name, tensor in sorted(model.state_dict().items()):
        before.update(name.encode())
        before.update(tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    assert model.fingerprint() == before.hexdigest()


def test_a_hybrid_directory_round_trips_with_tensor_names_that_say_what_they_are(tmp_path):
    model = make_hybrid(0)  # infomamba, attention (GQA, rotary), mlp, attention
    save_model(model, tmp_path / "h")
    names = set(load_file(str(tmp_path / "h" / "model.safetensors")))
    assert {f"layers.1.attention.{p}_proj.weight" for p in "qkvo"} | {"layers.1.norm.weight"} <= names
    assert {f"layers.2.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= names
    assert not any(n.startswith(("layers.1.mixer", "layers.2.mixer", "layers.3.concept")) for n in names)
    loaded = load_model(tmp_path / "h")
    assert loaded.config == model.config and loaded.config.layer_types == ("infomamba", "attention", "mlp", "attention")
    inputs = make_inputs(model, 2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(inputs)[0].head, model(inputs)[0].head)
    assert loaded.fingerprint() == model.fingerprint() != make_model(0).fingerprint()


def test_a_hybrid_directory_with_missing_or_misshapen_attention_weights_names_them(tmp_path):
    save_model(make_hybrid(0), tmp_path / "h")
    rewrite(tmp_path / "h", lambda t: t.pop("layers.3.attention.v_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors: layers\.3\.attention\.v_proj\.weight"):
        load_model(tmp_path / "h")
    save_model(make_hybrid(0), tmp_path / "h")
    data = json.loads((tmp_path / "h" / "config.json").read_text())
    data["layers"][1]["n_kv_heads"] = 4  # the checkpoint has 2 key/value heads
    (tmp_path / "h" / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"layers\.1\.attention\.k_proj\.weight: shape \(12, 24\), expected \(24, 24\)"):
        load_model(tmp_path / "h")
    data["layers"][1].update(n_heads=5, n_kv_heads=1)
    (tmp_path / "h" / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"config\.json: layers\[1\]\.n_heads: d_model 24 is not divisible by 5"):
        load_model(tmp_path / "h")
