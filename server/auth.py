"""Bearer-token checks for the admin (prompt upload/delete) and API (generation) endpoints."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.errors import PromptswapError


class Unauthorized(PromptswapError):
    status_code = 401
    error_type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 -- read-only class constant

    def __init__(self, which: str) -> None:
        super().__init__(
            f"this endpoint needs 'Authorization: Bearer <{which} token>'; the header was missing or wrong",
            param="authorization",
        )


def check_bearer(request: Request, token: SecretStr | None, which: str) -> None:
    """Raise Unauthorized unless the request carries `token`. No token configured: open."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    # compare_digest runs in constant time, so the response time does not leak how much matched.
    ok = hmac.compare_digest(given.strip().encode(), expected)
    if scheme.lower() != "bearer" or not ok:
        raise Unauthorized(which)


def require_admin(request: Request) -> None:
    check_bearer(request, request.app.state.settings.admin_token, "admin")


def require_api(request: Request) -> None:
    check_bearer(request, request.app.state.settings.api_token, "api")
