"""Send a trained adapter to a running server: PUT /prompts/{task}, multipart (weights + PEFT config)."""

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
        hint = " (set PROMPTSWAP_ADMIN_TOKEN to the server's admin token)" if exc.code == 401 else ""
        raise UploadFailed(f"{url} answered {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise UploadFailed(f"could not reach {url} ({reason}); is the server running?") from None
    except ValueError as exc:  # a 2xx that is not the server's JSON: not a promptswap server?
        raise UploadFailed(f"{url} answered, but not with a promptswap descriptor ({exc})") from None
