"""Pure ASGI, before any route: auth, readiness, the body-size limit, and the request counter."""
from __future__ import annotations

import secrets
from typing import Callable

from server import hops
from server.api.edge import Edge
from server.api.errors import APIError
from server.api.responses import error_response


class EdgeMiddleware:
    def __init__(self, app, get_edge: Callable[[], Edge]):
        """get_edge: the Edge, which the lifespan creates after the middleware is built."""
        self.app = app
        self.get_edge = get_edge

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        edge = self.get_edge()
        config = edge.config
        status = 500
        traced = hops.enabled() and scope["path"] == "/v1/completions"
        if traced:
            hops.mark("fe.http_in")

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif traced and message["type"] == "http.response.body" and not message.get("more_body"):
                hops.mark("fe.http_out")  # as it is handed over: the client may answer before the send returns
            await send(message)

        error = None
        if scope["path"].startswith("/v1"):
            authorization = length = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value
                elif name == b"content-length":
                    length = value
            if config.api_key is not None:
                error = check_api_key(edge, (authorization or b"").decode("latin-1"))
            if error is None and not edge.is_ready:
                error = edge.not_ready()
            if error is None and length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                error = body_too_large(edge)
        if error is not None:
            await error_response(error)(scope, receive, send_wrapper)
        else:
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > config.max_body_bytes:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except BodyTooLarge:
                await error_response(body_too_large(edge))(scope, receive, send_wrapper)
        edge.metrics.count_request(getattr(scope.get("route"), "path", "unmatched"), status)


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
