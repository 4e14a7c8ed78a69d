"""The HTTP and websocket API (DESIGN.md §5) over the engine."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.infomamba import InfoMamba
from kernels.dispatch import use_triton
from model.state import save_snapshot, state_nbytes_per_stream
from server import schemas
from server.config import ServerConfig
from server.engine import AsyncEngine, Engine, concat_outputs
from server.errors import APIError, bad_request
from server.metrics import Metrics
from server.sequence import Sequence, SamplingParams
from server.sessions import SessionManager
from server.state_pool import auto_num_streams

log = logging.getLogger("infomamba.server")
OPEN_ROUTES = ("/health", "/ready", "/metrics")


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    model: InfoMamba | None = None
    tokenizer: object = None
    engine: Engine | None = None
    aengine: AsyncEngine | None = None
    sessions: SessionManager | None = None
    model_name: str = "infomamba"
    is_ready: bool = False
    is_draining: bool = False
    load_error: str | None = None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
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
    return APIError(422 if first.get("type") != "extra_forbidden" else 400, "invalid_field" if
                    first.get("type") != "extra_forbidden" else "unknown_field", f"{field}: {first.get('msg')}", field)


class EdgeMiddleware:
    """Pure ASGI: auth, readiness, body-size limit, and the request counter (by route template and status)."""

    def __init__(self, app, server: ServerState):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, path = self.server, scope["path"]
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = None
        if path.startswith("/v1"):
            error = check_api_key(server, dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
            if error is None and not server.is_ready:
                error = APIError(503, "not_ready", server.load_error or "the model is loading; retry later",
                                 retry_after=2)
            if error is None:
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > server.config.max_body_bytes:
                    error = body_too_large(server)
        if error is not None:
            await error_response(error)(scope, receive, send_wrapper)
        else:
            received = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    received["n"] += len(message.get("body", b""))
                    if received["n"] > server.config.max_body_bytes:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except BodyTooLarge:
                await error_response(body_too_large(server))(scope, receive, send_wrapper)
        route = scope.get("route")
        server.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()


class BodyTooLarge(Exception):
    pass


def body_too_large(server: ServerState) -> APIError:
    return APIError(413, "body_too_large", f"the body exceeds max_body_bytes ({server.config.max_body_bytes})")


def check_api_key(server: ServerState, authorization: str) -> APIError | None:
    key = server.config.api_key
    if key is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')",
                        "authorization")
    return None


# -- inputs --------------------------------------------------------------------------------------------------

def to_input_tensor(server: ServerState, input_ids, inputs, text, index: int | None = None) -> torch.Tensor:
    """One sequence's inputs as a tensor, checked against the model: ids in the vocabulary, vectors of d_input.
    index: the sequence's position in a batched request (error fields then read input_ids[index][step])."""
    config = server.model.config

    def where(name: str, *steps: int) -> str:
        return name + "".join(f"[{i}]" for i in ((index,) if index is not None else ()) + steps)

    given = [name for name, v in (("input_ids", input_ids), ("inputs", inputs), ("text", text)) if v is not None]
    if len(given) != 1:
        raise bad_request("give exactly one of input_ids, inputs or text", where("input_ids"))
    if text is not None:
        if server.tokenizer is None or config.vocab_size is None:
            raise bad_request("this model has no tokenizer; send input_ids or inputs", where("text"))
        input_ids = server.tokenizer.encode(text)
    if input_ids is not None:
        if config.vocab_size is None:
            raise bad_request(f"this model takes float vectors of width {config.d_input} ('inputs'), not token ids",
                              where("input_ids"))
        for i, t in enumerate(input_ids):
            if not 0 <= t < config.vocab_size:
                raise APIError(422, "token_out_of_vocabulary", f"token id {t} is outside the vocabulary "
                               f"[0, {config.vocab_size})", where("input_ids", i))
        tensor = torch.tensor(input_ids, dtype=torch.int64)
    else:
        if config.d_input is None:
            raise bad_request("this model takes token ids ('input_ids'), not float vectors", where("inputs"))
        for i, row in enumerate(inputs):
            if len(row) != config.d_input:
                raise APIError(422, "wrong_feature_width", f"step {i} has {len(row)} features, the model takes "
                               f"{config.d_input}", where("inputs", i))
        tensor = torch.tensor(inputs, dtype=torch.float32).reshape(len(inputs), config.d_input)
    check_steps(server, tensor.shape[0], where(given[0]))
    return tensor


