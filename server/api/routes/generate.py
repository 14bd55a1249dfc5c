"""POST /generate and POST /generate/batch: promptswap's own generation API."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import require_api
from server.api.deps import EngineDep, MetricsDep, SettingsDep
from server.engine.errors import InvalidParameter
from server.api.streaming import (
    SSE_HEADERS,
    Generation,
    all_results,
    sampling_params,
    sse,
    submit,
    unless_disconnected,
    with_param_prefix,
)
from server.api.errors import describe
from server.api.schemas import BatchRequest, BatchResponse, GenerateRequest, GenerateResponse
from server.engine.sequence import Completion, TokenDelta

router = APIRouter(dependencies=[Depends(require_api)], tags=["generate"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                   settings: SettingsDep):
    params = sampling_params(settings.max_new_tokens_cap, max_new_tokens=body.max_new_tokens,
                             **body.sampling_kwargs())
    gen = submit(engine, metrics, body.text, body.task, params)
    if not body.stream:
        return GenerateResponse.of(await unless_disconnected(request, gen.result()))
    events = gen.events()
    try:
        # Wait for the first item before answering, so an error that comes before any token
        # still gets its own status code instead of a 200 with an error event.
        first = await unless_disconnected(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(_sse_stream(first, events), media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse_stream(first, events: AsyncIterator[TokenDelta | Completion]) -> AsyncIterator[bytes]:
    """One event per new piece of text; the last carries finish_reason and usage."""
    item = first
    try:
        while True:
            if isinstance(item, Completion):
                final = GenerateResponse.of(item).model_dump()
                final.update(text="", token_ids=[])  # the pieces were sent already
                yield sse(final)
                return
            yield sse({"text": item.text, "token_ids": list(item.token_ids)})
            item = await anext(events)
    except Exception as exc:  # the status line is sent already: report the error in the stream
        _, body, _ = describe(exc)
        yield sse(body, event="error")
    finally:
        await events.aclose()


@router.post("/generate/batch", response_model=BatchResponse)
async def generate_batch(body: BatchRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                         settings: SettingsDep):
    if len(body.requests) > settings.max_batch_requests:
        raise InvalidParameter("requests", f"at most {settings.max_batch_requests} entries",
                               len(body.requests))
    # Check every entry before submitting any, so a bad entry does not leave the others running.
    all_params = []
    for i, entry in enumerate(body.requests):
        try:
            all_params.append(sampling_params(settings.max_new_tokens_cap,
                                              max_new_tokens=entry.max_new_tokens, **entry.sampling_kwargs()))
        except Exception as exc:
            raise with_param_prefix(exc, f"requests[{i}]") from None
    gens: list[Generation] = []
    try:
        for i, (entry, params) in enumerate(zip(body.requests, all_params, strict=True)):
            try:
                gens.append(submit(engine, metrics, entry.text, entry.task, params))
            except Exception as exc:
                raise with_param_prefix(exc, f"requests[{i}]") from None
    except BaseException:
        for gen in gens:
            gen.handle.cancel()
        raise
    # They all joined the engine's continuous batch; wait for all, in order.
    completions = await unless_disconnected(request, all_results(gens, "requests"))
    return BatchResponse(results=[GenerateResponse.of(c) for c in completions])
