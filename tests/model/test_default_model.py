"""The bundled default model loads, and its training forward and serving path agree on it."""
from pathlib import Path

import torch

from model.train_forward import train_forward
from model.weights import load_model

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "model" / "default_model"


def test_default_model_loads_and_paths_agree():
    model = load_model(DEFAULT_MODEL).eval()
    assert model.config.name == "infomamba-pystdlib-byte" and model.dtype == torch.float32
    ids = torch.tensor([list(b"def __init__(self):\n        self.")])
    with torch.no_grad():
        out, _ = model(ids)
        fast = train_forward(model, ids).logits[0]
    torch.testing.assert_close(fast, out.head, atol=1e-4, rtol=1e-4)
    assert int(out.head[-1].argmax()) < 256  # a byte, not a special token, after "self."