def check_steps(server: ServerState, n: int, field: str) -> None:
    if n > server.config.max_request_steps:
        raise APIError(413, "too_many_steps", f"{n} steps exceed max_request_steps ({server.config.max_request_steps})",
                       field)


def output_kinds(server: ServerState, outputs: list[str] | None, field: str = "outputs") -> tuple[str, ...]:
    head = server.model.config.head
    if outputs is None:
        return ("logits",) if head == "lm" else ("head",)
    for i, kind in enumerate(outputs):
        if kind in ("logits", "logprobs") and head != "lm":
            raise bad_request(f"{kind!r} needs a language-model head; this model's head is {head!r} (use 'head')",
                              f"{field}[{i}]")
    return tuple(dict.fromkeys(outputs))


def sampling_params(server: ServerState, req: schemas.SamplingFields, num_input: int) -> SamplingParams:
    if server.model.config.head != "lm":
        raise bad_request(f"generation needs a language-model head; this model's head is "
                          f"{server.model.config.head!r}", "max_tokens")
    check_steps(server, num_input + req.max_tokens, "max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    for i, t in enumerate(req.stop_token_ids or ()):
        if not 0 <= t < server.model.config.vocab_size:
            raise APIError(422, "token_out_of_vocabulary", f"token id {t} is outside the vocabulary",
                           f"stop_token_ids[{i}]")
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                          top_p=req.top_p, seed=req.seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                          ignore_eos=req.ignore_eos)


