"""What frontends and the engine core say to each other, as msgspec Structs (msgpack on the wire).

Frontend -> engine: one message per request or operation, on one PUSH/PULL socket shared by every frontend.
Engine -> frontend: one `StepOutputs` per engine step per frontend (never one per token), on the frontend's own
socket. Arrays travel as raw little-endian bytes with their shape, never as nested lists. A step's plain tokens (no
logprobs, not a request's last) travel as two parallel lists (`TokenOutputs`), not a RequestOutput each: at hundreds
of streams a step, building and encoding those was the largest share of the engine's host time.
"""
from __future__ import annotations

from typing import Union

import msgspec
import numpy as np


class Array(msgspec.Struct, array_like=True):
    """A numpy array as bytes: float32 per-step outputs, int64/float32 inputs."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, array: np.ndarray) -> "Array":
        array = np.ascontiguousarray(array)
        return cls(array.dtype.str, list(array.shape), array.tobytes())

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


class Sampling(msgspec.Struct, array_like=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []  # stop strings: the engine checks them only for session generates (their state must end
    stop_token_ids: list[int] = []  # exactly at the stop); for stateless requests the frontend does
    ignore_eos: bool = False
    logit_bias: dict[int, float] = {}
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # top alternatives to report with each sampled token (0: only its own)


# -- frontend -> engine ----------------------------------------------------------------------------------------

class Hello(msgspec.Struct, tag="hello"):
    """A frontend's first message on its socket: the engine sends this client's outputs back on that socket."""

    client: str


class Add(msgspec.Struct, tag="add", omit_defaults=True):
    """Feed `inputs` (token ids (n,) int64 or vectors (n, d_input) float32), then optionally generate."""

    client: str
    rid: str
    inputs: Array
    outputs: list[str] = []  # per-step outputs to send back for every fed step
    sampling: Sampling | None = None
    session: str | None = None  # run in this session's state (it is carried, and persisted before the answer)
    wait_if_busy: bool = False  # session busy: queue behind its running request (websocket pipelining) or refuse
    want_state: bool = False  # send a snapshot of the final state with the finish (forward's return_state)
    prompt_logprobs: int | None = None  # report each input token's logprob (after the first) and top alternatives
    n: int = 1  # samples of one prompt: the prompt runs once, then its state is copied for samples 1..n-1, whose
    # outputs come under child_rid(rid, i)
    # a stateless generation whose frontend follows no token (not streamed; no stop strings, logprobs or outputs):
    # its tokens come all at once, with its finish, and its steps send the frontend nothing
    final_only: bool = False
    seq: int | None = None  # a session append's sequence number: a retry of an applied one is answered, not rerun


class Abort(msgspec.Struct, tag="abort"):
    client: str
    rid: str


class SessionOp(msgspec.Struct, tag="session", omit_defaults=True):
    """create (optionally from a snapshot), snapshot, fork, delete, info, list (every session: Reply.info)."""

    client: str
    rid: str
    op: str
    session: str | None = None
    snapshot: bytes | None = None
    wait_if_busy: bool = False  # as in Add
    new_session: str | None = None  # create/fork: the new session's id, as a proxy proposed it (else random)


class Utility(msgspec.Struct, tag="utility"):
    """Engine-wide questions: "stats" (counts and health), "metrics" (Prometheus text)."""

    client: str
    rid: str
    name: str


EngineRequest = Union[Hello, Add, Abort, SessionOp, Utility]


def child_rid(rid: str, index: int) -> str:
    """The request id under which sample `index` of an Add with n > 1 answers (sample 0 answers as the Add)."""
    return rid if index == 0 else f"{rid}.{index}"


# -- engine -> frontend ----------------------------------------------------------------------------------------

class Logprobs(msgspec.Struct, array_like=True):
    """Log-probabilities under the model's own distribution (before logit_bias, penalties and temperature) for a
    run of positions: the token there, and the position's top alternatives, most likely first."""

    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def extend(self, more: "Logprobs") -> None:
        self.chosen += more.chosen
        self.top_ids += more.top_ids
        self.top_logprobs += more.top_logprobs


class Error(msgspec.Struct, omit_defaults=True):
    """An engine error; the edge maps `code` to an HTTP status (server/api/errors.py)."""

    code: str
    message: str
    field: str | None = None
    retry_after: int | None = None


class RequestOutput(msgspec.Struct, omit_defaults=True):
    """What one request produced in one engine step."""

    rid: str
    outputs: dict[str, Array] = {}  # kind -> (steps, width) float32 for the steps fed this engine step
    token_ids: list[int] = []  # sampled this step
    logprobs: Logprobs | None = None  # of token_ids, when the request asked
    prompt_logprobs: Logprobs | None = None  # of the input tokens fed this step (from the second), when asked
    finish_reason: str | None = None  # set on the request's last output
    error: Error | None = None
    steps: int | None = None  # the stream's steps seen, on finish
    num_prompt: int = 0  # on finish: steps fed from the request's inputs
    state: bytes | None = None  # snapshot, on finish (want_state)
    replayed: bool = False  # on finish: the request's `seq` was applied before; `steps` is from then


class Reply(msgspec.Struct, omit_defaults=True):
    """The answer to a SessionOp or Utility."""

    rid: str
    ok: bool = True
    error: Error | None = None
    session: str | None = None
    steps: int | None = None
    data: bytes | None = None  # snapshot bytes, or Prometheus text
    info: dict = {}


class EngineInfo(msgspec.Struct):
    """The engine's answer to Hello: what a frontend needs to validate requests and answer /v1/models."""

    pid: int
    model_name: str
    config: dict
    fingerprint: str
    model_dir: str | None
    state_bytes_per_stream: int
    num_slots: int
    kernels: str


class TokenOutputs(msgspec.Struct, array_like=True):
    """One step's plain tokens for one frontend: request rids[i] sampled token_ids[i] (a request may appear twice).
    A token that comes with anything else (logprobs, per-step outputs, the finish) is in its RequestOutput instead;
    a request's RequestOutput of the same step holds what came after its tokens here."""

    rids: list[str]
    token_ids: list[int]


class StepOutputs(msgspec.Struct, omit_defaults=True):
    tokens: TokenOutputs | None = None  # before `outputs`, in order
    outputs: list[RequestOutput] = []
    replies: list[Reply] = []
    welcome: EngineInfo | None = None

    def request_outputs(self) -> list[RequestOutput]:
        """The step's outputs in order, each plain token as the RequestOutput it stands for."""
        if self.tokens is None:
            return self.outputs
        return [RequestOutput(rid, token_ids=[token]) for rid, token in zip(self.tokens.rids, self.tokens.token_ids)] \
            + self.outputs


request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(EngineRequest)
output_encoder = msgspec.msgpack.Encoder()
output_decoder = msgspec.msgpack.Decoder(StepOutputs)
