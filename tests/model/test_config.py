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
