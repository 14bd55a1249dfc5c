"""The hand-off between the engine thread and a request's caller.

`OutputChannel` is part of the request (`Sequence.output`): the engine thread pushes each text
delta, then the result or the error; callers read from any thread (blocking) or from an asyncio
loop (awaiting, woken with `call_soon_threadsafe`, so an HTTP handler never blocks its event loop
on the engine). It knows nothing of the request it carries (`handle.py` is the caller's view).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    from server.engine.results import ChoiceScores, Completion, TokenDelta

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
