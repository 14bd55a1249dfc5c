"""What `Engine.submit` returns: a caller's read-only view of one request plus `cancel()`, which only
marks the request (the engine loop drops it at its next step), so the handle never calls back into the
engine. Its output comes through the request's `OutputChannel` (channel.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.channel import Result
    from server.engine.results import TokenDelta
    from server.engine.sequence import Sequence


class RequestHandle:
    """A caller's view of one submitted request: what it is, its output, and `cancel()`."""

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    @property
    def id(self) -> int:
        return self._seq.id

    @property
    def task(self) -> str | None:
        return self._seq.task

    @property
    def version(self) -> int | None:
        """The version of the task's prompt this request runs with (None: the base model alone)."""
        return self._seq.prompt.version if self._seq.prompt is not None else None

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt_ids)

    @property
    def virtual_tokens(self) -> int:
        return self._seq.num_virtual

    @property
    def max_new_tokens(self) -> int:
        """After clamping to the context: what this request may generate at most."""
        return self._seq.params.max_new_tokens

    @property
    def generated_tokens(self) -> int:
        return len(self._seq.output_ids)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from submission to the first generated token (None before it)."""
        first = self._seq.first_token_time
        return None if first is None else first - self._seq.arrival_time

    @property
    def elapsed(self) -> float:
        """Seconds since submission."""
        return time.monotonic() - self._seq.arrival_time

    @property
    def done(self) -> bool:
        return self._seq.output.done

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the slot is freed at the engine's next step."""
        self._seq.cancelled = True

    def __iter__(self) -> Iterator[TokenDelta | Result]:
        return iter(self._seq.output)

    def result(self, timeout: float | None = None) -> Result:
        return self._seq.output.result(timeout)

    def stream(self) -> AsyncIterator[TokenDelta | Result]:
        return self._seq.output.stream()
