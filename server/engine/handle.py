"""The hand-off between the engine thread and a request's caller.

`OutputChannel` is part of the request (`Sequence.output`): the engine thread pushes each text
delta, then the Completion or the error; callers read from any thread (blocking) or from an
asyncio loop (awaiting, woken with `call_soon_threadsafe`, so an HTTP handler never blocks its
event loop on the engine). `RequestHandle` is what `Engine.submit` returns: a read-only view of
the request plus `cancel()`, which only marks the request (the engine loop drops it at its next
step), so the handle never calls back into the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    from server.engine.sequence import ChoiceScores, Completion, Sequence, TokenDelta

    Result: TypeAlias = Completion | ChoiceScores  # generated text, or scored choices
    Item: TypeAlias = TokenDelta | Result | BaseException


class OutputChannel:
    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._final: Result | BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the request has ended (its Completion or error is in the channel)."""
        return self._final is not None

    # -- engine side ---------------------------------------------------------------------------

    def push(self, delta: TokenDelta) -> None:
        self._put(delta)

    def complete(self, completion: Result) -> None:
        self._put(completion, last=True)

    def fail(self, error: BaseException) -> None:
        self._put(error, last=True)

    def _put(self, item: Item, last: bool = False) -> None:
        with self._cond:
            if self._final is not None:
                return  # ended already: nothing after the last item
            self._items.append(item)
            if last:
                self._final = item  # type: ignore[assignment]  # the last item is never a TokenDelta
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its reader is gone
                loop.call_soon_threadsafe(event.set)

    # -- caller side ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TokenDelta | Result]:
        """Blocking: each TokenDelta as it is made, then the Completion; raises the request's error."""
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item is self._final:
                return

    def result(self, timeout: float | None = None) -> Result:
        """Block until the request ends; return its Completion or raise its error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout=timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
            final = self._final
        if isinstance(final, BaseException):
            raise final
        assert final is not None
        return final

    async def stream(self) -> AsyncIterator[TokenDelta | Result]:
        """Async: each TokenDelta as it is made, then the Completion; raises the request's error."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(entry)
        try:
            while True:
                with self._cond:
                    item = self._items.popleft() if self._items else None
                    if item is None:
                        event.clear()
                if item is None:
                    await event.wait()
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item is self._final:
                    return
        finally:
            with self._cond:
                self._waiters.remove(entry)


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
