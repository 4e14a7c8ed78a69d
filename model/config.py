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


@dataclass(slots=True)
class InfoMambaConfig:
    d_model: int = 256
    n_layers: int = 4
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
    name: str = "infomamba"
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise ValueError(f"architecture: expected {ARCHITECTURE!r}, got {self.architecture!r}")
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


def _require_int(config: InfoMambaConfig, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")


def _require_positive_int(config: InfoMambaConfig, field: str) -> None:
    _require_int(config, field, minimum=1)
