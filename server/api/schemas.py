"""Request bodies, validated at the HTTP/websocket edge only. Types are strict: "5" is not an int, true is not a
float, NaN and infinity are refused. Everything past this module uses plain Python and tensors."""
from __future__ import annotations

from typing import Annotated, Literal, Union

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
