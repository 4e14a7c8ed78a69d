"""The batched InfoMamba model: one entry point for whole sequences, continuing chunks and single steps."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from kernels import ops
from kernels.packing import PackedLayout
from model.attention import AttentionLayer
from model.config import InfoMambaConfig, LayerConfig
from model.layers import Batch, InfoMambaLayer, RMSNorm
from model.mlp import MlpLayer
from model.state import AttentionState, LayerState, StreamState


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (T, D) final-normed hidden per packed token
    head: torch.Tensor  # lm: (T, vocab) logits; per_step: (T, d_output); classify: (batch, n_classes)


class InfoMamba(nn.Module):
    def __init__(self, config: InfoMambaConfig):
        super().__init__()
        self.config = config
        if config.vocab_size is not None:
            self.embedding = nn.Embedding(config.vocab_size, config.d_model)
            nn.init.normal_(self.embedding.weight, std=0.02)
        else:
            self.input_proj = nn.Linear(config.d_input, config.d_model)
        self.layers = nn.ModuleList(make_layer(config, layer) for layer in config.layer_configs)
        self._layer_types = config.layer_types  # a property that builds the tuple: read once, not per layer
        # where each layer's stream state lives: the recurrent tensors are stacked over the "infomamba" layers only
        self._recurrent_index = {i: j for j, i in enumerate(
            i for i, kind in enumerate(self._layer_types) if kind == "infomamba")}
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        if not config.is_tied:
            self.head = nn.Linear(config.d_model, config.d_head_output, bias=config.head != "lm")
        self._fingerprint: str | None = None

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm_f.weight.dtype

    def empty_state(self, batch: int) -> StreamState:
        return StreamState.empty(self.config, batch, device=self.device, dtype=self.dtype)

    def fingerprint(self) -> str:
        """A hash of the config and every weight: snapshots carry it so they only load into this model.

        Weights are hashed as fp32 on the CPU, so the same weights give the same fingerprint on any device, and
        `load_model` takes it before casting: a bf16 GPU replica and an fp32 CPU replica of one model directory
        accept each other's snapshots. Call `invalidate_fingerprint` after changing weights in place."""
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(sorted(_fingerprint_fields(self.config).items())).encode())
            for name, tensor in sorted(self.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        self._fingerprint = None

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, state: StreamState | None = None, *,
                cu_seqlens: torch.Tensor | None = None, state_indices: torch.Tensor | None = None,
                bounds: list[int] | None = None,
                layout: PackedLayout | None = None) -> tuple[ModelOutput, StreamState]:
        """Run sequences forward from `state`, which is updated in place and returned.

        inputs: token ids (batch, T) / float vectors (batch, T, d_input) of equal-length sequences, or packed
            variable-length sequences (total,) / (total, d_input) with `cu_seqlens` (batch + 1,).
        state: a StreamState to continue (a fresh zero state when None); with `state_indices` (batch,) it is a
            pool and sequence i continues slot state_indices[i] (-1: padding, left untouched).
        A whole sequence, a chunk of one, or a single step (T == 1, run by the decode kernels) all go here.
        bounds: cu_seqlens's values, when the caller has them on the host (then nothing reads the device for them).
        layout: the batch layout built by the caller (it stands for cu_seqlens and bounds): a CUDA graph's capture
            passes one whose chunk tables are already on the device, so the capture copies nothing from the host.
        """
        device = self.device
        if layout is not None:
            cu_seqlens, bounds = layout.cu_seqlens, layout.bounds
        tokens, cu_seqlens, bounds = self._pack(inputs, cu_seqlens, bounds, device)
        num_seqs = len(bounds) - 1
        if state is None:
            state = self.empty_state(num_seqs)
        if state_indices is None:
            if state.batch_size != num_seqs:
                raise ValueError(f"state: holds {state.batch_size} streams for {num_seqs} sequences; "
                                 "pass state_indices to use it as a pool")
            state_indices = torch.arange(num_seqs, dtype=torch.int32, device=device)
        state_indices = _on(state_indices, device, torch.int32)
        lengths = torch.diff(cu_seqlens)  # (batch,)
        # the layout is built once here; every layer's chunk kernels take it as an argument
        if layout is None or layout.cu_seqlens is not cu_seqlens:
            layout = PackedLayout(cu_seqlens, bounds)
        is_decode = tokens.shape[0] == num_seqs and layout.max_len == 1
        x = self._embed(tokens)
        batch = Batch(cu_seqlens=cu_seqlens, state_indices=state_indices, is_decode=is_decode, layout=layout,
                      ops=ops.resolve(x))
        hidden = self._run_layers(x, state, batch)
        _advance_steps(state, state_indices, lengths)
        return ModelOutput(hidden=hidden, head=self._head(hidden, cu_seqlens)), state

    def decode_step(self, tokens: torch.Tensor, state: StreamState, state_indices: torch.Tensor) -> ModelOutput:
        """One step for a batch of pool slots, with no host synchronization, so CUDA graphs can capture it.

        tokens: (batch,) ids or (batch, d_input); state_indices: (batch,) int32 on the model's device, -1 = padding.
        """
        x = self._embed(tokens)
        batch = Batch(cu_seqlens=self._decode_cu_seqlens(tokens.shape[0]), state_indices=state_indices,
                      is_decode=True, ops=ops.resolve(x))
        hidden = self._run_layers(x, state, batch)
        _advance_steps(state, state_indices, torch.ones_like(state_indices))
        return ModelOutput(hidden=hidden, head=self._head(hidden, batch.cu_seqlens))

    def _decode_cu_seqlens(self, n: int) -> torch.Tensor:
        return torch.arange(n + 1, dtype=torch.int32, device=self.device)

    def _run_layers(self, x: torch.Tensor, state: StreamState, batch: Batch) -> torch.Tensor:
        y, residual = x, None
        add_rms_norm, add_rms_norm_linear = batch.ops.add_rms_norm, batch.ops.add_rms_norm_linear
        for i, layer in enumerate(self.layers):
            norm = layer.norm
            # a layer whose first step is one product of the normed input takes it fused with the norm (a decode
            # step's few rows: one launch, not two; kernels/small_linear.py)
            input_projection = getattr(layer, "input_projection", None)
            projection = input_projection(batch) if input_projection is not None else None
            if projection is None:
                h, residual = add_rms_norm(y, residual, norm.weight, norm.eps)
                y = layer(h, self.layer_state(state, i), batch)
            else:
                pre, residual = add_rms_norm_linear(y, residual, norm.weight, norm.eps, *projection)
                y = layer.from_projection(pre, self.layer_state(state, i), batch)
        hidden, _ = add_rms_norm(y, residual, self.norm_f.weight, self.norm_f.eps)
        return hidden

    def layer_state(self, state: StreamState, i: int) -> LayerState | AttentionState | None:
        """Layer i's views into `state`: a recurrent layer's conv/SSM/concept state, an attention layer's rings,
        or None (an MLP keeps nothing)."""
        kind = self._layer_types[i]
        if kind == "infomamba":
            return state.layer(self._recurrent_index[i])
        return state.attention(i) if kind == "attention" else None

    def _pack(self, inputs: torch.Tensor, cu_seqlens: torch.Tensor | None, bounds: list[int] | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        token_ndim = 1 if self.config.vocab_size is not None else 2
        if cu_seqlens is None:
            if inputs.ndim != token_ndim + 1:
                raise ValueError(f"inputs: expected {token_ndim + 1} dims (batch, T{', d_input' if token_ndim == 2 else ''}),"
                                 f" got shape {tuple(inputs.shape)}")
            batch, length = inputs.shape[:2]
            bounds = [i * length for i in range(batch + 1)]
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
            inputs = inputs.reshape(batch * length, *inputs.shape[2:])
        elif inputs.ndim != token_ndim:
            raise ValueError(f"inputs: packed inputs need {token_ndim} dims, got shape {tuple(inputs.shape)}")
        else:
            cu_seqlens = _on(cu_seqlens, device, torch.int32).contiguous()
            if bounds is None:
                bounds = cu_seqlens.tolist()  # at most one host read of the batch layout per forward pass
        if bounds[-1] != inputs.shape[0]:
            raise ValueError(f"cu_seqlens: ends at {bounds[-1]} but there are {inputs.shape[0]} tokens")
        return _on(inputs, device), cu_seqlens, bounds

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.vocab_size is not None:
            return self.embedding(_on(tokens, None, torch.int64))
        return self.input_proj(_on(tokens, None, self.dtype))

    def _head(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        if self.config.head == "classify":
            hidden = hidden[(cu_seqlens[1:] - 1).clamp(min=0).long()]  # the last step of each sequence
        weight = self.embedding.weight if self.config.is_tied else self.head.weight
        bias = None if self.config.is_tied else self.head.bias
        return nn.functional.linear(hidden, weight, bias)


def make_layer(config: InfoMambaConfig, layer: LayerConfig) -> nn.Module:
    if layer.type == "attention":
        return AttentionLayer(config, layer)
    if layer.type == "mlp":
        return MlpLayer(config, layer)
    return InfoMambaLayer(config)


# Config fields added after the first release, with the value that keeps the first behaviour: left out of the
# fingerprint at that value, so models saved before them keep their fingerprint, and their streams' snapshots
# (a server's spilled sessions included) still load.
_LATER_FIELDS = {"concept_decay": "none", "layers": None}


def _fingerprint_fields(config: InfoMambaConfig) -> dict:
    fields = config.to_dict()
    for name, original in _LATER_FIELDS.items():
        if fields.get(name) == original:
            del fields[name]
    return fields


def _on(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on `device` (None: where it is) as `dtype` (None: as it is). Tensor.to dispatches an op even when it has
    nothing to do (some µs of host time each); the runner's tensors are already where the model wants them."""
    if (device is None or t.device == device) and (dtype is None or t.dtype == dtype):
        return t
    return t.to(device=device, dtype=dtype)


def _advance_steps(state: StreamState, state_indices: torch.Tensor, lengths: torch.Tensor) -> None:
    """steps[slot] += length for every live slot, without reading the device (padding adds 0 to slot 0)."""
    added = torch.where(state_indices >= 0, lengths, 0).long()
    state.steps.index_add_(0, state_indices.clamp(min=0).long(), added)
