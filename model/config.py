"""The model's one config dataclass, validated on construction and round-tripped through config.json."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURE = "InfoMamba"
HEAD_TYPES = ("lm", "per_step", "classify")
SSM_VARIANTS = ("mamba1",)  # "mamba2" is planned (DESIGN.md §1)
# The concepts' memory γ (DESIGN.md §1): "none" is γ = 1, a running mean over the whole past (the first form, so
# model directories written before the field existed load unchanged); "learned" is γ = sigmoid(θ) per concept.
CONCEPT_DECAYS = ("none", "learned")
# Layer types (DESIGN.md §1 "Hybrid models"): "infomamba" is the recurrent layer (k = n_concepts; k = 0 is a plain
# Mamba block), "attention" a windowed causal self-attention whose keys and values live in the stream state,
# "mlp" a gated SiLU MLP with no state.
LAYER_TYPES = ("infomamba", "attention", "mlp")


@dataclass(slots=True)
class InfoMambaLayerConfig:
    """A recurrent layer; its sizes are the model's (d_state, d_conv, expand, n_concepts, ...)."""

    type: str = "infomamba"


@dataclass(slots=True)
class AttentionLayerConfig:
    """Pre-norm causal self-attention over the last `attention_window` positions, no positional encoding unless
    `rope`. Heads are d_model / n_heads wide; n_kv_heads < n_heads is grouped-query attention."""

    n_heads: int
    attention_window: int  # W: the keys and values of the last W positions stay in the stream state
    n_kv_heads: int = 0  # 0 means n_heads (multi-head attention)
    rope: bool = False  # rotary positions (half-split pairs), at the stream's absolute step count
    rope_theta: float = 10000.0
    type: str = "attention"

    def __post_init__(self) -> None:
        _require_int(self, "n_heads", minimum=1)
        _require_int(self, "attention_window", minimum=1)
        _require_int(self, "n_kv_heads", minimum=0)
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads} (each key/value "
                             f"head serves a whole group of query heads)")
        if not isinstance(self.rope, bool):
            raise ValueError(f"rope: expected a bool, got {self.rope!r}")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 1):
            raise ValueError(f"rope_theta: expected a number > 1, got {theta!r}")


@dataclass(slots=True)
class MlpLayerConfig:
    """Pre-norm gated SiLU MLP: down(SiLU(gate h) * up h), d_mlp wide inside."""

    d_mlp: int
    type: str = "mlp"

    def __post_init__(self) -> None:
        _require_int(self, "d_mlp", minimum=1)


LayerConfig = InfoMambaLayerConfig | AttentionLayerConfig | MlpLayerConfig
_LAYER_CLASSES = {"infomamba": InfoMambaLayerConfig, "attention": AttentionLayerConfig, "mlp": MlpLayerConfig}


