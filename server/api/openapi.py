"""The OpenAPI document: FastAPI's own, completed with what route signatures cannot say.

Each route declares the errors it raises itself (`responses=errors(404, 503)`). This module adds
what the edge answers for every operation (401 where a token is configured and required, 400 for a
body that cannot be parsed, 413 over the body limit, 500), gives every error status the one error
schema (FastAPI's default 422 shape is not what this server answers) and declares each operation's
bearer security.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.auth import token_rule
from server.api.errors import OPENAI_PATHS
from server.api.schemas import ErrorResponse
from server.config import Settings

ERROR_DESCRIPTIONS: dict[int | str, str] = {
    400: "Bad request: a body that cannot be parsed at all (not UTF-8, a malformed multipart form)",
    401: "The bearer token is missing or wrong; checked before the body is read",
    404: "Unknown task (or model)",
    405: "The server serves a fixed set of tasks (--read-only-prompts): prompts cannot be written here",
    412: "If-Match or If-None-Match does not hold: nothing was written; `current_version` is the task's version now",
    413: "The request body is over the limit",
    415: "Unsupported media type; the message names the one to send",
    422: "A field is missing, of the wrong type or out of range, or a task name breaks the naming rules; "
         "`param` names it",
    "openai-400": "Invalid request, in OpenAI's shape (the openai client raises BadRequestError): a field is "
                  "missing, of the wrong type or out of range, or the body cannot be parsed; `param` names it",
    500: "Internal error; the details are in the server log",
    503: "Overloaded, still starting (the model is loading: `starting_error`) or shutting down (see Retry-After), "
         "or the prompt directory is read-only or unavailable",
    507: "The prompt directory is full; deleting tasks frees it",
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}

# A streamed answer: each server-sent event is an object of its fields; `data` holds one JSON document.
SSE_CONTENT = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"event": {"type": "string", "description": "absent for a piece of output; `error` for an error"},
                   "data": {"type": "string", "description": "JSON (or OpenAI's final `[DONE]`)"}},
}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses` for the error statuses it raises itself."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _complete(doc, settings)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def _complete(doc: dict[str, Any], settings: Settings) -> None:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    schemas.pop("HTTPValidationError", None)  # FastAPI's 422 shape, replaced below
    schemas.pop("ValidationError", None)
    secured = False
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            if token_rule(settings, method.upper(), path) is not None:
                operation["security"] = [{"bearer": []}]
                responses["401"] = _error(401)
                secured = True
            if "requestBody" in operation:
                responses.setdefault("400", _error(400))  # undecodable bodies, refused by the framework
            responses.setdefault("413", _error(413))  # the body limit applies to every request
            responses.setdefault("500", _error(500))
            if "422" in responses:
                responses["422"] = _error(422)
            if path.startswith(OPENAI_PATHS):  # OpenAI's contract: an invalid request is a 400
                responses.pop("422", None)
                responses["400"] = _error("openai-400")
            operation["responses"] = dict(sorted(responses.items()))
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}


def _error(status: int | str) -> dict[str, Any]:
    return {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": _ERROR_REF}}}
