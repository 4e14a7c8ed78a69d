import json

import pytest

from model.config import InfoMambaConfig


def test_round_trips_through_config_json(tmp_path):
    config = InfoMambaConfig(d_model=48, n_layers=3, n_concepts=5, head="lm", tie_embeddings=False, name="x")
    config.save(tmp_path / "config.json")
    assert InfoMambaConfig.load(tmp_path / "config.json") == config


def test_defaults_are_resolved():
    config = InfoMambaConfig(d_model=100, n_concepts=4)
    assert config.dt_rank == 7  # ceil(100 / 16)
    assert config.d_concept == 25
    assert config.d_inner == 200


@pytest.mark.parametrize("fields, named", [
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(d_state=2.5), "d_state"),
    (dict(n_concepts=-3), "n_concepts"),
    (dict(d_conv=1), "d_conv"),
    (dict(head="regress"), "head"),
    (dict(vocab_size=None), "vocab_size/d_input"),
    (dict(vocab_size=None, d_input=8, head="lm"), "head"),
    (dict(vocab_size=None, d_input=8, head="per_step"), "d_output"),
    (dict(head="classify"), "n_classes"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(ssm_variant="mamba3"), "ssm_variant"),
    (dict(concept_decay="exponential"), "concept_decay"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(architecture="Llama"), "architecture"),
])
def test_invalid_fields_name_the_field(fields, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        InfoMambaConfig(**fields)


def test_unknown_field_in_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_heads": 4}))
    with pytest.raises(ValueError, match="n_heads"):
        InfoMambaConfig.load(tmp_path / "config.json")


def test_concept_decay_defaults_to_none_so_older_config_json_loads(tmp_path):
    data = InfoMambaConfig(n_concepts=4).to_dict()
    del data["concept_decay"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = InfoMambaConfig.load(tmp_path / "config.json")
    assert config.concept_decay == "none" and not config.has_concept_decay
    assert InfoMambaConfig(n_concepts=4, concept_decay="learned").has_concept_decay
    assert not InfoMambaConfig(n_concepts=0, concept_decay="learned").has_concept_decay  # nothing to decay


MIXED_LAYERS = [{"type": "infomamba"}, {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "attention_window": 64},
                {"type": "mlp", "d_mlp": 96}, {"type": "attention", "n_heads": 2, "attention_window": 8, "rope": True}]


def test_a_hybrid_layer_list_round_trips_and_sets_n_layers(tmp_path):
    config = InfoMambaConfig(d_model=48, layers=MIXED_LAYERS)
    assert config.n_layers == 4 and config.num_recurrent_layers == 1 and config.is_hybrid
    assert config.layer_types == ("infomamba", "attention", "mlp", "attention")
    assert config.layers[3].n_kv_heads == 2 and config.layers[1].rope is False  # defaults resolved
    assert config.kv_ring_shape(config.layers[1]) == (2, 64, 12)
    config.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["layers"][1]["type"] == "attention"
    assert InfoMambaConfig.load(tmp_path / "config.json") == config


def test_a_config_without_a_layer_list_is_all_infomamba_as_before(tmp_path):
    data = InfoMambaConfig(n_layers=3).to_dict()
    del data["layers"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = InfoMambaConfig.load(tmp_path / "config.json")
    assert config.layers is None and config.n_layers == 3 and not config.is_hybrid
    assert config.layer_types == ("infomamba",) * 3 and config.num_recurrent_layers == 3
    assert InfoMambaConfig().n_layers == 4  # the default stays


def _attention(**fields):
    return {"type": "attention", "n_heads": 4, "attention_window": 16, **fields}


@pytest.mark.parametrize("layers, named", [
    ([_attention(n_heads=5)], r"layers\[0\]\.n_heads: d_model 48 is not divisible by 5 heads"),
    ([_attention(n_heads=0)], r"layers\[0\]\.n_heads: expected an integer >= 1"),
    ([{"type": "infomamba"}, _attention(attention_window=0)], r"layers\[1\]\.attention_window: expected an integer >= 1"),
    ([_attention(attention_window=2.5)], r"layers\[0\]\.attention_window"),
    ([_attention(n_kv_heads=3)], r"layers\[0\]\.n_kv_heads: 3 does not divide n_heads 4"),
    ([_attention(n_heads=16, rope=True)], r"layers\[0\]\.rope: .*head width 3 is odd"),
    ([_attention(rope="yes")], r"layers\[0\]\.rope: expected a bool"),
    ([_attention(rope_theta=0.5)], r"layers\[0\]\.rope_theta"),
    ([{"type": "attention", "n_heads": 4}], r"layers\[0\]\.attention_window: required for attention layers"),
    ([_attention(window=8)], r"layers\[0\]\.window: not a field of attention layers"),
    ([{"type": "mlp"}], r"layers\[0\]\.d_mlp: required"),
    ([{"type": "mlp", "d_mlp": -1}], r"layers\[0\]\.d_mlp"),
    ([{"type": "transformer"}], r"layers\[0\]\.type: expected one of"),
    ([["attention"]], r"layers\[0\]: expected an object"),
    ([], r"layers: expected a non-empty list"),
    ("attention", r"layers: expected a non-empty list"),
])
def test_invalid_layer_lists_name_the_layer_and_field(layers, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        InfoMambaConfig(d_model=48, layers=layers)


def test_n_layers_must_agree_with_the_layer_list():
    with pytest.raises(ValueError, match="^n_layers: 3, but layers lists 4"):
        InfoMambaConfig(d_model=48, n_layers=3, layers=MIXED_LAYERS)
    assert InfoMambaConfig(d_model=48, n_layers=4, layers=MIXED_LAYERS).n_layers == 4