@dataclass(slots=True)
class InfoMambaConfig:
    d_model: int = 256
    n_layers: int = 0  # 0 means len(layers), or 4 without a layer list
    # Exactly one input kind: token ids (vocab_size) or float vectors (d_input).
    vocab_size: int | None = 260
    d_input: int | None = None
    head: str = "lm"
    d_output: int | None = None  # per_step head width
    n_classes: int | None = None  # classify head width
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 means ceil(d_model / 16), Mamba's default
    n_concepts: int = 8  # k; 0 turns the concept bottleneck and IMF off (a plain Mamba block)
    d_concept: int = 0  # d_c; 0 means d_model // 4
    concept_decay: str = "none"  # one of CONCEPT_DECAYS; no effect when n_concepts = 0
    norm_eps: float = 1e-5
    concept_eps: float = 1e-6
    tie_embeddings: bool = True
    ssm_variant: str = "mamba1"
    conv_bias: bool = True
    proj_bias: bool = False  # bias on in_proj/out_proj (Mamba's use_bias)
    # Typed layers (a hybrid model); None means n_layers "infomamba" layers, as every model before hybrids.
    layers: tuple[LayerConfig, ...] | None = None
    name: str = "infomamba"
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise ValueError(f"architecture: expected {ARCHITECTURE!r}, got {self.architecture!r}")
        _require_int(self, "n_layers", minimum=0)
        if self.layers is not None:
            self.layers = _parse_layers(self.layers)
            if self.n_layers not in (0, len(self.layers)):
                raise ValueError(f"n_layers: {self.n_layers}, but layers lists {len(self.layers)}")
            self.n_layers = len(self.layers)
        elif self.n_layers == 0:
            self.n_layers = 4
        for field in ("d_model", "n_layers", "d_state", "expand"):
            _require_positive_int(self, field)
        _require_int(self, "d_conv", minimum=2)  # the carried window holds d_conv - 1 inputs
        for field in ("dt_rank", "n_concepts", "d_concept"):
            _require_int(self, field, minimum=0)
        if (self.vocab_size is None) == (self.d_input is None):
            raise ValueError("vocab_size/d_input: set exactly one (token ids or float feature vectors)")
        if self.vocab_size is not None:
            _require_positive_int(self, "vocab_size")
        if self.d_input is not None:
            _require_positive_int(self, "d_input")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head: expected one of {HEAD_TYPES}, got {self.head!r}")
        if self.head == "lm" and self.vocab_size is None:
            raise ValueError("head: 'lm' needs token inputs (vocab_size)")
        if self.head == "per_step":
            _require_positive_int(self, "d_output")
        if self.head == "classify":
            _require_positive_int(self, "n_classes")
        if self.ssm_variant not in SSM_VARIANTS:
            raise ValueError(f"ssm_variant: expected one of {SSM_VARIANTS}, got {self.ssm_variant!r}")
        if self.concept_decay not in CONCEPT_DECAYS:
            raise ValueError(f"concept_decay: expected one of {CONCEPT_DECAYS}, got {self.concept_decay!r}")
        for field in ("norm_eps", "concept_eps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
                raise ValueError(f"{field}: expected a float in (0, 1), got {value!r}")
        for field in ("tie_embeddings", "conv_bias", "proj_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}: expected a bool, got {getattr(self, field)!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name: expected a non-empty string")
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.n_concepts > 0 and self.d_concept == 0:
            self.d_concept = max(1, self.d_model // 4)
        for i, layer in enumerate(self.layers or ()):
            if isinstance(layer, AttentionLayerConfig):
                _check_attention_widths(self.d_model, layer, f"layers[{i}]")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def has_concepts(self) -> bool:
        return self.n_concepts > 0

    @property
    def has_concept_decay(self) -> bool:
        return self.has_concepts and self.concept_decay == "learned"

    @property
    def layer_configs(self) -> tuple[LayerConfig, ...]:
        return self.layers if self.layers is not None else (InfoMambaLayerConfig(),) * self.n_layers

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(layer.type for layer in self.layer_configs)

    @property
    def num_recurrent_layers(self) -> int:
        return self.layer_types.count("infomamba")

    def kv_ring_shape(self, layer: AttentionLayerConfig) -> tuple[int, int, int]:
        """(n_kv_heads, attention_window, d_head): one stream's key ring (and value ring) of an attention layer."""
        return layer.n_kv_heads, layer.attention_window, self.d_model // layer.n_heads

    @property
    def is_hybrid(self) -> bool:
        """Any layer other than the recurrent one: the stream state then holds more than conv/SSM/concepts."""
        return any(t != "infomamba" for t in self.layer_types)

    @property
    def is_tied(self) -> bool:
        return self.head == "lm" and self.tie_embeddings

    @property
    def d_head_output(self) -> int:
        return {"lm": self.vocab_size, "per_step": self.d_output, "classify": self.n_classes}[self.head]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InfoMambaConfig":
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown config field (known: {', '.join(sorted(known))})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "InfoMambaConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _parse_layers(layers) -> tuple[LayerConfig, ...]:
    """Layer configs from config.json objects (or already built ones); errors are prefixed with `layers[i].`."""
    if isinstance(layers, (str, bytes, dict)) or not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer objects, got {layers!r:.80}")
    parsed = []
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if isinstance(layer, tuple(_LAYER_CLASSES.values())):
            parsed.append(layer)
            continue
        if not isinstance(layer, dict):
            raise ValueError(f"{where}: expected an object with a 'type', got {layer!r:.80}")
        kind = layer.get("type")
        if kind not in _LAYER_CLASSES:
            raise ValueError(f"{where}.type: expected one of {LAYER_TYPES}, got {kind!r:.40}")
        cls = _LAYER_CLASSES[kind]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: not a field of {kind} layers (known: {', '.join(sorted(known))})")
        required = sorted(f.name for f in dataclasses.fields(cls)
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        missing = [name for name in required if name not in layer]
        if missing:
            raise ValueError(f"{where}.{missing[0]}: required for {kind} layers")
        try:
            parsed.append(cls(**layer))
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
    return tuple(parsed)


def _check_attention_widths(d_model: int, layer: AttentionLayerConfig, where: str) -> None:
    if d_model % layer.n_heads:
        raise ValueError(f"{where}.n_heads: d_model {d_model} is not divisible by {layer.n_heads} heads")
    if layer.rope and (d_model // layer.n_heads) % 2:
        raise ValueError(f"{where}.rope: rotary positions rotate pairs of features; the head width "
                         f"{d_model // layer.n_heads} is odd")


def _require_int(config, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")


def _require_positive_int(config, field: str) -> None:
    _require_int(config, field, minimum=1)
