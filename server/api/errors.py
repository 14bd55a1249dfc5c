"""The one place where an error becomes an HTTP response: `{"error": {"type", "message", "param"}}`.

Domain errors carry their own status (`status_code`); request-shape errors from FastAPI become
422 naming the field; anything unexpected is a 500 that hides the traceback from the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import PromptError
from server.engine.errors import PromptswapError, RequestCancelled

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "overloaded_error",
}


def error_payload(error_type: str, message: str, param: str | None) -> dict:
    return {"error": {"type": error_type, "message": message, "param": param}}


def describe(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, body, headers) for any exception; streaming routes use it for their error event."""
    if isinstance(exc, RequestCancelled):
        # A client that cancelled is gone and reads nothing; one still waiting was cancelled by a
        # shutdown, which is the server's doing, not the client's (the engine's 499 would blame it).
        return 503, error_payload("overloaded_error", f"{exc.message} (the server is shutting down)", None), {
            "Retry-After": "5"}
    if isinstance(exc, PromptswapError | PromptError):
        status = exc.status_code
        error_type = getattr(exc, "error_type", None) or _type_for(status)
        headers = dict(getattr(exc, "headers", None) or {})
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return status, error_payload(error_type, exc.message, exc.param), headers
    if isinstance(exc, RequestValidationError):
        return 422, _validation_payload(exc), {}
    if isinstance(exc, StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        param = getattr(exc, "param", None)
        return exc.status_code, error_payload(_type_for(exc.status_code), message, param), dict(exc.headers or {})
    log.error("unexpected error", exc_info=exc)
    return 500, error_payload("server_error", "internal error; see the server log", None), {}


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = describe(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handler(app: FastAPI) -> None:
    for cls in (PromptswapError, PromptError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle_error)


def _type_for(status: int) -> str:
    if status >= 500:
        return _TYPE_BY_STATUS.get(status, "server_error")
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def _validation_payload(exc: RequestValidationError) -> dict:
    """Name the first bad field as the client wrote it (`requests[2].temperature`) and what was wrong."""
    errors = exc.errors()
    if not errors:
        return error_payload("invalid_request_error", "invalid request", None)
    first = errors[0]
    if first.get("type") == "json_invalid":  # the body as a whole, not an element of it
        return error_payload("invalid_request_error", f"the request body is not valid JSON: {first.get('msg')}",
                             "body")
    param = _param_from_loc(first.get("loc", ()))
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    if first.get("type") != "missing" and "input" in first:
        message += f", got {_short(first['input'])}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_payload("invalid_request_error", message, param)


# Union members appear in pydantic's error locations (`stop.list[str].0`); the client never wrote them.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param_from_loc(loc: tuple | list) -> str | None:
    parts = [
        p for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))
    ]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
