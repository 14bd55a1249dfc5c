"""The HTTP layer's own errors, and the one place where any error becomes an HTTP response.

Every error answer is `{"error": {"type", "message", "param"}}`. `HTTP_ERRORS` is the one table
from error classes (the engine's, the prompt store's and this layer's) to status, error type and
headers; request-shape errors from FastAPI become 422 naming the field; anything unexpected is a
500 that hides the traceback from the client.

Exceptions are never rewritten in flight. Where a route's client names a thing differently from
the engine (OpenAI's `prompt[i]` for the engine's `text`, `requests[3].text` inside a batch), the
route raises `ErrorInContext(error, ErrorContext(...))` and `describe` applies the context.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_store.errors import (
    BodyTooLarge,
    PreconditionFailed,
    PromptError,
    StorageError,
    StorageFull,
    UnknownTask,
)
from server.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidParameter,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestTooLong,
)

log = logging.getLogger(__name__)


# -- this layer's errors -----------------------------------------------------------------------


class ApiError(Exception):
    """Base of the errors the HTTP edge itself raises (before the engine or the store is asked)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Unauthorized(ApiError):
    def __init__(self, which: str) -> None:
        super().__init__(
            f"this endpoint needs 'Authorization: Bearer <{which} token>'; the header was missing or wrong",
            param="authorization",
        )


class UnsupportedMediaType(ApiError):
    pass


class ServerStarting(ApiError):
    """The model (or the prompts) is still loading: `promptswap serve` answers before it is ready."""

    def __init__(self) -> None:
        super().__init__("the server is starting: the model is still loading; retry after the Retry-After seconds "
                         "(GET /health answers 200 once it is ready)")


class ReadOnlyPrompts(ApiError):
    def __init__(self) -> None:
        super().__init__("this server serves a fixed set of tasks (--read-only-prompts): prompts cannot be uploaded, "
                         "changed or deleted here", param="method")


class RequestBodyTooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI's body parsing re-raises it as is instead of wrapping it in a 400."""

    def __init__(self, limit: int, actual: int, exact: bool) -> None:
        amount = f"{actual} bytes" if exact else f"more than {actual - 1} bytes"
        super().__init__(413, f"request body must be at most {limit} bytes, got {amount}")


class JsonTooDeep(StarletteHTTPException):
    """JSON nested deeper than the server parses (server/api/json_body.py). An HTTPException, as
    RequestBodyTooLarge is, so that FastAPI's body parsing re-raises it as is instead of calling it undecodable."""

    def __init__(self, limit: int, param: str = "body") -> None:
        super().__init__(422, f"{param} must be JSON nested at most {limit} levels deep (arrays and objects inside "
                              f"one another), got deeper")
        self.param = param


# -- the one mapping -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    type: str
    param: str | None = None  # used when the error names none
    headers: Mapping[str, str] = field(default_factory=dict)


_INVALID = "invalid_request_error"
_OVERLOADED = "overloaded_error"
_STORAGE = "storage_error"  # the prompt directory failed; the upload itself was fine
_STARTING = "starting_error"  # not yet: the model is loading

# Looked up along each exception's class hierarchy: the most specific class listed wins.
HTTP_ERRORS: dict[type[BaseException], HttpError] = {
    # prompt store
    PromptError: HttpError(422, _INVALID),
    UnknownTask: HttpError(404, "not_found_error"),
    PreconditionFailed: HttpError(412, "precondition_error"),
    BodyTooLarge: HttpError(413, _INVALID),
    StorageError: HttpError(503, _STORAGE),  # read-only, not writable, failing
    StorageFull: HttpError(507, _STORAGE),
    # engine
    EngineError: HttpError(400, _INVALID),
    InvalidParameter: HttpError(422, _INVALID),
    RequestTooLong: HttpError(422, _INVALID),
    QueueFull: HttpError(503, _OVERLOADED, headers={"Retry-After": "1"}),
    EngineStopped: HttpError(503, _OVERLOADED, headers={"Retry-After": "5"}),
    # Nobody reads it (the client has gone); logged as nginx's "client closed request".
    RequestCancelled: HttpError(499, _INVALID),
    RequestFailed: HttpError(500, "server_error"),
    # this layer
    ApiError: HttpError(400, _INVALID),
    Unauthorized: HttpError(401, "authentication_error", headers={"WWW-Authenticate": "Bearer"}),
    UnsupportedMediaType: HttpError(415, _INVALID),
    ServerStarting: HttpError(503, _STARTING, headers={"Retry-After": "5"}),
    ReadOnlyPrompts: HttpError(405, _INVALID, headers={"Allow": "GET, HEAD, OPTIONS"}),
    RequestBodyTooLarge: HttpError(413, _INVALID, param="body"),
    JsonTooDeep: HttpError(422, _INVALID, param="body"),
    # The client hung up while sending its body: nobody reads the answer, and it is no server error.
    ClientDisconnect: HttpError(499, _INVALID, param="body"),
}

