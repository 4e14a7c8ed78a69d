"""A model directory on disk: config.json + model.safetensors (+ tokenizer.json). Loading never unpickles."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class WeightsError(ValueError):
    """A model directory that can't be loaded; the message names the file or tensor at fault."""


def make_readable(path: Path) -> None:
    """A model is read by whoever serves it (a container's uid 1000, another user), whatever the umask it was
    written under: files 0644, directories 0755."""
    os.chmod(path, 0o755 if path.is_dir() else 0o644)


def save_model(model: InfoMamba, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})
    for path in (*created, directory / CONFIG_FILE, directory / WEIGHTS_FILE):
        make_readable(path)
    return directory


def load_config(directory: str | Path) -> InfoMambaConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: missing (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return InfoMambaConfig.load(path)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: {exc}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> InfoMamba:
    """Build the model from config.json and fill it from model.safetensors, checking every tensor."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a model directory")
    config = load_config(directory)
    with torch.device("meta"):
        skeleton = InfoMamba(config)
    expected = skeleton.state_dict()
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    check_tensors(tensors, expected)
    model = InfoMamba(config)
    model.load_state_dict(tensors, strict=True)
    model.fingerprint()  # of the weights as stored, before any cast: every dtype of this model shares it
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_len <= 1 or 8 + header_len > size:
        raise WeightsError(f"{path}: not a safetensors file (bad header length; truncated or another format?)")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        return tensors
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: unreadable safetensors file ({exc}); truncated or corrupt?") from None


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise WeightsError naming every missing, extra, mis-shaped or wrongly typed tensor."""
    problems = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name in sorted(set(expected) & set(found)):
        got, want = found[name], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not got.dtype.is_floating_point:
            problems.append(f"{name}: dtype {got.dtype}, expected a floating-point dtype")
    if problems:
        raise WeightsError("weights do not match the config: " + "; ".join(problems))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: {exc}") from None
