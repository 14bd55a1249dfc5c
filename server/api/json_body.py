"""JSON as the server parses it: request bodies (every route's, through JsonRoute) and JSON inside uploads.

A body nested deeper than MAX_JSON_DEPTH is refused with its own 422 naming the limit. Without the bound, a
body like `[[[[...]]]]` 100,000 deep makes Python's parser raise RecursionError, which FastAPI reports as a
body that does not decode; one nested a few hundred deep parses, and then costs recursion in everything that
walks it (validation, schema compilation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.api.errors import JsonTooDeep

# Arrays and objects inside one another, the outermost counting 1 (serde_json's default limit). A JSON schema in
# response_format sits 4 levels down and spends 2 per nested property: dozens of levels of schema fit.
MAX_JSON_DEPTH = 128


def parse_json(raw: bytes | str, param: str = "body") -> Any:
    """json.loads(raw), refusing JSON nested deeper than MAX_JSON_DEPTH (JsonTooDeep naming `param`); any other
    fault is json.loads's own error (JSONDecodeError, UnicodeDecodeError), as FastAPI expects."""
    try:
        value = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's recursion limit: far over ours
        raise JsonTooDeep(MAX_JSON_DEPTH, param) from None
    # Fewer brackets than the limit cannot nest past it: most bodies are not walked at all.
    opened = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if opened > MAX_JSON_DEPTH and nests_deeper(value, MAX_JSON_DEPTH):
        raise JsonTooDeep(MAX_JSON_DEPTH, param)
    return value


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value has arrays and objects more than `limit` inside one another (the outermost
    counting 1). Level by level, without recursion; it stops at the limit. Costs about what parsing did."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        below: list[Any] = []
        for item in level:
            below += [child for child in (item.values() if type(item) is dict else item)
                      if type(child) is dict or type(child) is list]
        if not below:
            return False
        level = below
    return True


class _BoundedJsonRequest(Request):
    """A request whose JSON body FastAPI reads through parse_json."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """Every router's route class: FastAPI's handling, with the body's JSON parsed by parse_json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handle(_BoundedJsonRequest(request.scope, request.receive))

        return bounded
