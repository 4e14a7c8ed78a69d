"""A request as the engine sees it: inputs to feed into one state slot, then (optionally) tokens to generate."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from server.detokenizer import Detokenizer

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
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    repetition_penalty: float = 1.0  # Hugging Face's: over the prompt and the generated tokens
    presence_penalty: float = 0.0  # OpenAI's: over the generated tokens
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # eos and stop_token_ids are masked until this many tokens are generated
    logprobs: int | None = None  # report each sampled token's logprob and this many top alternatives
    eos_id: int | None = None  # the model's end of text (min_tokens masks it)
    is_processed: bool = field(init=False)  # any of the above: the sampler's slower path runs for this row
    is_plain_greedy: bool = field(init=False)  # an argmax and nothing else: what the sampler checks first
    stop_ids: frozenset[int] = field(init=False)  # the sampled tokens that end generation: one look per token

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: expected in [0, 2**63), got {self.seed}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: expected > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: expected in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs: expected >= 0, got {self.logprobs}")
        self.is_processed = bool(self.logit_bias or self.repetition_penalty != 1 or self.presence_penalty
                                 or self.frequency_penalty or self.min_tokens or self.logprobs is not None)
        self.is_plain_greedy = self.is_greedy and not self.is_processed
        self.stop_ids = frozenset(self.end_ids)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The tokens that end generation, which min_tokens holds back."""
        eos = (self.eos_id,) if self.eos_id is not None and not self.ignore_eos else ()
        return tuple(dict.fromkeys(self.stop_token_ids + eos))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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
    tokenizer: object = None  # set only where the engine itself must check stop strings (session generates)
    rid: str = ""
    client: str = ""
    session: object = None  # the Session this request runs in, if any
    prompt_logprobs: int | None = None  # report each input token's logprob and this many top alternatives
    initial_state: object = None  # a StreamState written into the slot at admission (a fork of another request)
    seq: int | None = None  # the client's sequence number of a session append (idempotent retries)
    final_only: bool = False  # its tokens go out with its finish, not step by step (protocol.Add.final_only)
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.owns_slot = self.slot is None and self.session is None
        self.key = (self.client, self.rid)  # its outputs' key in the engine, built once
        self.status = SeqStatus.WAITING
        self.num_fed = 0
        self.num_prompt = int(self.inputs.shape[0])
        self.pending_token: int | None = None  # sampled, not yet fed (nor scheduled to be)
        # running ahead of the host (EngineCore, async scheduling): the last launched step this stream is in while
        # that step is not yet collected; the row of that step's sampled tokens the next step may feed from the
        # device, when the stream may go on before its token is read; whether the next step did feed it so
        self.in_flight_step: int | None = None
        self.ahead_row: int | None = None
        self.fed_ahead = False
        self.num_decoded = 0  # sampled tokens fed back into the stream
        self.steps_before: int | None = None  # a session request's: its slot's steps when it started (host count)
        self.output_ids: list[int] = []
        self.is_draining = False  # generation is over; only the final token is still to be fed
        self.is_cancelled = False
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.history = None  # the sampler's per-request tensors (penalties, logit_bias), built on first use
        self.forks: list[Sequence] = []  # n > 1: the other samples, started from this one's state after its prompt
        self.fork_of: Sequence | None = None
        self.detok = Detokenizer(self.tokenizer, self.sampling.stop) if self.sampling and self.sampling.stop \
            and self.tokenizer is not None else None
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_output_time: float | None = None
        self.last_output_time: float | None = None
        self.num_outputs_after_first = 0  # output steps after the first (for the mean time per output step)

    @property
    def num_pending(self) -> int:
        left = self.num_prompt - self.num_fed
        return left if left > 0 else int(self.pending_token is not None)

    @property
    def is_decode(self) -> bool:
        # its next step feeds a token known on the host; Scheduler.schedule inlines this test (it runs over every
        # stream every step) and also decodes streams whose token is still on the device (async scheduling)
        return self.num_fed >= self.num_prompt and self.pending_token is not None

    @property
    def is_generating(self) -> bool:
        return self.sampling is not None and not self.is_draining
