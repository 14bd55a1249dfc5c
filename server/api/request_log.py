"""One structured log line per finished generation request, on the logger `promptswap.requests`.

Each line carries the request id, the task and its prompt version, the token counts (prompt, virtual,
completion), the time to the first token and in all, and how it ended (finish reason, or the error's
type). Never the text. The fields travel in the record's `fields` attribute; server/process/logs.py writes
them as `key=value` pairs or as JSON (`--log-format`).
"""

from __future__ import annotations

import logging
from typing import Any

from server.api.metrics import Outcome
from server.api.request_id import current_request_id
from server.engine.handle import RequestHandle

log = logging.getLogger("promptswap.requests")


def finished(handle: RequestHandle, outcome: Outcome, error: BaseException | None = None) -> None:
    """An admitted request ended: completed, failed, or cancelled (its client left)."""
    ttft = handle.time_to_first_token
    _emit(outcome, error, task=handle.task, version=handle.version, prompt_tokens=handle.prompt_tokens,
          virtual_tokens=handle.virtual_tokens, completion_tokens=handle.generated_tokens,
          ttft_s=None if ttft is None else round(ttft, 4), total_s=round(handle.elapsed, 4),
          finish_reason=handle.finish_reason)


def refused(task: str | None, outcome: Outcome, error: BaseException) -> None:
    """A request refused before it ran (bad parameter, unknown task, queue full, ...). The task is the
    client's string, not yet checked: cut to what a task name can be (64 characters) and a little."""
    _emit(outcome, error, task=task if task is None or len(task) <= 80 else task[:80] + "...")


def _emit(outcome: Outcome, error: BaseException | None, **fields: Any) -> None:
    record = {"request_id": current_request_id(), "outcome": outcome, **fields}
    if error is not None:
        record["error"] = type(getattr(error, "error", error)).__name__  # ErrorInContext carries the error
    level = logging.WARNING if outcome == "server_error" else logging.INFO
    log.log(level, "request %s", outcome, extra={"fields": record})
