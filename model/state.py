"""A stream's recurrent state: fixed-size per layer, pooled over slots, snapshotted to safetensors (DESIGN.md §2)."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kernels.packing import to_device_nowait
from model.config import InfoMambaConfig

SNAPSHOT_FORMAT = "infomamba-state"
SNAPSHOT_VERSION = "2"
STATE_FIELDS = ("conv", "ssm", "concept_mean", "concept_mass", "steps")
# Optional: the head output of the stream's last step (an LM's next-token logits), so a resumed stream can
# generate without being fed again. It is output, not state: nothing the model computes reads it.
LAST_OUTPUT = "last_output"


class SnapshotError(ValueError):
    """A snapshot that is corrupt, of another format version, or of another model."""


@dataclass
class StreamState:
    """Per-layer state for a batch (or pool) of streams. The recurrent tensors are stacked over the model's
    "infomamba" layers (all of them, in a model without attention) with the batch on axis 1; `steps` and each
    attention layer's rings have the batch on axis 0.

    conv:          (n_recurrent, batch, d_inner, d_conv - 1)  last inputs of the causal conv, model dtype
    ssm:           (n_recurrent, batch, d_inner, d_state)     fp32
    concept_mean:  (n_recurrent, batch, k, d_c)               fp32, S / (m + eps)
    concept_mass:  (n_recurrent, batch, k)                    fp64, m
    steps:         (batch,)                                   int64, steps seen
    rings:         "attention.{i}.key" / "attention.{i}.value" for model layer i: (batch, n_kv_heads, W, d_head) in
                   the model dtype, the keys/values of the last W positions; position t sits at t mod W
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    concept_mean: torch.Tensor
    concept_mass: torch.Tensor
    steps: torch.Tensor
    rings: dict[str, torch.Tensor] = field(default_factory=dict)
    # layer j -> its LayerState views, kept while the tensors above stay the same objects (inference only)
    _layer_views: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, config: InfoMambaConfig, batch: int, device="cpu", dtype=torch.float32) -> "StreamState":
        L, E = config.num_recurrent_layers, config.d_inner
        rings = {}
        for i, layer in enumerate(config.layer_configs):
            if layer.type == "attention":
                for name in ring_names(i):
                    rings[name] = torch.zeros(batch, *config.kv_ring_shape(layer), device=device, dtype=dtype)
        return cls(
            conv=torch.zeros(L, batch, E, config.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(L, batch, E, config.d_state, device=device, dtype=torch.float32),
            concept_mean=torch.zeros(L, batch, config.n_concepts, config.d_concept, device=device, dtype=torch.float32),
            concept_mass=torch.zeros(L, batch, config.n_concepts, device=device, dtype=torch.float64),
            steps=torch.zeros(batch, device=device, dtype=torch.int64),
            rings=rings,
        )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "StreamState":
        """The inverse of `tensors()`."""
        return cls(**{name: tensors[name] for name in STATE_FIELDS},
                   rings={name: t for name, t in tensors.items() if name not in STATE_FIELDS})

    @property
    def batch_size(self) -> int:
        return self.steps.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{name: getattr(self, name) for name in STATE_FIELDS}, **self.rings}

    def _map(self, fn) -> "StreamState":
        """A new state of fn(name, tensor, batch axis) for every tensor."""
        return StreamState.from_tensors({name: fn(name, t, _batch_axis(name)) for name, t in self.tensors().items()})

    def clone(self) -> "StreamState":
        return self._map(lambda name, t, axis: t.clone())

    def to(self, device) -> "StreamState":
        return self._map(lambda name, t, axis: t.to(device))

    def select(self, indices) -> "StreamState":
        """A copy of the streams at `indices` (a list or 1-D tensor of slots)."""
        idx = _indices(indices, self.steps.device)
        return self._map(lambda name, t, axis: t.index_select(axis, idx))

    def assign(self, indices, other: "StreamState") -> None:
        """Write `other`'s streams into slots `indices`, in place."""
        idx = _indices(indices, self.steps.device)
        theirs = other.tensors()
        for name, dst in self.tensors().items():
            src = theirs[name].to(device=dst.device, dtype=dst.dtype)
            dst.index_copy_(_batch_axis(name), idx, src)

    def reset(self, indices) -> None:
        """Zero the streams at `indices` (a fresh stream; a ring never shows another stream's keys)."""
        idx = _indices(indices, self.steps.device)
        for name, tensor in self.tensors().items():
            tensor.index_fill_(_batch_axis(name), idx, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def layer(self, j: int) -> "LayerState":
        """The views of recurrent layer j (the j-th "infomamba" layer of the model).

        Under inference mode (the server's every step) the views are made once per pool and layer: four index ops a
        layer are host time on every eager step. With autograd on they are made afresh (a view remembers the graph
        it was made in)."""
        if not torch.is_inference_mode_enabled():
            return LayerState(self.conv[j], self.ssm[j], self.concept_mean[j], self.concept_mass[j])
        view = self._layer_views.get(j)
        if (view is None or view.base[0] is not self.conv or view.base[1] is not self.ssm
                or view.base[2] is not self.concept_mean or view.base[3] is not self.concept_mass):
            view = self._layer_views[j] = LayerState(
                self.conv[j], self.ssm[j], self.concept_mean[j], self.concept_mass[j],
                base=(self.conv, self.ssm, self.concept_mean, self.concept_mass))
        return view

    def attention(self, i: int) -> "AttentionState":
        """The rings of model layer i, an attention layer."""
        key, value = ring_names(i)
        return AttentionState(self.rings[key], self.rings[value], self.steps)


@dataclass
class LayerState:
    """One recurrent layer's views into a StreamState pool (batch axis first)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    concept_mean: torch.Tensor
    concept_mass: torch.Tensor
    base: tuple = field(default=(), repr=False, compare=False)  # the pool tensors these views are of, when cached


@dataclass
class AttentionState:
    """One attention layer's rings in a StreamState pool, and the pool's step counts (the next position of each
    slot, which decides where its keys go)."""

    key: torch.Tensor  # (slots, n_kv_heads, W, d_head)
    value: torch.Tensor  # (slots, n_kv_heads, W, d_head)
    steps: torch.Tensor  # (slots,) int64


def ring_names(i: int) -> tuple[str, str]:
    return f"attention.{i}.key", f"attention.{i}.value"


_RING_NAME = re.compile(r"attention\.(\d+)\.(key|value)")


def _indices(indices, device: torch.device) -> torch.Tensor:
    """Slot indices as a long tensor on `device`, a list queued without waiting for the stream."""
    if isinstance(indices, torch.Tensor):
        return indices.to(device=device, dtype=torch.long)
    return to_device_nowait(indices, device)


def _batch_axis(name: str) -> int:
    return 0 if name == "steps" or _RING_NAME.fullmatch(name) else 1


def state_nbytes_per_stream(config: InfoMambaConfig, dtype=torch.float32) -> int:
    return StreamState.empty(config, 1, device="meta", dtype=dtype).nbytes()


# --- Snapshots ------------------------------------------------------------------------------------------------
#
# Format versions: "1" had no checksum; "2" adds `checksum` to the metadata. Version 1 is still read (a session
# spilled to --state-dir by the previous release, or a snapshot a client kept, survives the upgrade) without a
# checksum, and every content check below applies to it. That gives nothing away: the checksum is a plain
# SHA-256 that detects corruption (a flipped bit on disk or in transit), not a signature; whoever crafts a
# snapshot can recompute it. The content checks are what make a hostile snapshot harmless: exact dtypes and
# shapes, finite values within the bounds below, a step count that cannot wrap, consistent with the metadata.
SNAPSHOT_READABLE_VERSIONS = ("1", SNAPSHOT_VERSION)
CHECKSUM_ALGORITHM = "sha256"

# steps is reported to clients as a JSON number, exact in an IEEE double (JavaScript, most JSON parsers) only
# up to 2**53, and the concept masses, fp64, track it (per layer they sum to the steps seen). At a million
# steps a second a stream needs 285 years to get there, and an int64 counter that starts below 2**53 has
# 2**63 - 2**53 (about 9.2e18) steps of headroom before it could wrap.
MAX_STEPS = 2 ** 53

# Bound on |conv|, |ssm| and |concept_mean|. Real states are functions of RMS-normed activations, so their size
# is set by the weights, never by the inputs or the stream length: conv holds the last in_proj outputs, a
# concept mean is a convex combination of past concept values (|mean| <= max |v|), and the SSM state decays
# (|s| <= max |dt x B| / (1 - exp(-dt |A|)) ~ max |x B| / |A|). The bundled model stays under 10 on random,
# repeated and real text over thousands of steps (|A| >= 0.8 there). 1e6 leaves orders of magnitude for other
# weights and still keeps fp32 and bf16 finite downstream (squares in RMS norms overflow near 1e19): the
# bundled model with every state value at 1e6 gives finite outputs, with 1e38 in conv or ssm inf/NaN at once.
# No bound that admits real states protects an fp16 server (activations overflow at 65504; conv at 100
# throughout already does): there the engine's check of non-finite outputs is the backstop.
MAX_STATE_MAGNITUDE = 1e6
# Bound on |last_output|, the head output returned to clients and never fed back into the state. Logits stay
# in the tens; a per_step head may regress values in a caller's own units, so this bound is much wider, yet
# far enough from the fp32 maximum (3.4e38) that dividing by a small temperature stays finite.
MAX_OUTPUT_MAGNITUDE = 1e12

# The safetensors dtype names of the dtypes a snapshot holds. The state tensors have fixed dtypes (StreamState);
# conv is in the writer's model dtype, any of those the server runs in; a snapshot moves between them.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64"}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MODEL_DTYPES = ("F32", "BF16", "F16")
_SNAPSHOT_DTYPES = {"conv": _MODEL_DTYPES, "ssm": ("F32",), "concept_mean": ("F32",),
                    "concept_mass": ("F64",), "steps": ("I64",), LAST_OUTPUT: ("F32",)}


def _allowed_dtypes(name: str) -> tuple[str, ...]:
    return _MODEL_DTYPES if _RING_NAME.fullmatch(name) else _SNAPSHOT_DTYPES[name]


def state_holds(state: StreamState) -> dict:
    """What a state holds, as a snapshot's metadata says it: the number of recurrent layers, and per attention
    layer (by model layer index) its ring: window, key/value heads, head width."""
    rings = {}
    for name, t in state.rings.items():
        layer, kind = _RING_NAME.fullmatch(name).groups()
        if kind == "key":
            rings[layer] = {"attention_window": t.shape[2], "n_kv_heads": t.shape[1], "d_head": t.shape[3]}
    return {"recurrent_layers": state.conv.shape[0], "attention_layers": dict(sorted(rings.items(), key=_layer_key))}


def _layer_key(item) -> int:
    return int(item[0])


def _check_holds(metadata: dict, expected: dict, config: InfoMambaConfig) -> None:
    """A snapshot of another layer layout is refused naming the difference, before the fingerprint says only
    'another model'. Snapshots written before hybrids carry no `holds` and are left to the fingerprint."""
    text = metadata.get("holds")
    if text is None:
        return
    try:
        holds = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise SnapshotError("snapshot metadata 'holds' is not JSON") from None
    if holds == expected:
        return
    theirs = holds.get("attention_layers") if isinstance(holds, dict) else None
    if theirs and not expected["attention_layers"]:
        raise SnapshotError(f"snapshot holds the attention key/value rings of a hybrid model (attention layers "
                            f"{', '.join(map(str, theirs))}); this model ({config.name!r}) has no attention layers")
    raise SnapshotError(f"snapshot holds {_describe(holds)}; this model ({config.name!r}) keeps "
                        f"{_describe(expected)}")


def _describe(holds) -> str:
    """'2 recurrent layers, attention layer 1 (window 64, 4 key/value heads of width 32)' from a `holds` dict."""
    if not isinstance(holds, dict) or not isinstance(holds.get("attention_layers", {}), dict):
        return f"{str(holds)[:80]!r}"
    parts = [f"{holds.get('recurrent_layers')} recurrent layers"]
    for i, ring in holds.get("attention_layers", {}).items():
        ring = ring if isinstance(ring, dict) else {}
        parts.append(f"attention layer {i} (window {ring.get('attention_window')}, {ring.get('n_kv_heads')} key/value "
                     f"heads of width {ring.get('d_head')})")
    return ", ".join(parts)


def save_snapshot(state: StreamState, model_name: str, fingerprint: str,
                  last_output: torch.Tensor | None = None, extra_metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a single stream (batch 1), and optionally its last step's head output (d_out,), as a
    self-describing safetensors blob whose metadata carries a checksum over the metadata and every tensor.
    extra_metadata: more string entries (a server's own bookkeeping), covered by the checksum; they may not
    replace the format's own."""
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
        "holds": json.dumps(state_holds(state)),
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata or key == "checksum" or not isinstance(value, str):
            raise ValueError(f"snapshot: extra metadata {key!r} clashes with the format's or is not a string")
        metadata[key] = value
    entries = {name: (_ST_DTYPES[t.dtype], list(t.shape), t.reshape(-1).view(torch.uint8).numpy())
               for name, t in tensors.items()}
    metadata["checksum"] = _checksum(metadata, entries)
    return st_save(tensors, metadata=metadata)


def load_snapshot(data: bytes, config: InfoMambaConfig, fingerprint: str, device="cpu", dtype=torch.float32) -> StreamState:
    """Parse and check a snapshot against the serving model; raises SnapshotError naming the problem."""
    return read_snapshot(data, config, fingerprint, device, dtype)[0]


def read_snapshot(data: bytes, config: InfoMambaConfig, fingerprint: str, device="cpu", dtype=torch.float32,
                  ) -> tuple[StreamState, torch.Tensor | None]:
    """load_snapshot, plus the stream's last head output (fp32, on the CPU) when the snapshot carries one.

    Checked in this order, each failure a SnapshotError naming what failed: the safetensors framing, format and
    version, the checksum (before anything else in the blob is believed), the layers whose state it holds (a hybrid
    model's attention rings), the model, each tensor's presence,
    dtype, shape and byte length, then the values (finite, bounded, mass >= 0, steps in range and consistent)."""
    metadata, entries = _snapshot_header(data)
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"not an InfoMamba state snapshot (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in SNAPSHOT_READABLE_VERSIONS:
        raise SnapshotError(f"snapshot format version {version!r} is not supported (this server reads versions "
                            f"{', '.join(SNAPSHOT_READABLE_VERSIONS)})")
    if version != "1":
        _verify_checksum(metadata, entries)
    expected = StreamState.empty(config, 1, device="meta", dtype=dtype)
    _check_holds(metadata, state_holds(expected), config)
    if metadata.get("model_fingerprint") != fingerprint:
        raise SnapshotError(f"snapshot belongs to another model ({metadata.get('model_name')!r}, fingerprint "
                            f"{str(metadata.get('model_fingerprint'))[:12]}), not {config.name!r} ({fingerprint[:12]})")

    shapes = {name: tuple(t.shape) for name, t in expected.tensors().items()}
    missing = [name for name in shapes if name not in entries]
    if missing:
        raise SnapshotError(f"snapshot is missing tensor{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}")
    extra = sorted(set(entries) - set(shapes) - {LAST_OUTPUT})
    if extra:
        raise SnapshotError(f"snapshot has unexpected tensors {extra}")
    if LAST_OUTPUT in entries:
        shapes[LAST_OUTPUT] = (config.d_head_output,)
    for name, (st_dtype, shape, view) in entries.items():
        allowed = _allowed_dtypes(name)
        if st_dtype not in allowed:
            raise SnapshotError(f"snapshot tensor {name!r} has dtype {st_dtype}, expected "
                                f"{allowed[0] if len(allowed) == 1 else 'one of ' + ', '.join(allowed)}")
        if tuple(shape) != shapes[name]:
            raise SnapshotError(f"snapshot tensor {name!r} has shape {tuple(shape)}, expected {shapes[name]}")
        if len(view) != math.prod(shape) * _ST_ITEMSIZE[st_dtype]:
            raise SnapshotError(f"snapshot is corrupt: tensor {name!r} holds {len(view)} bytes, but {st_dtype} of "
                                f"shape {tuple(shape)} takes {math.prod(shape) * _ST_ITEMSIZE[st_dtype]}")
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot is corrupt: {exc}") from None

    for name in ("conv", "ssm", "concept_mean", *expected.rings):
        _check_values(name, tensors[name], MAX_STATE_MAGNITUDE)
    mass = tensors["concept_mass"]
    _check_values("concept_mass", mass, None)
    steps = _check_steps(metadata, tensors["steps"])
    if mass.numel() and float(mass.min()) < 0:
        raise SnapshotError(f"snapshot tensor 'concept_mass' holds a negative mass ({float(mass.min())!r}); "
                            f"masses are sums of routing weights, never negative")
    # Each step adds a routing weight in [0, 1] to each concept's mass, so no mass exceeds the steps seen; the
    # slack is many times what fp64 rounding could add.
    if mass.numel() and float(mass.max()) > steps * (1 + 1e-3) + 1:
        raise SnapshotError(f"snapshot tensor 'concept_mass' holds a mass of {float(mass.max())!r}, more than the "
                            f"{steps} steps seen allow (each step adds at most 1)")
    last_output = tensors.get(LAST_OUTPUT)
    if last_output is not None:
        _check_values(LAST_OUTPUT, last_output, MAX_OUTPUT_MAGNITUDE)

    expected_tensors = expected.tensors()
    state = StreamState.from_tensors({name: tensors[name].to(device=device, dtype=expected_tensors[name].dtype)
                                      for name in expected_tensors})
    # conv and the rings are in the writer's model dtype; a narrower one here must still hold their values
    for name, t in state.tensors().items():
        if t.dtype != tensors[name].dtype and not torch.isfinite(t).all():
            raise SnapshotError(f"snapshot tensor {name!r} ({_ST_DTYPES[tensors[name].dtype]}) holds values beyond the "
                                f"range of {t.dtype} that this server runs in")
    return state, last_output


def _check_values(name: str, tensor: torch.Tensor, bound: float | None) -> None:
    if not torch.isfinite(tensor).all():
        raise SnapshotError(f"snapshot tensor {name!r} holds NaN or infinity")
    if bound is not None and tensor.numel():
        largest = float(tensor.abs().max())
        if largest > bound:
            raise SnapshotError(f"snapshot tensor {name!r} holds a value of magnitude {largest:.3g}, beyond the "
                                f"bound {bound:.0e}")


def _check_steps(metadata: dict, tensor: torch.Tensor) -> int:
    """The steps seen, from the metadata and the `steps` tensor: both in [0, MAX_STEPS) and equal."""
    text = metadata.get("steps")
    if not isinstance(text, str) or not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise SnapshotError(f"snapshot metadata 'steps' is {text!r}, expected a non-negative integer")
    for source, steps in (("metadata 'steps'", int(text)), ("tensor 'steps'", int(tensor[0]))):
        if steps < 0:
            raise SnapshotError(f"snapshot {source} is {steps}: steps seen cannot be negative")
        if steps >= MAX_STEPS:
            raise SnapshotError(f"snapshot {source} is {steps}, beyond the limit of 2**53 steps")
    if int(text) != int(tensor[0]):
        raise SnapshotError(f"snapshot steps mismatch: the metadata says {int(text)} steps, the 'steps' tensor "
                            f"holds {int(tensor[0])}")
    return int(text)


def _checksum(metadata: dict, entries: dict) -> str:
    """SHA-256 over a canonical encoding: the metadata other than the checksum (sorted keys), then each tensor in
    name order as (name, dtype, shape, byte length) and its raw little-endian bytes. The byte lengths sit in the
    length-prefixed preamble, so no two different snapshots share an encoding; it does not depend on how
    safetensors lays the tensors out."""
    names = sorted(entries)
    preamble = json.dumps({"metadata": {k: v for k, v in metadata.items() if k != "checksum"},
                           "tensors": [[n, entries[n][0], list(entries[n][1]), len(entries[n][2])] for n in names]},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    digest = hashlib.sha256(len(preamble).to_bytes(8, "little"))
    digest.update(preamble)
    for name in names:
        digest.update(entries[name][2])
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def _verify_checksum(metadata: dict, entries: dict) -> None:
    stored = metadata.get("checksum")
    if stored is None:
        raise SnapshotError(f"snapshot has no checksum (format version {metadata.get('format_version')} "
                            f"requires one)")
    if not stored.startswith(CHECKSUM_ALGORITHM + ":"):
        raise SnapshotError(f"snapshot checksum {stored[:24]!r} is not a {CHECKSUM_ALGORITHM} checksum")
    computed = _checksum(metadata, entries)
    if stored != computed:
        raise SnapshotError(f"snapshot checksum mismatch: the metadata or tensor bytes were altered or corrupted "
                            f"(stored {stored[:19]}..., computed {computed[:19]}...)")


def _snapshot_header(data: bytes) -> tuple[dict, dict]:
    """The metadata and, per tensor, (dtype, shape, a view of its bytes), read from the safetensors framing
    without believing any of it beyond its structure: u64 little-endian header length, a JSON header, the data."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise SnapshotError("snapshot is corrupt: too short to be a safetensors blob")
    data = memoryview(data)
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise SnapshotError("snapshot is corrupt: bad safetensors header length")
    try:
        header = json.loads(bytes(data[8:8 + header_len]), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise SnapshotError("snapshot is corrupt: header is not JSON") from None
    except _DuplicateKey as exc:
        raise SnapshotError(f"snapshot is corrupt: header names {str(exc)[:64]!r} twice") from None
    if not isinstance(header, dict):
        raise SnapshotError("snapshot is corrupt: header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise SnapshotError("snapshot is corrupt: no metadata (not an InfoMamba state snapshot)")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise SnapshotError("snapshot is corrupt: metadata values must be strings")
    body = data[8 + header_len:]
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(shape, list)
                and all(_is_int(d) and d >= 0 for d in shape) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= len(body)):
            raise SnapshotError(f"snapshot is corrupt: bad header entry for tensor {name!r}")
        if entry["dtype"] not in _ST_ITEMSIZE:
            raise SnapshotError(f"snapshot tensor {name!r} has unknown dtype {entry['dtype'][:16]!r}")
        entries[name] = (entry["dtype"], shape, body[offsets[0]:offsets[1]])
    # The tensors must tile the data exactly, so that the checksum covers every byte after the header.
    end = 0
    for begin, stop, name in sorted((*header[n]["data_offsets"], n) for n in entries):
        if begin != end:
            raise SnapshotError(f"snapshot is corrupt: tensor {name!r} starts at byte {begin} of the data, "
                                f"expected {end} (overlapping tensors or a gap)")
        end = stop
    if end != len(body):
        raise SnapshotError(f"snapshot is corrupt: {len(body) - end} bytes after the last tensor")
    return metadata, entries


def snapshot_metadata(head: bytes) -> dict:
    """A snapshot's metadata from its first bytes (the u64 length and the JSON header), unverified: for listing
    stored snapshots without reading them whole. read_snapshot checks everything before a state is used."""
    if len(head) < 8 or 8 + int.from_bytes(head[:8], "little") > len(head):
        raise SnapshotError("snapshot is corrupt: too short for its header")
    try:
        metadata = json.loads(bytes(head[8:8 + int.from_bytes(head[:8], "little")])).get("__metadata__")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
        raise SnapshotError("snapshot is corrupt: header is not JSON") from None
    if not isinstance(metadata, dict):
        raise SnapshotError("snapshot is corrupt: no metadata")
    return metadata


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    # Two entries of one name would let this check and the safetensors loader read different tensors.
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
