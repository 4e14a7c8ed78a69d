"""Pure ASGI, before any route: auth, readiness, the body-size limit, and the request counter."""
from __future__ import annotations

import secrets

from server.api.edge import Edge
from server.api.errors import APIError
from server.api.responses import error_response


class EdgeMiddleware:
    def __init__(self, app, edge: Edge):
        self.app = app
        self.edge = edge

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        edge, path = self.edge, scope["path"]
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = None
        if path.startswith("/v1"):
            headers = dict(scope["headers"])
            error = check_api_key(edge, headers.get(b"authorization", b"").decode("latin-1"))
            if error is None and not edge.is_ready:
                error = edge.not_ready()
            length = headers.get(b"content-length")
            if error is None and length is not None and length.isdigit() and int(length) > edge.config.max_body_bytes:
                error = body_too_large(edge)
        if error is not None:
            await error_response(error)(scope, receive, send_wrapper)
        else:
            received = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    received["n"] += len(message.get("body", b""))
                    if received["n"] > edge.config.max_body_bytes:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except BodyTooLarge:
                await error_response(body_too_large(edge))(scope, receive, send_wrapper)
        route = scope.get("route")
        edge.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()


class BodyTooLarge(Exception):
    pass


def body_too_large(edge: Edge) -> APIError:
    return APIError(413, "body_too_large", f"the body exceeds max_body_bytes ({edge.config.max_body_bytes})")


def check_api_key(edge: Edge, authorization: str) -> APIError | None:
    key = edge.config.api_key
    if key is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')",
                        "authorization")
    return None
