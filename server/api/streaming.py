"""One request's trip through the engine as the HTTP routes see it: submit, stream or wait, cancel.

Both APIs (/generate and /v1/completions) go through here, so metrics, cancellation on client
disconnect and error handling are written once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from prompt_store.errors import InvalidTaskName, UnknownTask
from server.engine.errors import InvalidParameter, PromptswapError, RequestCancelled
from server.api.metrics import UNKNOWN_LABEL, Metrics, RequestTimer, task_label
from server.engine.sequence import Completion, SamplingParams, TokenDelta

T = TypeVar("T")


class Generation:
    """An admitted request: its engine handle and its metrics timer."""

    def __init__(self, handle, timer: RequestTimer) -> None:
        self.handle = handle
        self.timer = timer

    async def events(self) -> AsyncIterator[TokenDelta | Completion]:
        """The engine's stream; the last item is the Completion. Leaving early cancels the request."""
        try:
            async for item in self.handle.stream():
                if isinstance(item, Completion):
                    self.timer.tokens_made(item.usage.completion_tokens - self.timer.tokens)
                    self.timer.finish("ok")
                else:
                    self.timer.tokens_made(len(item.token_ids))
                yield item
        except RequestCancelled:
            self.timer.finish("cancelled")
            raise
        except Exception:
            self.timer.finish("error")
            raise
        finally:
            if not self.timer.done:  # the consumer left (client gone, shutdown): free the slot
                self.handle.cancel()
                self.timer.finish("cancelled")

    async def result(self) -> Completion:
        completion = None
        async for item in self.events():
            completion = item
        assert isinstance(completion, Completion), "the engine's stream must end with a Completion"
        return completion


async def all_results(gens: list[Generation], name: str) -> list[Completion]:
    """Every request's Completion, in order; the first failure (named `name[i]`) cancels the rest."""
    tasks = [asyncio.ensure_future(g.result()) for g in gens]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for i, task in enumerate(tasks):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise with_param_prefix(task.exception(), f"{name}[{i}]")
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


def submit(engine, metrics: Metrics, text: str, task: str | None, params: SamplingParams) -> Generation:
    """Hand a request to the engine (returns at once); a refusal is counted and re-raised."""
    try:
        handle = engine.submit(text, task=task, params=params)
    except Exception as exc:
        unknown = isinstance(exc, UnknownTask | InvalidTaskName)
        metrics.rejected(UNKNOWN_LABEL if unknown else task_label(task))
        raise
    return Generation(handle, metrics.timer(task))


def sampling_params(cap: int, *, max_new_tokens: int | None, param_name: str = "max_new_tokens", **kw):
    """SamplingParams with the server's cap on max_new_tokens; ranges are checked by SamplingParams."""
    if max_new_tokens is None:
        max_new_tokens = min(64, cap)
    elif isinstance(max_new_tokens, int) and max_new_tokens > cap:
        raise InvalidParameter(param_name, f"an integer in [1, {cap}] (the server's cap)", max_new_tokens)
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, **kw)
    except InvalidParameter as exc:
        if exc.param == "max_new_tokens" and param_name != "max_new_tokens":
            raise InvalidParameter(param_name, exc.expected, exc.actual) from None
        raise


def with_param_prefix(exc: PromptswapError | Exception, prefix: str) -> Exception:
    """Point an error at one entry of a list (`requests[3].text`), keeping its type and status."""
    param = getattr(exc, "param", None)
    if hasattr(exc, "message"):
        exc.param = f"{prefix}.{param}" if param else prefix
        exc.message = f"{prefix}: {exc.message}"
        exc.args = (exc.message,)
    return exc


class ClientGone(PromptswapError):
    status_code = 499

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (and so its engine requests) if the client hangs up first.

    Non-streaming responses would otherwise keep generating for nobody: uvicorn does not cancel a
    handler when its client goes away; it only reports `http.disconnect` on `receive()`.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        for t in (task, watch):
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(data: dict | str, event: str | None = None) -> bytes:
    """One server-sent event carrying JSON (or a bare string such as OpenAI's [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