# FastAPI answers a body it could not even decode (not UTF-8) with this 400; the API promises a 422 naming it.
_UNPARSABLE_BODY = "There was an error parsing the body"


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """How the client names what an error is about, when that differs from the error's own words."""

    prefix: str | None = None  # the list entry the error is about: "requests[3]" -> "requests[3].text"
    # the error's param -> the client's name (also where the message starts with the param's name)
    rename: Mapping[str, str] = field(default_factory=dict)
    hints: Mapping[str, str] = field(default_factory=dict)  # the client's param -> words added to the message

    def apply(self, param: str | None, message: str) -> tuple[str | None, str]:
        if param is not None and param in self.rename:
            if message.startswith(f"{param} "):
                message = self.rename[param] + message[len(param):]
            param = self.rename[param]
        if param is not None and param in self.hints:
            # after a question (`did you mean 'x'?`) a new sentence, not a second clause
            message = f"{message}{' ' if message.endswith('?') else '; '}{self.hints[param]}"
        if self.prefix is not None:
            param = f"{self.prefix}.{param}" if param else self.prefix
            message = f"{self.prefix}: {message}"
        return param, message


class ErrorInContext(Exception):
    """Carries an error out of a route together with the context to describe it in; the error is untouched."""

    def __init__(self, error: BaseException, context: ErrorContext) -> None:
        super().__init__(str(error))
        self.error = error
        self.context = context


def error_payload(error_type: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, "param": param}}


def status_of(exc: BaseException) -> int:
    """The status `describe` answers `exc` with, without describing (or logging) it."""
    if isinstance(exc, ErrorInContext):
        exc = exc.error
    mapped = _lookup(exc)
    if mapped is not None:
        return mapped.status
    if isinstance(exc, RequestValidationError):
        return 422
    if isinstance(exc, StarletteHTTPException):
        return 422 if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY else exc.status_code
    return 500


def describe(exc: BaseException, context: ErrorContext | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for any exception; streaming routes use it for their error event."""
    if isinstance(exc, ErrorInContext):
        context = exc.context
        exc = exc.error
    mapped = _lookup(exc)
    if mapped is not None:
        message = str(getattr(exc, "message", None) or getattr(exc, "detail", None) or exc)
        param = getattr(exc, "param", None) or mapped.param
        if context is not None:
            param, message = context.apply(param, message)
        body = error_payload(mapped.type, message, param)
        if isinstance(exc, PreconditionFailed):  # the writer re-reads from here: no second request needed
            body["error"]["current_version"] = exc.current_version
        return mapped.status, body, dict(mapped.headers)
    if isinstance(exc, RequestValidationError):
        body = _validation_payload(exc)
        if context is not None:
            error = body["error"]
            error["param"], error["message"] = context.apply(error["param"], error["message"])
        return 422, body, {}
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
        return 422, error_payload(_INVALID, "body must be JSON in UTF-8, got bytes that do not decode", "body"), {}
    if isinstance(exc, StarletteHTTPException):  # routing: 404 unknown path, 405 wrong method
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return exc.status_code, error_payload(_type_for(exc.status_code), message, None), dict(exc.headers or {})
    log.error("unexpected error", exc_info=exc)
    return 500, error_payload("server_error", "internal error; see the server log", None), {}


OPENAI_PATHS = "/v1/"


def in_openai_shape(status: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """OpenAI's contract, for /v1/*: a request the client got wrong is a 400 (the openai client raises
    BadRequestError), and the error object carries `code` (OpenAI's "model_not_found" for an unknown model)."""
    error = dict(body["error"])
    error["code"] = "model_not_found" if status == 404 and error.get("param") == "model" else None
    return (400 if status == 422 else status), {"error": error}


def describe_for(path: str, exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """`describe(exc)` as the API at `path` answers it: OpenAI's shape on /v1/*, promptswap's own elsewhere."""
    status, body, headers = describe(exc)
    if path.startswith(OPENAI_PATHS):
        status, body = in_openai_shape(status, body)
    return status, body, headers


async def send_error(send: Send, exc: BaseException, path: str = "") -> None:
    """Answer with `exc` straight from an ASGI middleware, before any route (or the body) is reached."""
    status, body, headers = describe_for(path, exc)
    raw = json.dumps(body).encode()
    header_list = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    header_list += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    # No "Connection: close": closing with the body still arriving makes the kernel reset the
    # connection, and the client sees a reset instead of this answer. Kept open, uvicorn reads and
    # discards the rest of the body (never buffering it) and the client reads the answer.
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})


