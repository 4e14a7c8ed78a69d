"""Tiny models and inputs for model tests."""
from __future__ import annotations

import contextlib
import math

import torch

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba


def make_model(seed: int = 0, **overrides) -> InfoMamba:
    fields = dict(d_model=24, n_layers=2, vocab_size=50, d_state=4, d_conv=3, n_concepts=3, d_concept=6)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = InfoMamba(InfoMambaConfig(**fields)).eval()
    _perturb(model, seed)
    return model


def _perturb(model: InfoMamba, seed: int) -> None:
    # Fresh-init gates sit near sigmoid(-2) and the mix is the identity; jitter every weight so that each
    # term of the layer matters in the comparisons.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.invalidate_fingerprint()


# Concept decays far from 1 and near it (horizons of 2, 10^5 and 10 steps), cycled over the concepts.
GAMMAS = (0.5, 1 - 1e-5, 0.9)


def set_decays(model: InfoMamba, gammas=GAMMAS) -> InfoMamba:
    """Set every layer's γ = sigmoid(θ) to `gammas` cycled over its concepts (the model needs concept_decay
    "learned"); the random init's horizons (10^2..10^5) barely decay within a short test sequence."""
    with torch.no_grad():
        for layer in model.layers:
            theta = layer.concept.decay_logit
            theta.copy_(torch.tensor([math.log(g / (1 - g)) for g in _cycle(gammas, theta.numel())]))
    model.invalidate_fingerprint()
    return model


def _cycle(values, n):
    return [values[i % len(values)] for i in range(n)]


def make_inputs(model: InfoMamba, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cfg.vocab_size is not None:
        return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    return torch.randn(batch, length, cfg.d_input, generator=gen)


@contextlib.contextmanager
def one_thread():
    """Run a long loop of tiny tensor ops on one thread: they gain nothing from intra-op threads, whose barriers
    cost several times the work itself on a shared CPU (measured: 0.8 s alone vs 7 s on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attention(n_heads: int, window: int, **fields) -> dict:
    return {"type": "attention", "n_heads": n_heads, "attention_window": window, **fields}


# Hybrid layer lists at d_model 24. MIXED: a recurrent layer first (MambaFormer), grouped-query attention with
# rotary positions over 5 steps, an MLP, multi-head attention over 3; ATTENTION_ONLY: no recurrent layer at all,
# and a window of 1 (each step sees only itself); LONG_WINDOW: a window longer than any test stream.
MIXED = ({"type": "infomamba"}, attention(4, 5, n_kv_heads=2, rope=True), {"type": "mlp", "d_mlp": 40},
         attention(2, 3))
ATTENTION_ONLY = (attention(3, 4, rope=True, rope_theta=100.0), {"type": "mlp", "d_mlp": 16}, attention(6, 1, n_kv_heads=3))
LONG_WINDOW = ({"type": "infomamba"}, attention(2, 64), {"type": "infomamba"})


def make_hybrid(seed: int = 0, layers=MIXED, **overrides) -> InfoMamba:
    """make_model with a layer list (n_layers follows it)."""
    return make_model(seed, layers=layers, n_layers=0, **overrides)
