"""Bearer-token checks for the admin (prompt upload/delete) and API (generation) endpoints."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.api.deps import get_settings
from server.api.errors import Unauthorized


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
    check_bearer(request, get_settings(request).admin_token, None, "admin")


def require_api(request: Request) -> None:
    """Generation and reading; the admin token works here too (an admin may do what a client does)."""
    settings = get_settings(request)
    check_bearer(request, settings.api_token, settings.admin_token, "api")
