"""Send a trained adapter to a running server: PUT /prompts/{task}, multipart (weights + PEFT config).

`check_server` asks the server, before training, whether it would take the upload at all: training takes
minutes, and a wrong URL or token found after them costs those minutes again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class UploadFailed(Exception):
    pass


class ServerCheckFailed(UploadFailed):
    """The server would not take an upload: unreachable, not serving, the admin token refused, read-only."""


_TOKEN_HINT = " (set PROMPTSWAP_ADMIN_TOKEN to the server's admin token)"
# Malformed on purpose (an ETag is quoted): see check_server.
_PROBE_IF_MATCH = "promptswap-train-check"


def check_server(server: str, task: str, admin_token: str | None, timeout_s: float = 10) -> None:
    """Whether `server` would take `task` now, or ServerCheckFailed saying why in one line. GET /health
    (open): it answers, and serves or is still starting. Then a PUT /prompts/{task} that writes nothing: it
    has no body and a malformed If-Match, which the server refuses (422) before it reads a body, but only
    after the admin token was checked (401) and writes were allowed (405 on a --read-only-prompts server)."""
    base = server.rstrip("/")
    status, error = _ask(urllib.request.Request(f"{base}/health"), timeout_s)
    reason = error.get("reason") or error.get("status")
    if status == 503 and reason != "starting":  # still loading is fine: training takes a while too
        raise ServerCheckFailed(f"{base} is not serving ({base}/health answered 503: {reason or 'unavailable'})")
    if status not in (200, 503):
        raise ServerCheckFailed(f"{base}/health answered {status}; is {base} a promptswap server?")
    headers = {"If-Match": _PROBE_IF_MATCH, "Content-Type": "application/octet-stream"}
    if admin_token:
        headers["Authorization"] = f"Bearer {admin_token}"
    url = f"{base}/prompts/{task}"
    status, error = _ask(urllib.request.Request(url, data=b"", headers=headers, method="PUT"), timeout_s)
    if status == 422 and error.get("param") == "If-Match":
        return  # authenticated and writable: the header was the only thing refused
    if status == 503 and error.get("type") == "starting_error":
        return  # the token was checked (before anything else); the model is still loading
    message = error.get("message") or "no promptswap error"
    if status == 401:
        problem = "refused the admin token given" if admin_token else "needs an admin token to store prompts"
        raise ServerCheckFailed(f"{base} {problem}{_TOKEN_HINT}")
    raise ServerCheckFailed(f"{url} would not take an upload: it answered {status}: {message}")


def _ask(request: urllib.request.Request, timeout_s: float) -> tuple[int, dict]:
    """(status, the answer's JSON object, or its `error` object); ServerCheckFailed if nothing answers."""
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerCheckFailed(f"could not reach {request.full_url} ({reason}); is the server running?") from None
    try:
        body = json.loads(raw)
    except ValueError:
        return status, {}
    if not isinstance(body, dict):
        return status, {}
    error = body.get("error")
    return status, error if isinstance(error, dict) else body


def upload(server: str, task: str, adapter_dir: Path, admin_token: str | None, timeout_s: float = 120) -> dict:
    """The server's descriptor of the stored task (its version and what it read), or UploadFailed saying why."""
    boundary = uuid.uuid4().hex
    parts = []
    for field, name in (("weights", "adapter_model.safetensors"), ("config", "adapter_config.json")):
        data = (adapter_dir / name).read_bytes()
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if admin_token:
        headers["Authorization"] = f"Bearer {admin_token}"
    url = f"{server.rstrip('/')}/prompts/{task}"
    request = urllib.request.Request(url, data=body, headers=headers, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # not our error shape: the body as it is
            detail = json.loads(detail)["error"]["message"]
        hint = _TOKEN_HINT if exc.code == 401 else ""
        raise UploadFailed(f"{url} answered {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise UploadFailed(f"could not reach {url} ({reason}); is the server running?") from None
    except ValueError as exc:  # a 2xx that is not the server's JSON: not a promptswap server?
        raise UploadFailed(f"{url} answered, but not with a promptswap descriptor ({exc})") from None
