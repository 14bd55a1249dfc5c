"""A caller's side of one request: its tokens as they come, its result, or its error.

The engine thread pushes; callers read from any thread (blocking) or from an asyncio loop
(awaiting). The async side is woken with `call_soon_threadsafe`, so an HTTP handler never blocks
its event loop on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator

from server.engine.sequence import Completion, Sequence, TokenDelta


class RequestHandle:
    def __init__(self, seq: Sequence, engine) -> None:
        self._seq = seq
        self._engine = engine
        self._items: deque[TokenDelta | Completion | BaseException] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done = False
        self._final: Completion | BaseException | None = None

    @property
    def id(self) -> int:
        return self._seq.id

    @property
    def task(self) -> str | None:
        return self._seq.task

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

    # -- engine side ---------------------------------------------------------------------------

    def push(self, item: TokenDelta) -> None:
        self._put(item)

    def complete(self, completion: Completion) -> None:
        self._put(completion, last=True)

    def fail(self, error: BaseException) -> None:
        self._put(error, last=True)

    def _put(self, item, last: bool = False) -> None:
        with self._cond:
            if self._done:
                return
            self._items.append(item)
            if last:
                self._done, self._final = True, item
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its reader is gone
                loop.call_soon_threadsafe(event.set)

    # -- caller side ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the slot is freed at the next step."""
        self._engine.cancel(self._seq)

    def __iter__(self) -> Iterator[TokenDelta | Completion]:
        """Blocking: each TokenDelta as it is made, then the Completion; raises the request's error."""
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; return its Completion or raise its error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout=timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            final = self._final
        if isinstance(final, BaseException):
            raise final
        return final

    async def stream(self) -> AsyncIterator[TokenDelta | Completion]:
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
                if isinstance(item, Completion):
                    return
        finally:
            with self._cond:
                self._waiters.remove(entry)

    async def aresult(self) -> Completion:
        async for item in self.stream():
            if isinstance(item, Completion):
                return item
        raise RuntimeError("stream ended without a result")  # unreachable: stream ends on a Completion
