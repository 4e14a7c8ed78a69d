"""Converted Mamba checkpoints reproduce transformers' MambaForCausalLM logits."""
import pytest
import torch

from clients.cli import main as cli_main
from model.weights import load_model

transformers = pytest.importorskip("transformers")

SHAPES = {
    "default": dict(hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2),
    "odd-d-model": dict(hidden_size=27, num_hidden_layers=2, state_size=5, conv_kernel=4, expand=2),
    "dt-rank": dict(hidden_size=32, num_hidden_layers=2, state_size=4, conv_kernel=4, time_step_rank=3),
    "untied-head": dict(hidden_size=24, num_hidden_layers=3, state_size=4, tie_word_embeddings=False),
    "conv-2-bias": dict(hidden_size=16, num_hidden_layers=1, state_size=4, conv_kernel=2, use_bias=True),
    "conv-5": dict(hidden_size=20, num_hidden_layers=2, state_size=6, conv_kernel=5, expand=3),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_converted_logits_match_transformers(shape, tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.MambaConfig(vocab_size=67, **SHAPES[shape])
    hf = transformers.MambaForCausalLM(hf_config).eval()
    with torch.no_grad():  # random A_log/D/norms so every parameter is exercised
        for name, p in hf.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", "conv1d.bias", "dt_proj.bias")):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--quiet"]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    ours = load_model(tmp_path / "ours")
    assert ours.config.n_concepts == 0 and ours.config.concept_decay == "none"
    assert ours.config.tie_embeddings == hf_config.tie_word_embeddings
    ids = torch.randint(0, 67, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
    assert (got.head.view(2, 19, -1) - expected).abs().max() <= 1e-4


def test_converting_a_non_mamba_directory_fails_clearly(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "no config.json" in capsys.readouterr().err


def _hf_dir(path, **config):
    """A small saved MambaForCausalLM."""
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                                                state_size=4, **config))
    hf.save_pretrained(path)
    return path


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "llama", "hidden_size": 8}, "model_type 'llama' is not a Mamba-1 checkpoint"),
    ({"architectures": ["BertModel"]}, "config.json: no hidden_size, num_hidden_layers, vocab_size"),
    ({"model_type": "mamba", "hidden_size": 8, "vocab_size": 3}, "config.json: no num_hidden_layers"),
    ([1, 2], "not a JSON object"),
])
def test_converting_a_non_mamba_config_names_what_is_missing(tmp_path, capsys, config, needle):
    import json

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infomamba convert: ") and needle in err and "MambaForCausalLM" in err
    assert "Traceback" not in err and not (tmp_path / "dst").exists()


def test_converting_without_safetensors_says_what_it_found(tmp_path, capsys):
    src = _hf_dir(tmp_path / "hf")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert cli_main(["convert", str(src), str(tmp_path / "dst"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no model.safetensors (found: pytorch_model.bin)" in err and "safetensors" in err
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_converted_files_are_readable_by_others_whatever_the_umask(tmp_path):
    """The server in a container runs as uid 1000: it must read a model converted by another user."""
    import os
    import stat

    src = _hf_dir(tmp_path / "hf")
    (src / "tokenizer.json").write_text("{}")
    old = os.umask(0o077)
    try:
        assert cli_main(["convert", str(src), str(tmp_path / "models" / "m"), "--quiet"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "models", tmp_path / "models" / "m",
                                                               *(tmp_path / "models" / "m").iterdir())}
    assert modes == {"models": 0o755, "m": 0o755, "config.json": 0o644, "model.safetensors": 0o644,
                     "tokenizer.json": 0o644}
