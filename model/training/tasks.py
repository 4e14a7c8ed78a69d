"""Two in-context tasks of the MambaFormer paper (Park et al., 2024, "Can Mamba Learn How to Learn?"), as token
sequences whose targets are set only where an answer is due (IGNORE_INDEX elsewhere), freshly sampled per batch.

- Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology"): `num_pairs` key-value pairs
  k_1 v_1 ... k_P v_P (distinct keys), then `num_queries` of those keys; at each query the answer is its value.
  Keys are tokens [0, num_keys), values [num_keys, num_keys + num_values). Attention retrieves; a fixed-size
  recurrent state must hold every pair.
- Sparse parity in context (as in Bhattamishra et al., 2023): each sequence has its own secret set of `sparsity` of
  the `num_bits` positions; `num_examples` examples x (num_bits bits, tokens 0/1) then its label y = XOR of x on the
  secret (token 2 + y). The answer is due at each example's last bit, so the model has to infer the secret from the
  examples before; accuracy counts the examples from `scored_from` on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.training.corpus import IGNORE_INDEX


@dataclass(slots=True)
class TaskBatch:
    inputs: torch.Tensor  # (B, L) token ids
    targets: torch.Tensor  # (B, L): the answer at answer positions, IGNORE_INDEX elsewhere
    scored: torch.Tensor  # (B, L) bool: the answers accuracy counts


@dataclass(slots=True)
class MqarTask:
    num_pairs: int = 16
    num_queries: int = 16
    num_keys: int = 64
    num_values: int = 64

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_queries", "num_keys", "num_values"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs: {self.num_pairs} distinct keys need num_keys >= {self.num_pairs}")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries: at most num_pairs ({self.num_pairs}) distinct keys to ask for")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + self.num_queries

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        P, Q = self.num_pairs, self.num_queries
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(dim=1)[:, :P]  # (B, P) distinct
        values = self.num_keys + torch.randint(self.num_values, (batch, P), generator=generator)
        asked = torch.rand(batch, P, generator=generator).argsort(dim=1)[:, :Q]  # (B, Q) which pairs are queried
        inputs = torch.empty(batch, self.seq_len, dtype=torch.long)
        inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values
        inputs[:, 2 * P:] = keys.gather(1, asked)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, 2 * P:] = values.gather(1, asked)
        return TaskBatch(inputs, targets, targets != IGNORE_INDEX)


@dataclass(slots=True)
class SparseParityTask:
    num_bits: int = 8
    sparsity: int = 2
    num_examples: int = 32
    scored_from: int = 16  # examples before this one are the context the secret is learnt from

    def __post_init__(self) -> None:
        if not 1 <= self.sparsity <= self.num_bits:
            raise ValueError(f"sparsity: expected 1..num_bits ({self.num_bits}), got {self.sparsity}")
        if not 0 <= self.scored_from < self.num_examples:
            raise ValueError(f"scored_from: expected 0..num_examples - 1 ({self.num_examples - 1}), "
                             f"got {self.scored_from}")

    @property
    def vocab_size(self) -> int:
        return 4  # bits 0 and 1, labels 2 + y

    @property
    def seq_len(self) -> int:
        return self.num_examples * (self.num_bits + 1)

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        n, E = self.num_bits, self.num_examples
        bits = torch.randint(2, (batch, E, n), generator=generator)
        secret = torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :self.sparsity]  # (B, k)
        labels = bits.gather(2, secret[:, None, :].expand(batch, E, self.sparsity)).sum(-1) % 2  # (B, E)
        examples = torch.cat([bits, 2 + labels[..., None]], dim=2)  # (B, E, n + 1)
        targets = torch.full_like(examples, IGNORE_INDEX)
        targets[:, :, n - 1] = 2 + labels  # due at the last bit: the next token is the label
        scored = torch.zeros_like(examples, dtype=torch.bool)
        scored[:, self.scored_from:, n - 1] = True
        return TaskBatch(examples.reshape(batch, -1), targets.reshape(batch, -1), scored.reshape(batch, -1))
