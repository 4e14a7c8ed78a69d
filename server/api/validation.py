"""Every check on what a client sent, in one place: bodies, inputs (one token-id range check), output kinds,
sampling fields, and the size of what a request may ask back. What passes is numpy arrays and protocol Structs."""
from __future__ import annotations

import base64
import binascii
import json

import msgspec
import numpy as np
import orjson
from pydantic import ValidationError

from server.api import schemas
from server.api.errors import APIError, bad_request
from server.engine.protocol import Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # all stop strings together: each generated token is checked against every one
SEED_LIMIT = 2**63
BYTES_PER_VALUE = 12  # a float32 as JSON text, at most about this long with its separator


def validation_error(exc) -> APIError:
    first = exc.errors()[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "invalid_json", f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "invalid_json", "the body is missing (expected a JSON object)")
    # union branches show up as loc parts like 'list[int]'; drop them from the field path
    parts = [p for p in loc if isinstance(p, int) or (isinstance(p, str) and "[" not in p and p not in
                                                      ("str", "int", "float", "bool", "function-after"))]
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts)) or None
    extra = first.get("type") == "extra_forbidden"
    return APIError(400 if extra else 422, "unknown_field" if extra else "invalid_field",
                    f"{field}: {first.get('msg')}", field)


def parse(model_cls, data):
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_body(model_cls, raw: bytes):
    """A JSON body as model_cls, or the APIError naming what is wrong. A model with a msgspec mirror
    (schemas.FAST_DECODERS) is decoded by it when the body passes; the mirror refuses every body the model refuses
    (and some it takes), and what it refuses goes the model's way, whose errors name fields as the contract says."""
    decoder = schemas.FAST_DECODERS.get(model_cls)
    if decoder is not None:
        try:
            return decoder.decode(raw)
        except msgspec.MsgspecError:
            pass
    return parse(model_cls, loads(raw))


