"""Request bodies, validated at the HTTP/websocket edge only. Types are strict: "5" is not an int, true is not a
float, NaN and infinity are refused. Everything past this module uses plain Python and tensors."""
from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2, allow_inf_nan=False)]  # OpenAI's range
Bias = Annotated[float, Field(strict=True, ge=-100, le=100, allow_inf_nan=False)]
OutputKind = Literal["logits", "logprobs", "hidden", "head"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(BaseModel):
    max_tokens: Annotated[StrictInt, Field(ge=1)] = 16
    temperature: Annotated[float, Field(strict=True, ge=0, le=100, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = -1  # -1 or 0: off (vLLM's convention)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    logit_bias: dict[StrictStr, Bias] | None = None  # token id (as a string, as OpenAI's) -> added to its logit
    repetition_penalty: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0


class ForwardRequest(Strict):
    input_ids: list[list[StrictInt]] | None = None
    inputs: list[list[list[Float]]] | None = None
    text: list[StrictStr] | StrictStr | None = None
    outputs: list[OutputKind] | None = None
    return_state: StrictBool = False


class SessionCreateRequest(Strict):
    snapshot: StrictStr | None = None  # base64 of a state snapshot


class AppendRequest(Strict):
    input_ids: list[StrictInt] | None = None
    inputs: list[list[Float]] | None = None
    text: StrictStr | None = None
    outputs: list[OutputKind] | None = None
    # the client's number for this append, increasing per session: a retry of an applied one is answered from the
    # record (README, "Idempotent appends")
    seq: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None


class GenerateRequest(SamplingFields, Strict):
    prompt: StrictStr | None = None
    input_ids: list[StrictInt] | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CompletionRequest(SamplingFields):
    """OpenAI's completions request. A field this server does not implement is refused when set to anything but
    its no-op value (suffix; best_of other than n), and an unknown field is refused: a parameter is never
    silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] = 16  # 0 only with echo: the prompt's logprobs, nothing generated
    n: Annotated[StrictInt, Field(ge=1)] = 1
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None  # top alternatives per token (OpenAI's 0..5)
    suffix: None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ContentPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_calls, ...) reach the chat template as they are."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    """OpenAI's chat completions request: the messages are rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    n: Annotated[StrictInt, Field(ge=1)] = 1
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    add_generation_prompt: StrictBool = True  # the template's flag: open the assistant's turn


# websocket frames (the type field picks the model)
class WSOpen(Strict):
    type: Literal["open"]
    session: StrictStr | None = None
    snapshot: StrictStr | None = None


class WSAppend(AppendRequest):
    type: Literal["append"]
    binary: StrictBool = False  # answer with a binary outputs frame (server/api/ws.py) instead of JSON


class WSGenerate(GenerateRequest):
    type: Literal["generate"]


class WSSnapshot(Strict):
    type: Literal["snapshot"]


class WSClose(Strict):
    type: Literal["close"]
    delete: StrictBool = False


class WSCancel(Strict):
    type: Literal["cancel"]


WS_FRAMES = {"open": WSOpen, "append": WSAppend, "generate": WSGenerate, "snapshot": WSSnapshot, "close": WSClose,
             "cancel": WSCancel}


# msgspec mirrors of the hot bodies: they decode a body in a few µs where the pydantic model takes ~20, and accept
# no body that the model refuses (their types are the model's or narrower; a prompt of strings or of lists, ids past
# int64, NaN and the like are left to the model). A body a mirror refuses goes the model's way, which names the
# field as the contract says. tests/server/test_schemas.py holds each mirror to its model.
_MAX = 1.7976931348623157e308  # finite: JSON's 1e999 is out of range, as allow_inf_nan=False refuses it
_Finite = msgspec.Meta(ge=-_MAX, le=_MAX)
_I64 = 2**63 - 1  # msgspec takes ints past int64 (pydantic's strict int refuses those past uint64): the mirror doesn't
Int = Annotated[int, msgspec.Meta(ge=-_I64 - 1, le=_I64)]


class _FastStreamOptions(msgspec.Struct):
    include_usage: bool = False


class _FastSampling(msgspec.Struct, forbid_unknown_fields=True):
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=_I64)] = -1
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=_MAX)] = 1.0
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    min_tokens: Annotated[int, msgspec.Meta(ge=0, le=_I64)] = 0


class FastCompletionRequest(_FastSampling, forbid_unknown_fields=True, kw_only=True):
    prompt: str | list[Int]  # the model's other forms (lists of strings or of id lists) go its way
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=_I64)] = 16
    n: Annotated[int, msgspec.Meta(ge=1, le=_I64)] = 1
    best_of: Annotated[int, msgspec.Meta(ge=1, le=_I64)] | None = None
    echo: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    suffix: None = None
    stream_options: _FastStreamOptions | None = None
    user: str | None = None


class FastAppendRequest(msgspec.Struct, forbid_unknown_fields=True):
    input_ids: list[Int] | None = None
    inputs: list[list[Annotated[float, _Finite]]] | None = None
    text: str | None = None
    outputs: list[OutputKind] | None = None
    seq: Annotated[int, msgspec.Meta(ge=0, le=_I64)] | None = None


class FastWSAppend(FastAppendRequest, forbid_unknown_fields=True, kw_only=True):
    type: Literal["append"]
    binary: bool = False


FAST_DECODERS = {CompletionRequest: msgspec.json.Decoder(FastCompletionRequest),
                 AppendRequest: msgspec.json.Decoder(FastAppendRequest), WSAppend: msgspec.json.Decoder(FastWSAppend)}
