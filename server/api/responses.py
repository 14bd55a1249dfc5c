"""The answer to a generating request, written once for /generate, /v1/completions and /v1/chat/completions.

The three APIs differ only in their JSON: each route hands `answer` a `Reply` that writes its own shapes, and
`answer` does the rest the same way for all. Without `stream` it waits for the results (cancelled if the client
hangs up). With `stream` it waits for the first item before answering, so an error that comes before any token
still gets its own status code; after that the status line is sent, and an error is an event in the stream.
Leaving early (error, client gone) cancels the requests still running.

A request of `n` samples has `n` handles (a SampleGroup), flattened request-major and sample-minor: the
Reply sees each handle's index and maps it to its own numbering.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from server.api import streaming
from server.api.errors import describe
from server.api.metrics import Metrics
from server.api.streaming import Event, Result, unless_disconnected
from server.engine.handle import RequestHandle
from server.engine.results import Completion, TokenDelta

Item = tuple[int, Event]  # an item of the stream, tagged with its request's index

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


class Reply(ABC):
    """One API's shapes for one request's answer. Each dict a hook returns is one server-sent event's JSON."""

    error_event: str | None = None  # the event name an error in the stream is sent under (None: a plain event)
    done: str | None = None  # the stream's last event, after an error too (OpenAI's [DONE])

    @abstractmethod
    def full(self, results: list[Result]) -> Any:
        """The whole answer, without `stream`: the results in the order of the requests."""

    def opening(self) -> list[dict]:
        """The events before the first item."""
        return []

    @abstractmethod
    def piece(self, index: int, delta: TokenDelta) -> dict:
        """The event for a new piece of request `index`'s output."""

    @abstractmethod
    def final(self, index: int, completion: Completion) -> dict:
        """The event that ends request `index`'s output."""

    def closing(self, completions: list[Completion]) -> list[dict]:
        """The events after every request's final one (`completions` in the order of the requests)."""
        return []

    def error(self, exc: BaseException) -> dict:
        """The event for an error once the stream has started (its status line is sent already)."""
        return describe(exc)[1]


async def answer(request: Request, handles: list[RequestHandle], metrics: Metrics, reply: Reply, *, stream: bool,
                 name: str | None = None, owners: list[int] | None = None) -> Any:
    """`reply.full(results)`, or with `stream` a StreamingResponse of the reply's events.

    `name`: the requests are the entries of the body's list of that name (a failure names `name[i]`, i the entry
    `owners` gives for the handle: samples.owners); None: the one request of `handles` (its samples), its
    failure as it is. Several handles' streams interleave as items come.
    """
    if not stream:
        work = streaming.all_results(handles, metrics, name, owners)
        return reply.full(await unless_disconnected(request, work))
    single = name is None and len(handles) == 1
    items = _tagged(handles, metrics) if single else streaming.merged(handles, metrics)
    try:
        # Wait for the first item before answering, so an error that comes before any token
        # still gets its own status code instead of a 200 with an error event.
        first = await unless_disconnected(request, anext(items))
    except BaseException:
        await items.aclose()
        raise
    return StreamingResponse(_events(reply, first, items, len(handles)), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _tagged(handles: list[RequestHandle], metrics: Metrics) -> AsyncGenerator[Item, None]:
    """The one request's items, tagged as `streaming.merged` tags several requests' (index 0)."""
    [handle] = handles
    async with contextlib.aclosing(streaming.events(handle, metrics)) as events:
        async for item in events:
            yield 0, item


async def _events(reply: Reply, first: Item, items: AsyncGenerator[Item, None], n: int) -> AsyncIterator[bytes]:
    """The stream's body: the reply's events for every item, until all `n` requests have given their final one."""
    finished: dict[int, Completion] = {}
    item = first
    try:
        for data in reply.opening():
            yield sse(data)
        while True:
            index, event = item
            if isinstance(event, TokenDelta):
                yield sse(reply.piece(index, event))
            elif isinstance(event, Completion):  # (a streaming request never scores choices)
                finished[index] = event
                yield sse(reply.final(index, event))
                if len(finished) == n:
                    break
            item = await anext(items)
        for data in reply.closing([finished[i] for i in sorted(finished)]):
            yield sse(data)
    except Exception as exc:  # the status line is sent already: report the error in the stream
        yield sse(reply.error(exc), event=reply.error_event)
    finally:
        await items.aclose()
    if reply.done is not None:
        yield sse(reply.done)


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event carrying JSON (or a bare string such as OpenAI's [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