def loads(raw: bytes, what: str = "the body"):
    """JSON text -> Python objects. orjson first (fast); the standard parser only to name what is wrong, or to
    let NaN and 1e999 reach the schema, which then names the field."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, "invalid_json", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "invalid_json", f"{what} is nested too deeply") from None
    return data  # lone surrogates get through here: text fields are checked where they are encoded


def decode_b64(data: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_snapshot", "not valid base64", field) from None


class Validator:
    """Checks that depend on the served model and the server's limits."""

    def __init__(self, config, model_config, tokenizer):
        self.config = config
        self.model = model_config
        self.tokenizer = tokenizer

    def inputs(self, input_ids=None, inputs=None, text=None, index: int | None = None) -> np.ndarray:
        """One sequence's inputs: (n,) int64 ids in the vocabulary, or (n, d_input) float32 vectors.
        index: the sequence's position in a batched request (error fields then read input_ids[index][step])."""
        def where(name: str) -> str:
            return name + (f"[{index}]" if index is not None else "")

        given = [name for name, v in (("input_ids", input_ids), ("inputs", inputs), ("text", text)) if v is not None]
        if len(given) != 1:
            raise bad_request("give exactly one of input_ids, inputs or text", where(given[1] if given else
                                                                                     "input_ids"))
        if text is not None:
            input_ids = self.encode(text, where("text"))
        if input_ids is not None:
            if self.model.vocab_size is None:
                raise bad_request(f"this model takes float vectors of width {self.model.d_input} ('inputs'), "
                                  "not token ids", where("input_ids"))
            array = self.token_ids(input_ids, where("input_ids"))
        else:
            if self.model.d_input is None:
                raise bad_request("this model takes token ids ('input_ids'), not float vectors", where("inputs"))
            for i, row in enumerate(inputs):
                if len(row) != self.model.d_input:
                    raise APIError(422, "wrong_feature_width", f"step {i} has {len(row)} features, the model "
                                   f"takes {self.model.d_input}", f"{where('inputs')}[{i}]")
            array = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), self.model.d_input)
            self.finite(array, where("inputs"))
        self.steps(array.shape[0], where(given[0]))
        return array

    def encode(self, text: str, field: str) -> list[int]:
        if self.tokenizer is None or self.model.vocab_size is None:
            raise bad_request("this model has no tokenizer; send input_ids or inputs", field)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(422, "invalid_text", "the text is not valid Unicode (a lone surrogate?)", field) from None
        return self.tokenizer.encode(text)

    def token_ids(self, ids, field: str) -> np.ndarray:
        """The one range check of token ids, for every route and frame: (n,) int64 or a 422 naming the first."""
        try:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        except OverflowError:  # beyond int64: name the first such id as it was sent
            i = next(i for i, t in enumerate(ids) if not -2**63 <= t < 2**63)
            raise APIError(422, "token_out_of_vocabulary", f"token id {ids[i]} is outside the vocabulary "
                           f"[0, {self.model.vocab_size})", f"{field}[{i}]") from None
        bad = np.flatnonzero((ids < 0) | (ids >= self.model.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise APIError(422, "token_out_of_vocabulary", f"token id {int(ids[i])} is outside the vocabulary "
                           f"[0, {self.model.vocab_size})", f"{field}[{i}]")
        return ids

    def finite(self, array: np.ndarray, field: str) -> None:
        if not np.isfinite(array).all():
            raise APIError(422, "invalid_field", "inputs must be finite: they hold NaN or infinity", field)

    def steps(self, n: int, field: str) -> None:
        if n > self.config.max_request_steps:
            raise APIError(413, "too_many_steps", f"{n} steps exceed max_request_steps "
                           f"({self.config.max_request_steps})", field)

    def output_kinds(self, outputs: list[str] | None, field: str = "outputs") -> tuple[str, ...]:
        head = self.model.head
        if outputs is None:
            return ("logits",) if head == "lm" else ("head",)
        for i, kind in enumerate(outputs):
            if kind in ("logits", "logprobs") and head != "lm":
                raise bad_request(f"{kind!r} needs a language-model head; this model's head is {head!r} (use "
                                  "'head')", f"{field}[{i}]")
        return tuple(dict.fromkeys(outputs))

    def output_budget(self, num_steps: int, kinds: tuple[str, ...], field: str = "outputs") -> None:
        """413 before any work when the answer would be larger than max_response_bytes."""
        width = {"logits": self.model.d_head_output, "logprobs": self.model.d_head_output,
                 "hidden": self.model.d_model, "head": self.model.d_head_output}
        values = sum(num_steps * width[k] for k in kinds if not (k == "head" and self.model.head == "classify"))
        size = values * BYTES_PER_VALUE
        if size > self.config.max_response_bytes:
            raise APIError(413, "response_too_large", f"the requested outputs ({', '.join(kinds)} for {num_steps} "
                           f"steps) would be about {size / 2**20:.0f} MiB, over max_response_bytes "
                           f"({self.config.max_response_bytes / 2**20:.0f} MiB); ask for fewer kinds, or append the "
                           "input in chunks to a session (the websocket's binary frames page it for you)", field)

    def sampling(self, req: schemas.SamplingFields, num_input: int, max_tokens: int | None = None,
                 logprobs: int | None = None, num_samples: int = 1) -> Sampling:
        """max_tokens: instead of the request's; logprobs: top alternatives to report with each token;
        num_samples: samples of this input (n), each of up to max_tokens steps."""
        self.lm_head("max_tokens")
        max_tokens = req.max_tokens if max_tokens is None else max_tokens
        self.steps(num_input + num_samples * max_tokens, "max_tokens")
        if req.min_tokens > max_tokens:
            raise APIError(422, "invalid_field", f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})",
                           "min_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
        if any(s == "" for s in stop):
            raise bad_request("stop strings must not be empty", "stop")
        if len(stop) > MAX_STOP_STRINGS or sum(len(s) for s in stop) > MAX_STOP_CHARS:
            raise APIError(422, "invalid_field", f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_CHARS} "
                           "characters in all", "stop")
        for s in stop:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(422, "invalid_text", "a stop string is not valid Unicode", "stop") from None
        stop_ids = self.token_ids(req.stop_token_ids, "stop_token_ids").tolist() if req.stop_token_ids else []
        if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
            raise APIError(422, "invalid_field", f"seed: expected an integer in [0, 2**63), got {req.seed}", "seed")
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                        top_p=req.top_p, seed=req.seed, stop=stop, stop_token_ids=stop_ids,
                        ignore_eos=req.ignore_eos, logit_bias=self.logit_bias(req.logit_bias),
                        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, min_tokens=req.min_tokens, logprobs=logprobs)

    def lm_head(self, field: str) -> None:
        if self.model.head != "lm":
            raise bad_request(f"generation needs a language-model head; this model's head is {self.model.head!r}",
                              field)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's keys are token ids written as strings; each must be one in the vocabulary."""
        found = {}
        for key, value in (bias or {}).items():
            field = f"logit_bias.{key}"
            if not (key.isascii() and key.isdigit()) or len(key) > 19:
                raise APIError(422, "invalid_field", f"logit_bias keys are token ids (decimal strings), got {key!r}",
                               field)
            token = int(key)
            if token >= self.model.vocab_size:
                raise APIError(422, "token_out_of_vocabulary", f"token id {token} is outside the vocabulary "
                               f"[0, {self.model.vocab_size})", field)
            found[token] = value
        return found
