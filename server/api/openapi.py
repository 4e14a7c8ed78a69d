"""The OpenAPI document says what the routes really take and answer. Routes read raw bodies (so that errors name
fields the contract's way and NaN reaches the schema); here each declares its request body by model and the error
statuses it can answer with, all as component schemas."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None
    type: str  # OpenAI's: invalid_request_error, authentication_error, rate_limit_error, server_error
    param: str | None  # OpenAI's name for `field`


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: {"error": {code, message, field, type, param}}."""

    error: ErrorDetail


_DESCRIPTIONS = {400: "Malformed request", 401: "Missing or wrong API key", 404: "No such session or model",
                 409: "The session is busy or cannot be restored", 413: "Over a size limit",
                 422: "A field's value is invalid", 429: "Queue or session limit reached (see Retry-After)",
                 503: "Not ready, or no free state slot (see Retry-After)",
                 507: "The session's state could not be saved"}
_MODELS: dict[str, type[BaseModel]] = {}


def body(model: type[BaseModel], required: bool = True) -> dict:
    """openapi_extra for a route whose JSON body follows `model`."""
    _MODELS[model.__name__] = model
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def errors(*statuses: int) -> dict:
    """The `responses` of a route: the error statuses it may answer with, all with the contract's body."""
    common = (400, 401, 503)
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in sorted(set(common + statuses))}


def install(app: FastAPI) -> None:
    """Add the request-body models to the document's components (FastAPI only adds models it validates)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="InfoMamba Serve: DESIGN.md §5 and the README's additions.")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _MODELS.items():
                found = model.model_json_schema(ref_template=REF)
                components.update(found.pop("$defs", {}))
                components[name] = found
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
