"""Convert a Hugging Face `MambaForCausalLM` directory into an InfoMamba model directory with k = 0.

With no concepts an InfoMamba layer is exactly a Mamba block, so conversion is a renaming (DESIGN.md §1).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba
from model.weights import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WeightsError, check_tensors, make_readable,
                           read_json, read_safetensors, save_model)

# Hugging Face name pattern -> ours.
NAME_MAP = (
    (re.compile(r"^backbone\.embeddings\.weight$"), "embedding.weight"),
    (re.compile(r"^backbone\.layers\.(\d+)\.norm\.weight$"), r"layers.\1.norm.weight"),
    (re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$"), r"layers.\1.mixer.\2"),
    (re.compile(r"^backbone\.norm_f\.weight$"), "norm_f.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
)


ACCEPTS = ("a Hugging Face MambaForCausalLM directory: config.json (model_type \"mamba\", hidden_size, "
           "num_hidden_layers, vocab_size) and model.safetensors")
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")


def config_from_hf(hf: dict, name: str) -> InfoMambaConfig:
    if hf.get("model_type") not in (None, "mamba"):
        raise WeightsError(f"{CONFIG_FILE}: model_type {hf.get('model_type')!r} is not a Mamba-1 checkpoint; "
                           f"expected {ACCEPTS}")
    missing = [key for key in REQUIRED_KEYS if key not in hf]
    if missing:
        raise WeightsError(f"{CONFIG_FILE}: no {', '.join(missing)}; expected {ACCEPTS}")
    d_model = hf["hidden_size"]
    expand = hf.get("expand", 2)
    if hf.get("intermediate_size", expand * d_model) != expand * d_model:
        raise WeightsError(f"{CONFIG_FILE}: intermediate_size {hf['intermediate_size']} is not expand * hidden_size")
    if hf.get("hidden_act", "silu") != "silu":
        raise WeightsError(f"{CONFIG_FILE}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    rank = hf.get("time_step_rank", "auto")
    return InfoMambaConfig(
        d_model=d_model, n_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], head="lm",
        d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), expand=expand,
        dt_rank=0 if rank == "auto" else rank, n_concepts=0, d_concept=0, concept_decay="none",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False)), name=name,
    )


def rename(hf_name: str) -> str | None:
    for pattern, ours in NAME_MAP:
        if pattern.match(hf_name):
            return pattern.sub(ours, hf_name)
    return None


def convert_mamba(src: str | Path, dst: str | Path, name: str | None = None, progress: bool = True) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise WeightsError(f"{src}: not a directory; expected {ACCEPTS}")
    if not (src / CONFIG_FILE).is_file():
        raise WeightsError(f"{src}: no {CONFIG_FILE}; expected {ACCEPTS}")
    hf = read_json(src / CONFIG_FILE)
    if not isinstance(hf, dict):
        raise WeightsError(f"{src / CONFIG_FILE}: not a JSON object; expected {ACCEPTS}")
    config = config_from_hf(hf, name or src.name)
    if not (src / WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
                       or p.name.endswith(".index.json"))
        raise WeightsError(f"{src}: no {WEIGHTS_FILE} (found: {', '.join(found) or 'no weight files'}); only a "
                           f"single-file safetensors checkpoint is read (pickled .bin/.pt files never are)")
    hf_tensors = read_safetensors(src / WEIGHTS_FILE)
    if config.tie_embeddings:
        hf_tensors.pop("lm_head.weight", None)  # some exports write the tied head out as well
    tensors = {}
    for hf_name in tqdm(sorted(hf_tensors), desc=f"converting {src.name}", unit="tensor", disable=not progress):
        ours = rename(hf_name)
        if ours is None:
            raise WeightsError(f"{src / WEIGHTS_FILE}: unexpected tensor {hf_name!r} for MambaForCausalLM")
        tensors[ours] = hf_tensors[hf_name].float()
    with torch.device("meta"):
        expected = InfoMamba(config).state_dict()
    check_tensors(tensors, expected)
    model = InfoMamba(config)
    model.load_state_dict(tensors, strict=True)
    save_model(model, dst, metadata={"converted_from": "MambaForCausalLM"})
    if (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
        make_readable(dst / TOKENIZER_FILE)
    return dst