def decode_b64(data: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_snapshot", "not valid base64", field) from None


def encode_state(server: ServerState, state, last_logits=None) -> str:
    data = save_snapshot(state, server.model.config.name, server.model.fingerprint(), last_logits)
    return base64.b64encode(data).decode()


def parse(model_cls, data):
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def body_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


# -- the app ---------------------------------------------------------------------------------------------------

def create_app(config: ServerConfig, load: Callable[[], tuple[InfoMamba, object]],
               model_name: str | None = None) -> FastAPI:
    """load() returns (model, tokenizer); it runs in a worker thread after startup so /health and /ready answer
    while the model loads."""
    server = ServerState(config=config, metrics=Metrics())
    state_dir = Path(config.state_dir) if config.state_dir else Path(tempfile.mkdtemp(prefix="infomamba-sessions-"))

    async def start() -> None:
        try:
            t0 = time.monotonic()
            model, tokenizer = await asyncio.to_thread(load)
            server.model, server.tokenizer = model, tokenizer
            server.model_name = model_name or config.served_model_name or model.config.name
            cfg = model.config
            log.info("loaded %s: %.1fM parameters, %d layers, d_model %d, k %d, %s head; %s %s; kernels: %s",
                     server.model_name, sum(p.numel() for p in model.parameters()) / 1e6, cfg.n_layers,
                     cfg.d_model, cfg.n_concepts, cfg.head, model.device, str(model.dtype).replace("torch.", ""),
                     "triton" if use_triton(model.norm_f.weight) else "pytorch")
            num_streams = config.max_num_streams or auto_num_streams(model, config.gpu_memory_fraction)
            num_batched = max(config.max_num_batched_tokens, num_streams)  # every running stream steps each time
            log.info("state pool: %d streams x %.2f MiB (%s); %d input steps per engine step", num_streams,
                     state_nbytes_per_stream(cfg, model.dtype) / 2**20,
                     "sized from free GPU memory" if not config.max_num_streams else "--max-num-streams",
                     num_batched)
            server.engine = Engine(model, num_streams, num_batched,
                                   max_queue=config.max_queue, metrics=server.metrics, tokenizer=tokenizer,
                                   cuda_graphs=config.cuda_graphs)
            server.engine.start()
            server.aengine = AsyncEngine(server.engine)
            server.sessions = SessionManager(server.aengine, state_dir, config.max_num_sessions, config.session_ttl,
                                             server.metrics)
            num = server.sessions.pick_up_persisted()
            if num:
                log.info("picked up %d persisted sessions from %s", num, state_dir)
            server.metrics.state_bytes_per_stream.set(state_nbytes_per_stream(model.config, model.dtype))
            await warm_up(server)
            server.is_ready = True
            log.info("ready in %.1f s; sessions spill to %s%s", time.monotonic() - t0, state_dir,
                     "" if config.state_dir else " (temporary: set --state-dir to keep them across restarts)")
        except Exception as exc:  # /ready keeps answering 503 with the reason
            log.exception("model load failed")
            server.load_error = f"model load failed: {exc}"

    async def reaper() -> None:
        interval = min(max(config.session_ttl / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(interval)
            if server.sessions is not None and server.is_ready:
                try:
                    await server.sessions.reap()
                except Exception:
                    log.exception("session reaper failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(start())
        reap_task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            server.is_draining = True
            server.is_ready = False
            reap_task.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if server.engine is not None:
                await asyncio.to_thread(server.engine.drain, config.shutdown_timeout)
                num = await server.sessions.persist_all()
                log.info("persisted %d sessions to %s", num, state_dir)
                server.engine.stop()

    app = FastAPI(title="InfoMamba Serve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(EdgeMiddleware, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail), "field": None}},
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": {"code": "internal_error", "message": "internal error", "field": None}},
                            status_code=500)

    # -- health and metrics --------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not server.is_ready:
            message = server.load_error or ("draining" if server.is_draining else "loading")
            return JSONResponse({"status": "not_ready", "error": {"code": "not_ready", "message": message,
                                                                  "field": None}},
                                status_code=503, headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        if server.engine is not None:
            server.metrics.refresh(server.engine, server.sessions)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- models, forward, completions ------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "infomamba", "config": server.model.config.to_dict(),
                                            "fingerprint": server.model.fingerprint()}]}

    @app.post("/v1/forward")
    async def forward(request: Request):
        req = parse(schemas.ForwardRequest, await body_json(request))
        sequences = req.input_ids if req.input_ids is not None else req.inputs
        texts = [req.text] if isinstance(req.text, str) else req.text
        count = len(sequences if sequences is not None else texts or [])
        if count == 0 and (req.input_ids is not None or req.inputs is not None or req.text is not None):
            raise bad_request("give at least one sequence", "input_ids" if req.inputs is None else "inputs")
        if count > config.max_batch_sequences:
            raise APIError(413, "too_many_sequences", f"{count} sequences exceed max_batch_sequences "
                           f"({config.max_batch_sequences})", "input_ids" if req.inputs is None else "inputs")
        kinds = output_kinds(server, req.outputs)
        tensors = []
        for i in range(count):
            tensor = to_input_tensor(server, req.input_ids[i] if req.input_ids is not None else None,
                                     req.inputs[i] if req.inputs is not None else None,
                                     texts[i] if texts is not None else None, i)
            if tensor.shape[0] == 0:
                raise bad_request("a sequence needs at least one step", f"input_ids[{i}]" if req.inputs is None else f"inputs[{i}]")
            tensors.append(tensor)
        if not tensors:
            raise bad_request("give exactly one of input_ids, inputs or text", "input_ids")
        keep_logits = req.return_state and server.model.config.head == "lm"
        streams = [server.aengine.open(Sequence(t, outputs=kinds, want_state=req.return_state,
                                                keep_last_logits=keep_logits)) for t in tensors]
        try:
            done = await asyncio.gather(*(s.collect() for s in streams))
        finally:
            for s in streams:
                s.cancel()
        is_classify = server.model.config.head == "classify"
        results = []
        for outputs, _, info in done:
            result = concat_outputs(outputs, kinds, is_classify)
            result["steps"] = info.get("steps", 0)
            if req.return_state:
                result["state"] = encode_state(server, info["state"], info.get("last_logits"))
            results.append(result)
        total = sum(t.shape[0] for t in tensors)
        return {"results": results, "usage": {"prompt_tokens": total, "total_tokens": total}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(schemas.CompletionRequest, await body_json(request))
        if req.model is not None and req.model != server.model_name:
            raise APIError(404, "model_not_found", f"model {req.model!r} is not served here (try "
                           f"{server.model_name!r})", "model")
        prompts = completion_prompts(server, req.prompt)
        if len(prompts) > config.max_batch_sequences:
            raise APIError(413, "too_many_sequences", f"{len(prompts)} prompts exceed max_batch_sequences", "prompt")
        seqs = []
        for i, ids in enumerate(prompts):
            if ids.shape[0] == 0:
                raise bad_request("the prompt is empty", "prompt")
            seqs.append(Sequence(ids, sampling=sampling_params(server, req, ids.shape[0]), tokenizer=server.tokenizer))
        streams = open_all(server, seqs)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        num_prompt = sum(s.num_prompt for s in seqs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(completion_events(server, streams, rid, created, num_prompt, include_usage))
        try:
            done = await asyncio.gather(*(s.collect() for s in streams))
        finally:
            for s in streams:
                s.cancel()
        choices, generated = [], 0
        for i, (seq, (_, tokens, info)) in enumerate(zip(seqs, done)):
            text = seq.detok.text if server.tokenizer is not None else ""
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": info["finish_reason"],
                            "token_ids": tokens})
            generated += len(tokens)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": {"prompt_tokens": num_prompt, "completion_tokens": generated,
                                              "total_tokens": num_prompt + generated}}

    # -- sessions ------------------------------------------------------------------------------------------

    @app.post("/v1/sessions")
    async def create_session(request: Request):
        raw = await request.body()
        req = parse(schemas.SessionCreateRequest, await body_json(request) if raw.strip() else {})
        snapshot = decode_b64(req.snapshot, "snapshot") if req.snapshot is not None else None
        session = await server.sessions.create(snapshot)
        return JSONResponse({"id": session.id, "steps": session.steps}, status_code=201)

    @app.post("/v1/sessions/{sid}/append")
    async def append(sid: str, request: Request):
        req = parse(schemas.AppendRequest, await body_json(request))
        server.sessions.get(sid)
        return await session_append(server, sid, req)

    @app.post("/v1/sessions/{sid}/generate")
    async def generate(sid: str, request: Request):
        req = parse(schemas.GenerateRequest, await body_json(request))
        server.sessions.get(sid)
        session, stream = await session_generate_open(server, sid, req)
        if req.stream:
            return sse_response(session_generate_events(server, session, stream))
        try:
            _, tokens, info = await stream.collect()
        finally:
            server.sessions.release(session)
        return generate_result(server, session, stream.seq, tokens, info)

    @app.get("/v1/sessions/{sid}/snapshot")
    async def snapshot(sid: str):
        data = await server.sessions.snapshot(sid)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.safetensors"'})

    @app.post("/v1/sessions/{sid}/fork")
    async def fork(sid: str):
        child = await server.sessions.fork(sid)
        return JSONResponse({"id": child.id, "steps": child.steps}, status_code=201)

    @app.delete("/v1/sessions/{sid}")
    async def delete(sid: str):
        await server.sessions.delete(sid)
        return Response(status_code=204)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        from server.ws import serve_websocket

        await serve_websocket(server, websocket)

    return app


