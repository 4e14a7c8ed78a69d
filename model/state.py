"""A stream's recurrent state: fixed-size per layer, pooled over slots, snapshotted to safetensors (DESIGN.md §2)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.config import InfoMambaConfig

SNAPSHOT_FORMAT = "infomamba-state"
SNAPSHOT_VERSION = "1"
STATE_FIELDS = ("conv", "ssm", "concept_mean", "concept_mass", "steps")
# Optional: the head output of the stream's last step (an LM's next-token logits), so a resumed stream can
# generate without being fed again. It is output, not state: nothing the model computes reads it.
LAST_OUTPUT = "last_output"


class SnapshotError(ValueError):
    """A snapshot that is corrupt, of another format version, or of another model."""


@dataclass
class StreamState:
    """Per-layer state for a batch (or pool) of streams; the batch axis is axis 1 (axis 0 for `steps`).

    conv:          (n_layers, batch, d_inner, d_conv - 1)  last inputs of the causal conv, model dtype
    ssm:           (n_layers, batch, d_inner, d_state)     fp32
    concept_mean:  (n_layers, batch, k, d_c)               fp32, S / (m + eps)
    concept_mass:  (n_layers, batch, k)                    fp64, m
    steps:         (batch,)                                int64, steps seen
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    concept_mean: torch.Tensor
    concept_mass: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def empty(cls, config: InfoMambaConfig, batch: int, device="cpu", dtype=torch.float32) -> "StreamState":
        L, E = config.n_layers, config.d_inner
        return cls(
            conv=torch.zeros(L, batch, E, config.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(L, batch, E, config.d_state, device=device, dtype=torch.float32),
            concept_mean=torch.zeros(L, batch, config.n_concepts, config.d_concept, device=device, dtype=torch.float32),
            concept_mass=torch.zeros(L, batch, config.n_concepts, device=device, dtype=torch.float64),
            steps=torch.zeros(batch, device=device, dtype=torch.int64),
        )

    @property
    def batch_size(self) -> int:
        return self.steps.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATE_FIELDS}

    def clone(self) -> "StreamState":
        return StreamState(**{k: v.clone() for k, v in self.tensors().items()})

    def select(self, indices) -> "StreamState":
        """A copy of the streams at `indices` (a list or 1-D tensor of slots)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.steps.device)
        return StreamState(**{k: (v[idx] if k == "steps" else v[:, idx]).clone() for k, v in self.tensors().items()})

    def assign(self, indices, other: "StreamState") -> None:
        """Write `other`'s streams into slots `indices`, in place."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.steps.device)
        for name, dst in self.tensors().items():
            src = getattr(other, name).to(device=dst.device, dtype=dst.dtype)
            if name == "steps":
                dst[idx] = src
            else:
                dst[:, idx] = src

    def reset(self, indices) -> None:
        """Zero the streams at `indices` (a fresh stream)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.steps.device)
        for name, tensor in self.tensors().items():
            if name == "steps":
                tensor[idx] = 0
            else:
                tensor[:, idx] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def layer(self, i: int) -> "LayerState":
        return LayerState(self.conv[i], self.ssm[i], self.concept_mean[i], self.concept_mass[i])


@dataclass
class LayerState:
    """One layer's views into a StreamState pool (batch axis first)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    concept_mean: torch.Tensor
    concept_mass: torch.Tensor


def state_nbytes_per_stream(config: InfoMambaConfig, dtype=torch.float32) -> int:
    return StreamState.empty(config, 1, device="meta", dtype=dtype).nbytes()


def save_snapshot(state: StreamState, model_name: str, fingerprint: str,
                  last_output: torch.Tensor | None = None) -> bytes:
    """Serialize a single stream (batch 1), and optionally its last step's head output (d_out,), as a
    self-describing safetensors blob."""
    if state.batch_size != 1:
        raise ValueError(f"snapshot: expected one stream, got a batch of {state.batch_size}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.tensors().items()}
    if last_output is not None:
        tensors[LAST_OUTPUT] = last_output.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "format_version": SNAPSHOT_VERSION,
        "model_name": model_name,
        "model_fingerprint": fingerprint,
        "steps": str(int(state.steps[0])),
        "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()}),
    }
    return st_save(tensors, metadata=metadata)


def load_snapshot(data: bytes, config: InfoMambaConfig, fingerprint: str, device="cpu", dtype=torch.float32) -> StreamState:
    """Parse and check a snapshot against the serving model; raises SnapshotError naming the problem."""
    return read_snapshot(data, config, fingerprint, device, dtype)[0]


def read_snapshot(data: bytes, config: InfoMambaConfig, fingerprint: str, device="cpu", dtype=torch.float32,
                  ) -> tuple[StreamState, torch.Tensor | None]:
    """load_snapshot, plus the stream's last head output (fp32, on the CPU) when the snapshot carries one."""
    metadata = _snapshot_metadata(data)
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"not an InfoMamba state snapshot (format {metadata.get('format')!r})")
    if metadata.get("format_version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot format version {metadata.get('format_version')!r} is not supported "
                            f"(this server reads version {SNAPSHOT_VERSION})")
    if metadata.get("model_fingerprint") != fingerprint:
        raise SnapshotError(f"snapshot belongs to another model ({metadata.get('model_name')!r}, fingerprint "
                            f"{str(metadata.get('model_fingerprint'))[:12]}), not {config.name!r} ({fingerprint[:12]})")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot is corrupt: {exc}") from None
    expected = StreamState.empty(config, 1, device="meta", dtype=dtype)
    for name, ref in expected.tensors().items():
        if name not in tensors:
            raise SnapshotError(f"snapshot is missing tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise SnapshotError(f"snapshot tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(tensors[name].float()).all():
            raise SnapshotError(f"snapshot tensor {name!r} holds NaN or infinity")
    extra = sorted(set(tensors) - set(STATE_FIELDS) - {LAST_OUTPUT})
    if extra:
        raise SnapshotError(f"snapshot has unexpected tensors {extra}")
    last_output = tensors.get(LAST_OUTPUT)
    if last_output is not None:
        if tuple(last_output.shape) != (config.d_head_output,):
            raise SnapshotError(f"snapshot tensor {LAST_OUTPUT!r} has shape {tuple(last_output.shape)}, "
                                f"expected ({config.d_head_output},)")
        if not torch.isfinite(last_output).all():
            raise SnapshotError(f"snapshot tensor {LAST_OUTPUT!r} holds NaN or infinity")
        last_output = last_output.float()
    state = StreamState(**{name: tensors[name].to(device=device, dtype=getattr(expected, name).dtype)
                           for name in STATE_FIELDS})
    return state, last_output


def _snapshot_metadata(data: bytes) -> dict:
    # safetensors layout: u64 little-endian header length, then a JSON header holding "__metadata__".
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise SnapshotError("snapshot is corrupt: too short to be a safetensors blob")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise SnapshotError("snapshot is corrupt: bad safetensors header length")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SnapshotError("snapshot is corrupt: header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise SnapshotError("snapshot is corrupt: no metadata (not an InfoMamba state snapshot)")
    return metadata
