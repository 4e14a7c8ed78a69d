"""The hot routes called straight from the ASGI layer: completions, chat completions and a session's append and
generate skip FastAPI's router (a scan of every route), its dependency solving and its exception middleware, which
together cost more CPU than these routes' own work. The routes stay declared on their FastAPI routers, so the
OpenAPI document, the metrics' route labels and every other request are unchanged; an error a hot route raises is
answered by the app's own exception handlers."""
from __future__ import annotations

import inspect

from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import Route

from server.api.routes import chat, openai, sessions

HOT_ENDPOINTS = (openai.completions, chat.chat_completions, sessions.append_route, sessions.generate_route)


class HotRoutes:
    """Pure ASGI, inside EdgeMiddleware (auth, readiness and body limits still apply)."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app = app
        self.exact: dict[str, Route] = {}  # path -> route, for routes without path parameters
        self.patterned: list[Route] = []
        # the routers' own routes (FastAPI's app.routes holds included routers, not their routes)
        for route in (r for router in (openai.router, chat.router, sessions.router) for r in router.routes):
            if getattr(route, "endpoint", None) in HOT_ENDPOINTS and route.methods == {"POST"}:
                if route.dependencies or route.response_model is not None:  # FastAPI's machinery, skipped here
                    raise ValueError(f"hot route {route.path} declares dependencies or a response model")
                if route.param_convertors:
                    self.patterned.append(route)
                else:
                    self.exact[route.path] = route
        self.handlers = {cls: handler for cls, handler in fastapi_app.exception_handlers.items()
                         if isinstance(cls, type) and cls is not Exception}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        route, params = self.exact.get(path), None
        if route is None:
            for candidate in self.patterned:
                match = candidate.path_regex.match(path)
                if match:
                    route = candidate
                    params = {k: route.param_convertors[k].convert(v) for k, v in match.groupdict().items()}
                    break
            else:
                return await self.app(scope, receive, send)
        scope["route"] = route
        scope["path_params"] = params or {}
        request = Request(scope, receive, send)
        try:
            response = await (route.endpoint(request) if params is None else route.endpoint(**params,
                                                                                           request=request))
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