async def warm_up(server: ServerState) -> None:
    """One prefill and one decode step through the engine, so the first request doesn't pay for lazy init."""
    config = server.model.config
    if config.vocab_size is not None:
        inputs = torch.zeros(4, dtype=torch.int64)
    else:
        inputs = torch.zeros(4, config.d_input)
    sampling = SamplingParams(max_tokens=2, temperature=0) if config.head == "lm" else None
    await server.aengine.run(Sequence(inputs, sampling=sampling))


def completion_prompts(server: ServerState, prompt) -> list[torch.Tensor]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if server.tokenizer is None:
            raise bad_request("this model has no tokenizer; send token ids as the prompt", "prompt")
        lists = [server.tokenizer.encode(t) for t in texts]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        lists = prompt
    else:
        lists = [prompt]
    tensors = []
    for i, ids in enumerate(lists):
        field = "prompt" if len(lists) == 1 else f"prompt[{i}]"
        if server.model.config.vocab_size is None:
            raise bad_request("completions need a token model", "prompt")
        for j, t in enumerate(ids):
            if not 0 <= t < server.model.config.vocab_size:
                raise APIError(422, "token_out_of_vocabulary", f"token id {t} is outside the vocabulary",
                               f"{field}[{j}]")
        tensors.append(torch.tensor(ids, dtype=torch.int64))
    return tensors


def open_all(server: ServerState, seqs: list[Sequence]):
    streams = []
    try:
        for seq in seqs:
            streams.append(server.aengine.open(seq))
    except APIError:
        for s in streams:
            s.cancel()
        raise
    return streams


def sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


def sse_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def completion_events(server: ServerState, streams, rid: str, created: int, num_prompt: int,
                            include_usage: bool):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream):
        try:
            async for event in stream:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
    generated, open_count = 0, len(streams)
    try:
        while open_count:
            index, event = await queue.get()
            if event is None:
                open_count -= 1
                continue
            if event[0] == "token":
                generated += 1
                yield sse({**base, "choices": [{"index": index, "text": event[2], "logprobs": None,
                                                "finish_reason": None, "token_ids": [event[1]]}]})
            elif event[0] == "done":
                yield sse({**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": event[1]["finish_reason"]}]})
            elif event[0] == "error":
                yield sse(event[1].body())
        if include_usage:
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": num_prompt, "completion_tokens": generated,
                                                        "total_tokens": num_prompt + generated}})
        yield sse("[DONE]")
    finally:
        for s in streams:
            s.cancel()
        for t in tasks:
            t.cancel()


async def session_append(server: ServerState, sid: str, req: schemas.AppendRequest) -> dict:
    kinds = output_kinds(server, req.outputs)
    inputs = to_input_tensor(server, req.input_ids, req.inputs, req.text)
    return await append_tensor(server, sid, inputs, kinds)


async def append_tensor(server: ServerState, sid: str, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict:
    session = await server.sessions.acquire(sid)
    try:
        if inputs.shape[0] == 0:
            return {"results": {k: [] for k in kinds}, "steps": session.steps}
        seq = Sequence(inputs, outputs=kinds, slot=session.slot, keep_last_logits=server.model.config.head == "lm")
        outputs, _, info = await server.aengine.run(seq)
        session.steps = info.get("steps", session.steps)
        if info.get("last_logits") is not None:
            session.last_logits = info["last_logits"]
        return {"results": concat_outputs(outputs, kinds, server.model.config.head == "classify"),
                "steps": session.steps}
    finally:
        server.sessions.release(session)


async def session_generate_open(server: ServerState, sid: str, req: schemas.GenerateRequest):
    """Validate, take the session and submit; the caller must release the session when the stream ends."""
    if req.prompt is not None and req.input_ids is not None:
        raise bad_request("give prompt or input_ids, not both", "prompt")
    if req.prompt is not None or req.input_ids is not None:
        inputs = to_input_tensor(server, req.input_ids, None, req.prompt)
    else:
        inputs = torch.zeros(0, dtype=torch.int64)
    params = sampling_params(server, req, inputs.shape[0])
    session = await server.sessions.acquire(sid)
    try:
        if inputs.shape[0] == 0 and session.last_logits is None:
            raise bad_request("the session has no previous output to continue from; give a prompt or input_ids",
                              "prompt")
        seq = Sequence(inputs, sampling=params, slot=session.slot, feed_last=True, keep_last_logits=True,
                       initial_logits=session.last_logits if inputs.shape[0] == 0 else None,
                       tokenizer=server.tokenizer)
        stream = server.aengine.open(seq)
    except BaseException:
        server.sessions.release(session)
        raise
    return session, stream


def note_generate_done(session, info: dict) -> None:
    session.steps = info.get("steps", session.steps)
    if info.get("last_logits") is not None:
        session.last_logits = info["last_logits"]


def generate_result(server: ServerState, session, seq: Sequence, tokens: list[int], info: dict) -> dict:
    note_generate_done(session, info)
    text = seq.detok.text if server.tokenizer is not None else None
    return {"ids": tokens, "text": text, "finish_reason": info.get("finish_reason"), "steps": session.steps,
            "usage": {"prompt_tokens": seq.num_prompt, "completion_tokens": len(tokens),
                      "total_tokens": seq.num_prompt + len(tokens)}}


async def session_generate_events(server: ServerState, session, stream):
    tokens = []
    try:
        async for event in stream:
            if event[0] == "token":
                tokens.append(event[1])
                yield sse({"token": event[1], "text": event[2]})
            elif event[0] == "done":
                yield sse({"done": True, **generate_result(server, session, stream.seq, tokens, event[1])})
            elif event[0] == "error":
                yield sse(event[1].body())
        yield sse("[DONE]")
    finally:
        stream.cancel()
        server.sessions.release(session)