async def handle_error(request: Request, exc: Exception) -> Response:
    if (isinstance(exc, RequestValidationError) and not _is_json(request.headers.get("content-type"))
            and any(e.get("loc", ())[:1] == ("body",) for e in exc.errors())):
        # FastAPI reads only JSON bodies as JSON; any other declared type fails validation as a whole.
        got = request.headers.get("content-type", "").split(";")[0].strip()
        exc = UnsupportedMediaType(f"send the body as application/json, got {got}", param="content-type")
    elif isinstance(exc, RequestValidationError):
        hints = _field_hints(request, exc)
        if hints:
            exc = ErrorInContext(exc, ErrorContext(hints=hints))
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        # Starlette names only the first route whose path matched; the client needs every method.
        allow = {"Allow": ", ".join(_allowed_methods(request))}
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=allow)
        exc = StarletteHTTPException(405, f"{request.method} is not allowed here; allowed: {allow['Allow']}", allow)
    status, body, headers = describe_for(request.url.path, exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    """No declared type (FastAPI then reads JSON), application/json, or a +json type."""
    if not content_type:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches at this path (asked of the router, nested routers included)."""
    allowed = {"OPTIONS"}
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.add(method)
    return sorted(allowed)


def install_error_handler(app: FastAPI) -> None:
    """Known errors are answered by FastAPI's exception handlers; anything else by UnexpectedErrorMiddleware."""
    for cls in (*HTTP_ERRORS, ErrorInContext, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(cls, handle_error)


class UnexpectedErrorMiddleware:
    """An unexpected error is one 500 and one log line, and the keep-alive connection stays usable.

    Starlette's own handler for `Exception` re-raises after answering: uvicorn then logs a second
    traceback and resets the connection, so the client's next request on it fails. This sits outside
    every other middleware of ours and never re-raises.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if not started:
                await send_error(send, exc, scope.get("path", ""))  # describe() logs it, once
                return
            # Too late for a status: ending the body would pass a truncated answer off as whole, so
            # the response is left incomplete and uvicorn closes the connection.
            log.error("unexpected error after the response started; closing the connection", exc_info=exc)


def _lookup(exc: BaseException) -> HttpError | None:
    for cls in type(exc).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return None


def _type_for(status: int) -> str:
    if status >= 500:
        return _OVERLOADED if status == 503 else "server_error"
    return {401: "authentication_error", 404: "not_found_error"}.get(status, _INVALID)


def _validation_payload(exc: RequestValidationError) -> dict[str, Any]:
    """Name the first bad field as the client wrote it (`requests[2].temperature`) and what was wrong."""
    errors = exc.errors()
    if not errors:
        return error_payload(_INVALID, "invalid request", None)
    # A value that fits no member of a union fails once per member: the deepest location is the
    # member the client meant (prompt[1] inside a list, rather than "prompt is not a string").
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":  # the body as a whole, not an element of it
        return error_payload(_INVALID, f"the request body is not valid JSON: {first.get('msg')}", "body")
    param = _param_from_loc(first.get("loc", ()))
    message = f"{param or 'body'}: {_MESSAGES.get(first.get('type', ''), first.get('msg', 'invalid value'))}"
    if first.get("type") != "missing" and "input" in first:
        message += f", got {_short(first['input'])}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_payload(_INVALID, message, param)


# Clearer words than pydantic's for what clients get wrong in practice.
_MESSAGES = {
    "string_unicode": "must be text that can be encoded as UTF-8 (no lone surrogate code points)",
}

# Union members appear in pydantic's error locations (`stop.list[str].0`); the client never wrote them.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field_hints(request: Request, exc: RequestValidationError) -> dict[str, str]:
    """For each field a body may not have (promptswap's own bodies forbid unknown fields), the closest fields
    it does have: OpenAI's `max_tokens` sent to /generate gets `did you mean 'max_new_tokens'?`. The names come
    from the route's body model, so a hint never names a field the endpoint does not take."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    body_params = getattr(dependant, "body_params", None) or []
    if len(body_params) != 1:  # several body parameters are embedded under their names: not ours
        return {}
    root = body_params[0].field_info.annotation
    hints = {}
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if error.get("type") != "extra_forbidden" or loc[:1] != ("body",) or len(loc) < 2:
            continue
        model = _model_at(root, loc[1:-1])
        if model is None:
            continue
        names = [f.alias or name for name, f in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), names, n=3)
        param = _param_from_loc(loc)
        if close and param is not None:
            hints[param] = f"did you mean {' or '.join(repr(name) for name in close)}?"
    return hints


def _model_at(annotation: Any, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model of the object at `path` (field names; list indices are skipped) inside a body of `annotation`."""
    model = _model_in(annotation)
    for part in path:
        if isinstance(part, int):
            continue  # an entry of a list: its model is the list's
        field_info = model.model_fields.get(part) if model is not None else None
        if field_info is None:
            return None
        model = _model_in(field_info.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: itself, or inside list[...], X | None and the like."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def _param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [
        p for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or p.startswith("constrained-")))
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
