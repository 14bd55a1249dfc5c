"""Bearer tokens: which endpoints need which token, checked before a byte of the body is read.

`required_token` is the one table. `AuthMiddleware` applies it to every request before routing, so a
client without a token gets 401 rather than learning the schema from 400s and 422s (FastAPI would
run a route's dependencies only after parsing its body).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
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
    there too); health, metrics and the API docs are open, so load balancers and Prometheus reach them.
    OPTIONS is open: it only lists a path's methods, which the open API document shows anyway."""
    if method == "OPTIONS":
        return None
    if path == "/prompts" or path.startswith("/prompts/"):
        return "admin" if method in _WRITES else "api"
    if path.startswith(("/generate", "/v1/")) or path in ("/v1", "/tokenize", "/detokenize"):
        return "api"
    return None


@dataclass(frozen=True, slots=True)
class TokenRule:
    which: Token
    required: SecretStr
    also: SecretStr | None = None  # the admin token works wherever the API token does


def token_rule(settings: Settings, method: str, path: str) -> TokenRule | None:
    """The token a request must carry; None where it may come without (the endpoint is open, or its
    token is not configured)."""
    which = required_token(method, path)
    if which == "admin" and settings.admin_token is not None:
        return TokenRule("admin", settings.admin_token)
    if which == "api" and settings.api_token is not None:
        return TokenRule("api", settings.api_token, settings.admin_token)
    return None


def check_bearer(authorization: str, rule: TokenRule) -> None:
    """Raise Unauthorized unless the header carries the rule's token (or its other accepted one)."""
    scheme, _, given = authorization.partition(" ")
    given_bytes = given.strip().encode()
    # compare_digest runs in constant time, so the response time does not leak how much matched.
    # Both are compared every time, for the same reason.
    ok = [hmac.compare_digest(given_bytes, t.get_secret_value().encode()) for t in (rule.required, rule.also) if t]
    if scheme.lower() != "bearer" or not any(ok):
        raise Unauthorized(rule.which)


class AuthMiddleware:
    """Pure ASGI: a request whose endpoint needs a token it does not carry is answered 401 at once."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            rule = token_rule(self.settings, scope["method"], scope["path"])
            if rule is not None:
                try:
                    check_bearer(Headers(scope=scope).get("authorization", ""), rule)
                except Unauthorized as exc:
                    await send_error(send, exc, scope["path"])
                    return
        await self.app(scope, receive, send)
