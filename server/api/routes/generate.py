"""POST /generate and POST /generate/batch: promptswap's own generation API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api import logprobs as logprob_format
from server.api import streaming
from server.api.deps import EngineDep, MetricsDep, SettingsDep
from server.api.errors import ErrorContext, ErrorInContext
from server.api.json_body import JsonRoute
from server.api.limits import check_count
from server.api.openapi import SSE_CONTENT, errors
from server.api.responses import Reply, answer
from server.api.schemas import (
    BatchRequest,
    BatchResponse,
    ChoicesResponse,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    SamplesResponse,
    response_of,
)
from server.api.streaming import Result, unless_disconnected
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.results import Completion, TokenDelta
from server.engine.samples import flatten, owners, regroup

router = APIRouter(tags=["generate"], route_class=JsonRoute)  # needs the API token (server/api/auth.py)


@router.post("/generate", response_model=GenerateResponse | ChoicesResponse | SamplesResponse,
             responses={**errors(404, 415, 422, 503), 200: {
                 "description": "The completion (GenerateResponse), with `choices` every choice scored "
                                "(ChoicesResponse), or with n > 1 every sample (SamplesResponse); with `stream: true`, "
                                "server-sent events instead (a final event with finish_reason and usage, or an "
                                "`error` event; with n > 1 each event carries its sample's index, and each sample "
                                "has its final event)",
                 "content": SSE_CONTENT}})
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                   settings: SettingsDep):
    _check_choices_alone(body)
    params = streaming.sampling_params(settings.max_new_tokens_cap, max_new_tokens=body.max_new_tokens,
                                       **body.sampling_kwargs())
    submission = EngineRequest(body.text, body.task, params, body.sent(), settings.max_new_tokens_cap, body.raw,
                               body.choices, response_format=body.engine_format(), n=body.n)
    [group] = await streaming.submit_all(engine, metrics, [submission], lambda i: None)
    return await answer(request, list(group), metrics, _Reply(engine.tokenizer, body.n), stream=body.stream)


def _check_choices_alone(body: GenerateParams) -> None:
    """Scoring answers with the choices' log-probabilities, whole: no stream, no per-token logprobs."""
    if body.choices in (None, False):
        return
    if getattr(body, "stream", False):
        raise InvalidParameter("choices", "absent when stream is true (the scores come as one answer)", body.choices)
    if body.logprobs is not None:
        raise InvalidParameter("logprobs", "absent with choices (each choice's log-probability is the answer)",
                               body.logprobs)


class _Reply(Reply):
    """A GenerateResponse (or ChoicesResponse, or with n > 1 a SamplesResponse); streamed, one event per new piece
    of text, the last with finish_reason and usage, and an error as an `error` event. With n > 1 every event
    starts with its sample's index, and each sample's last event has its own finish_reason and usage."""

    error_event = "error"

    def __init__(self, tokenizer: Any, n: int = 1) -> None:
        self.tokenizer = tokenizer
        self.n = n

    def full(self, results: list[Result]) -> GenerateResponse | ChoicesResponse | SamplesResponse:
        return response_of(results, self.tokenizer)

    def piece(self, index: int, delta: TokenDelta) -> dict:
        piece: dict[str, Any] = {"text": delta.text, "token_ids": list(delta.token_ids)}
        if delta.logprobs:
            piece["logprobs"] = logprob_format.native(delta.logprobs, self.tokenizer)
        return self._indexed(index, piece)

    def final(self, index: int, completion: Completion) -> dict:
        final = GenerateResponse.of(completion, self.tokenizer).model_dump()
        final.update(text="", token_ids=[])  # the pieces were sent already
        if completion.logprobs is not None:
            final["logprobs"] = []
        return self._indexed(index, final)

    def _indexed(self, index: int, event: dict) -> dict:
        return {"index": index, **event} if self.n > 1 else event  # one sample's events are as they always were


@router.post("/generate/batch", response_model=BatchResponse, responses=errors(404, 415, 422, 503))
async def generate_batch(body: BatchRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                         settings: SettingsDep):
    check_count("requests", len(body.requests), settings.max_batch_requests)

    def entry(i: int) -> ErrorContext:
        return ErrorContext(prefix=f"requests[{i}]")

    # Check every entry before submitting any, so a bad entry does not leave the others running.
    submissions = []
    for i, e in enumerate(body.requests):
        try:
            _check_choices_alone(e)
            params = streaming.sampling_params(settings.max_new_tokens_cap, max_new_tokens=e.max_new_tokens,
                                               **e.sampling_kwargs())
            fmt = e.engine_format()
        except Exception as exc:
            raise ErrorInContext(exc, entry(i)) from exc
        submissions.append(EngineRequest(e.text, e.task, params, e.sent(), settings.max_new_tokens_cap, e.raw,
                                         e.choices, response_format=fmt, n=e.n))
    groups = await streaming.submit_all(engine, metrics, submissions, entry)
    # They all joined the engine's continuous batch (each of an entry's samples too); wait for all, in order.
    results = await unless_disconnected(request, streaming.all_results(flatten(groups), metrics, "requests",
                                                                       owners(groups)))
    return BatchResponse(results=[response_of(mine, engine.tokenizer) for mine in regroup(results, groups)])
