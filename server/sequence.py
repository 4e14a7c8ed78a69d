"""A request as the engine sees it: inputs to feed into one state slot, then (optionally) tokens to generate."""
from __future__ import annotations

import codecs
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

OUTPUT_KINDS = ("logits", "logprobs", "hidden", "head")
_ids = itertools.count()


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer:
    """Incremental text for generated ids, holding back text that may still turn into a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.num_emitted = 0
        self._ids: list[int] = []
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if _is_byte_level(tokenizer) else None

    def add(self, token_id: int) -> bool:
        """Append one token; True when a stop string completed (the text is cut before it)."""
        if self.tokenizer is None:
            return False
        if self._bytes is not None:
            self.text += self._bytes.decode(self.tokenizer.decode_bytes([token_id]))
        else:
            self._ids.append(token_id)
            self.text = self.tokenizer.decode(self._ids)
        for s in self.stop:
            # only the tail can hold a new match: the text before it was checked already
            at = self.text.find(s, max(0, self.num_emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def delta(self, is_final: bool) -> str:
        """Text not yet handed out that no stop string can still claim."""
        end = len(self.text)
        if not is_final:
            for s in self.stop:  # hold back a tail that may still grow into a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
            end = max(end, self.num_emitted)
        out = self.text[self.num_emitted:end]
        self.num_emitted = end
        return out


def _is_byte_level(tokenizer) -> bool:
    return tokenizer is not None and hasattr(tokenizer, "decode_bytes") and type(tokenizer).__name__ == "ByteTokenizer"


@dataclass(eq=False)
class Sequence:
    """One stream's work: feed `inputs` into `slot`, then sample up to `sampling.max_tokens` tokens.

    inputs: (n,) int64 token ids or (n, d_input) float32 vectors; may be empty when `initial_logits` lets
    generation start from a session's last output.
    """

    inputs: torch.Tensor
    outputs: tuple[str, ...] = ()  # per-step outputs to send back for every fed input step
    sampling: SamplingParams | None = None
    slot: int | None = None  # preassigned (a session's slot) or taken from the pool at admission
    feed_last: bool = False  # feed the final sampled token too, so the slot's state covers all generated text
    keep_last_logits: bool = False  # report the last step's logits (a session generates from them later)
    want_state: bool = False  # report a copy of the slot's state when done (forward's return_state)
    initial_logits: torch.Tensor | None = None  # (vocab,) to sample the first token from when inputs is empty
    tokenizer: object = None
    emit: Callable[[tuple], None] = lambda event: None
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.owns_slot = self.slot is None
        self.status = SeqStatus.WAITING
        self.num_fed = 0
        self.num_prompt = int(self.inputs.shape[0])
        self.pending_token: int | None = None  # sampled, not yet fed
        self.output_ids: list[int] = []
        self.is_draining = False  # generation is over; only the final token is still to be fed
        self.is_cancelled = False
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.detok = Detokenizer(self.tokenizer, self.sampling.stop) if self.sampling else None
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_output_time: float | None = None
        self.last_output_time: float | None = None

    @property
    def num_pending(self) -> int:
        left = self.num_prompt - self.num_fed
        return left if left > 0 else int(self.pending_token is not None)

    @property
    def is_decode(self) -> bool:
        return self.num_fed >= self.num_prompt and self.pending_token is not None

    @property
    def is_generating(self) -> bool:
        return self.sampling is not None and not self.is_draining
