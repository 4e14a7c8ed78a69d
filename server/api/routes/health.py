"""/health, /ready, /metrics: for operators and orchestrators, never behind the API key."""
from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response

from server.api.errors import error_body
from server.api.responses import JSON
from server.engine.client import EngineDead

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """200 while this frontend, its engine process and the state store all work; 503 (with the reason) when not."""
    edge = request.app.state.edge
    info = edge.engine.info
    body = {"status": "ok", "frontend": {"pid": os.getpid()}, "engine": {"pid": info.pid if info else None, "alive": not edge.engine.dead,
                                       "loaded": info is not None}}
    if edge.engine.dead:
        body.update(status="unhealthy", **error_body(503, "engine_unavailable", "the engine process has stopped"))
        return JSON(body, status_code=503)
    if info is not None and edge.is_ready:
        try:
            stats = (await edge.engine.utility("stats")).info
        except EngineDead:
            return JSON({**body, "status": "unhealthy"}, status_code=503)
        body["engine"].update(stats)
        body["state_store"] = {"path": stats["state_dir"], "error": stats["state_store_error"]}
        if stats["state_store_error"]:
            body.update(status="unhealthy", **error_body(503, "state_store_unusable", stats["state_store_error"]))
            return JSON(body, status_code=503)
    return JSON(body)


@router.get("/ready")
async def ready(request: Request):
    edge = request.app.state.edge
    if not edge.is_ready:
        error = edge.not_ready()
        return JSON({"status": "not_ready", **error.body()}, status_code=503, headers={"Retry-After": "2"})
    return JSON({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request):
    edge = request.app.state.edge
    text = edge.metrics.render()
    if edge.is_ready:
        try:
            text = (await edge.engine.utility("metrics")).data + text
        except EngineDead:
            pass
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
