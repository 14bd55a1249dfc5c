"""Bearer-token checks for the admin (prompt upload/delete) and API (generation) endpoints."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.engine.errors import PromptswapError


class Unauthorized(PromptswapError):
    status_code = 401
    error_type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 -- read-only class constant

    def __init__(self, which: str) -> None:
        super().__init__(
            f"this endpoint needs 'Authorization: Bearer <{which} token>'; the header was missing or wrong",
            param="authorization",
        )


def check_bearer(request: Request, required: SecretStr | None, also: SecretStr | None, which: str) -> None:
    """Raise Unauthorized unless the request carries `required` (or `also`). None required: open."""
    if required is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given_bytes = given.strip().encode()
    # compare_digest runs in constant time, so the response time does not leak how much matched.
    # Both are compared every time, for the same reason.
    ok = [hmac.compare_digest(given_bytes, t.get_secret_value().encode()) for t in (required, also) if t]
    if scheme.lower() != "bearer" or not any(ok):
        raise Unauthorized(which)


def require_admin(request: Request) -> None:
    check_bearer(request, request.app.state.settings.admin_token, None, "admin")


def require_api(request: Request) -> None:
    """Generation and reading; the admin token works here too (an admin may do what a client does)."""
    settings = request.app.state.settings
    check_bearer(request, settings.api_token, settings.admin_token, "api")
