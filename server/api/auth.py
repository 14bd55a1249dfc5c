"""Bearer tokens: which endpoints need which token, checked before a byte of the body is read.

`required_token` is the one table. `AuthMiddleware` applies it to every request before routing, so a
client without a token gets 401 rather than learning the schema from 400s and 422s (FastAPI would
run a route's dependencies only after parsing its body).
"""

from __future__ import annotations

import hmac
from typing import Literal

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import Unauthorized, send_error
from server.config import Settings

Token = Literal["admin", "api"]
_WRITES = ("PUT", "PATCH", "POST", "DELETE")


def required_token(method: str, path: str) -> Token | None:
    """Prompt writes need the admin token; generation and reading need the API token (the admin token works
    there too); health, metrics and the API docs are open, so load balancers and Prometheus reach them."""
    if path == "/prompts" or path.startswith("/prompts/"):
        return "admin" if method in _WRITES else "api"
    if path.startswith(("/generate", "/v1/")) or path == "/v1":
        return "api"
    return None


def check_bearer(authorization: str, required: SecretStr | None, also: SecretStr | None, which: Token) -> None:
    """Raise Unauthorized unless the header carries `required` (or `also`). None required: open."""
    if required is None:
        return
    scheme, _, given = authorization.partition(" ")
    given_bytes = given.strip().encode()
    # compare_digest runs in constant time, so the response time does not leak how much matched.
    # Both are compared every time, for the same reason.
    ok = [hmac.compare_digest(given_bytes, t.get_secret_value().encode()) for t in (required, also) if t]
    if scheme.lower() != "bearer" or not any(ok):
        raise Unauthorized(which)


class AuthMiddleware:
    """Pure ASGI: a request whose endpoint needs a token it does not carry is answered 401 at once."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            which = required_token(scope["method"], scope["path"])
            if which is not None:
                s = self.settings
                required, also = (s.admin_token, None) if which == "admin" else (s.api_token, s.admin_token)
                try:
                    check_bearer(Headers(scope=scope).get("authorization", ""), required, also, which)
                except Unauthorized as exc:
                    await send_error(send, exc)
                    return
        await self.app(scope, receive, send)
