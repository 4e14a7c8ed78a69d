"""One API frontend: a FastAPI app that validates, talks to the engine process over a Unix socket, and frames answers."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.edge import _UNSET, Edge, RedactSecrets
from server.api.errors import APIError, error_body
from server.api.docs import install as install_docs
from server.api.hot import HotRoutes
from server.api.middleware import EdgeMiddleware
from server.api.openapi import install as install_openapi
from server.api.requests import ClientGone
from server.api.responses import JSON, error_response
from server.api.routes import chat, forward, health, openai, sessions
from server.api.validation import validation_error
from server.api.ws import serve_websocket
from server.config import ServerConfig
from server.engine.client import EngineClient, EngineDead

log = logging.getLogger("infomamba.frontend")


def create_app(config: ServerConfig, engine_address: str, tokenizer=_UNSET) -> FastAPI:
    """engine_address: the engine's socket (ipc://PATH).
    tokenizer: leave unset to load the one of the engine's model directory."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        edge = app.state.edge = Edge(config, EngineClient(engine_address), tokenizer=tokenizer)
        await edge.engine.start()
        welcome = asyncio.create_task(_learn_model(edge))
        try:
            yield
        finally:
            edge.is_draining = True
            welcome.cancel()
            await edge.engine.close()

    # FastAPI's own OpenTelemetry hooks ask for a tracer provider on every request; /metrics is our telemetry
    app = FastAPI(title="InfoMamba Serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_docs(app)
    app.add_middleware(HotRoutes, fastapi_app=app)  # added first: it runs inside EdgeMiddleware
    app.add_middleware(EdgeMiddleware, get_edge=lambda: app.state.edge)
    for module in (health, openai, chat, forward, sessions):
        app.include_router(module.router)
    install_openapi(app)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        await serve_websocket(app.state.edge, websocket)

    app.add_exception_handler(APIError, lambda request, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, lambda request, exc: error_response(validation_error(exc)))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineDead, lambda request, exc: error_response(app.state.edge.not_ready()))
    app.add_exception_handler(ClientGone, lambda request, exc: Response(status_code=499))
    app.add_exception_handler(Exception, _internal_error)
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    return app


async def _learn_model(edge: Edge) -> None:
    await edge.engine.ready.wait()
    edge.welcome()
    log.info("frontend ready: serving %s", edge.model_name)


def _http_error(request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSON(error_body(exc.status_code, code, str(exc.detail)), status_code=exc.status_code)


def _internal_error(request, exc: Exception):
    log.error("unhandled error", exc_info=exc)
    return JSON(error_body(500, "internal_error", "internal error"), status_code=500)

