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
