"""Request size limits: the body's bytes, enforced before and while it is read, and list lengths.

A declared Content-Length over the limit is refused at once, before any byte of the body is
read. A body without one (chunked) or one that lies is counted as it streams in, and refused
as soon as it passes the limit, so a large upload never sits whole in memory.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import RequestBodyTooLarge, send_error
from server.engine.errors import InvalidParameter


def check_count(param: str, count: int, cap: int) -> None:
    """A list of requests (a batch, OpenAI's prompt list) holds at most `cap` entries."""
    if count > cap:
        raise InvalidParameter(param, f"at most {cap} entries (--max-batch-requests)", count)


class BodyLimitMiddleware:
    """Pure ASGI middleware; `limit_for(scope)` gives the limit of each request (uploads get more)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, RequestBodyTooLarge(limit, declared, exact=True), scope["path"])
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestBodyTooLarge(limit, received, exact=not message.get("more_body", False))
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
