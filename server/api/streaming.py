"""One request's trip through the engine as the HTTP routes see it: submit, stream or wait, cancel.

Every API (/generate, /v1/completions, /v1/chat/completions) goes through here, so metrics and
cancellation on client disconnect are written once (responses.py writes their answers). The request's
state is its engine handle; this module keeps none of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import InvalidTaskName, UnknownTask
from server.api import request_log
from server.api.errors import ErrorContext, ErrorInContext, status_of
from server.api.metrics import UNKNOWN_LABEL, Metrics, Outcome, task_label
from server.engine.errors import InvalidParameter, RequestCancelled
from server.engine.handle import RequestHandle
from server.engine.loop import Engine, EngineRequest
from server.engine.results import ChoiceScores, Completion, TokenDelta
from server.engine.samples import SampleGroup, flatten
from server.engine.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams

T = TypeVar("T")
Result = Completion | ChoiceScores
Event = TokenDelta | Result


def sampling_params(cap: int, *, max_new_tokens: int | None, names: Mapping[str, str] | None = None,
                    **kw: Any) -> SamplingParams:
    """SamplingParams under the server's cap on max_new_tokens; every range is checked by SamplingParams, once,
    and its error names the field as the body does (`names`: SamplingParams field -> the body's name)."""
    names = names or {}
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap)
    elif isinstance(max_new_tokens, int) and max_new_tokens > cap:
        raise InvalidParameter(names.get("max_new_tokens", "max_new_tokens"),
                               f"an integer in [1, {cap}] (the server's cap)", max_new_tokens)
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, **kw)
    except InvalidParameter as exc:
        if exc.param not in names:
            raise
        raise ErrorInContext(exc, ErrorContext(rename=dict(names))) from exc


async def submit_all(engine: Engine, metrics: Metrics, requests: list[EngineRequest],
                     context_of: Any) -> list[SampleGroup]:
    """Submit each request from a worker thread: tokenizing is CPU work, and the event loop
    must go on serving meanwhile. A refusal is counted, cancels the ones already submitted and is raised
    in the context `context_of(i)` gives for entry i (None: as it is). One SampleGroup per request."""
    work = asyncio.ensure_future(run_in_threadpool(_submit_all, engine, metrics, requests, context_of))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:  # the handler is cancelled mid-submission: cancel what got submitted
        with contextlib.suppress(Exception):
            for handle in flatten(await work):
                handle.cancel()
        raise


def _submit_all(engine: Engine, metrics: Metrics, requests: list[EngineRequest],
                context_of: Any) -> list[SampleGroup]:
    groups: list[SampleGroup] = []
    SampleGroup.check_fits(sum(r.n for r in requests if isinstance(r.n, int)), engine.capacity, entries=len(requests))
    try:
        for i, r in enumerate(requests):
            try:
                groups.append(engine.submit_samples(r))
            except Exception as exc:
                unknown = isinstance(exc, UnknownTask | InvalidTaskName)
                outcome = outcome_of(exc)
                metrics.refused(UNKNOWN_LABEL if unknown else task_label(r.task), outcome)
                request_log.refused(r.task, outcome, exc)
                context = context_of(i)
                if context is None:
                    raise
                raise ErrorInContext(exc, context) from exc
    except BaseException:
        for handle in flatten(groups):
            handle.cancel()
        raise
    return groups


async def events(handle: RequestHandle, metrics: Metrics) -> AsyncGenerator[Event, None]:
    """The engine's stream; the last item is the Completion. Leaving early cancels the request.
    Exactly one outcome is recorded (metrics and the request's log line) when it ends, whichever way."""
    outcome: Outcome = "cancelled"
    error: BaseException | None = None
    try:
        async for item in handle.stream():
            if isinstance(item, Completion | ChoiceScores):
                outcome = "ok"
            yield item
    except RequestCancelled:
        raise
    except Exception as exc:
        outcome, error = outcome_of(exc), exc
        raise
    finally:
        if outcome == "cancelled":  # the consumer left (client gone, shutdown): free the slot
            handle.cancel()
        metrics.finished(handle, outcome)
        request_log.finished(handle, outcome, error)


async def merged(handles: list[RequestHandle], metrics: Metrics) -> AsyncGenerator[tuple[int, Event], None]:
    """Items of several requests as they come, tagged with the request's index."""
    queue: asyncio.Queue[tuple[int, Event | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for item in events(handle, metrics):
                await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    remaining = len(handles)
    try:
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            assert item is not None
            yield index, item
            if isinstance(item, Completion):
                remaining -= 1
    finally:
        for task in tasks:  # leaving early (error, client gone) cancels the requests still running
            task.cancel()


def outcome_of(error: BaseException) -> Outcome:
    """How a failed request is counted: by the status its error is answered with."""
    return "server_error" if status_of(error) >= 500 else "client_error"


async def result(handle: RequestHandle, metrics: Metrics) -> Result:
    completion = None
    async for item in events(handle, metrics):
        completion = item
    assert isinstance(completion, Completion | ChoiceScores), "the engine's stream must end with its result"
    return completion


async def all_results(handles: list[RequestHandle], metrics: Metrics, name: str | None,
                      owners: list[int] | None = None) -> list[Result]:
    """Every handle's result, in order; the first failure cancels the rest. It is named `name[i]`, i the entry
    of the body's list the handle belongs to (`owners[k]` for handle k; None: handle k is entry k), or raised
    as it is without `name` (one request's samples)."""
    tasks = [asyncio.ensure_future(result(h, metrics)) for h in handles]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for i, task in enumerate(tasks):
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                if name is None:
                    raise error
                entry = owners[i] if owners is not None else i
                raise ErrorInContext(error, ErrorContext(prefix=f"{name}[{entry}]")) from error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


def completions(results: list[Result]) -> list[Completion]:
    """Results of requests that generate (none scored choices)."""
    out = [r for r in results if isinstance(r, Completion)]
    assert len(out) == len(results), "a generating request ends with a Completion"
    return out


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
        raise RequestCancelled()
    finally:
        for t in (task, watch):
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
