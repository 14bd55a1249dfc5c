"""OpenAI-compatible completions: `model` is a task name, or the base model's served name for none.

Shapes follow OpenAI's legacy Completions API (what the official client parses); parameters
promptswap cannot honour (n > 1, echo, logprobs, penalties, ...) are refused with a 422 rather
than silently ignored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from prompt_store.errors import PromptError
from server.api import logprobs as logprob_format
from server.api import streaming
from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.errors import ErrorContext, ErrorInContext, describe
from server.api.limits import check_count
from server.api.metrics import Metrics
from server.api.openapi import SSE_CONTENT, errors
from server.api.schemas import CompletionRequest
from server.api.streaming import SSE_HEADERS, Event, sse, unless_disconnected
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.handle import RequestHandle
from server.engine.sequence import Completion, TokenDelta, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])  # needs the API token (server/api/auth.py)

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the engine's finish reason -> OpenAI's


def _model_card(model_id: str, created: float, parent: str | None, task: Any = None) -> dict:
    """OpenAI's model object; a task's also carries its description and generation defaults (extensions)."""
    card = {"id": model_id, "object": "model", "created": int(created), "owned_by": "promptswap",
            "root": model_id, "parent": parent}
    if task is not None:
        card.update(description=task.description, defaults=task.defaults)
    return card


@router.get("/models")
def list_models(request: Request, settings: SettingsDep, registry: RegistryDep) -> dict:
    """The base model (no prompt) first, then every task that is served."""
    base = settings.model_name()
    cards = [_model_card(base, request.app.state.started_at, None)]
    cards += [_model_card(d.task, d.created_at or 0.0, base, d) for d in registry.list() if d.error is None]
    return {"object": "list", "data": cards}


@router.get("/models/{model}", responses=errors(404, 422))
def get_model(model: str, request: Request, settings: SettingsDep, registry: RegistryDep) -> dict:
    base = settings.model_name()
    if model == base:
        return _model_card(base, request.app.state.started_at, None)
    try:
        desc = registry.get(model)  # UnknownTask -> 404, a malformed name -> 422
    except PromptError as exc:
        raise ErrorInContext(exc, ErrorContext(rename={"task": "model"})) from exc
    return _model_card(model, desc.created_at, base, desc)


@router.post("/completions", responses={**errors(404, 415, 422, 503), 200: {
    "description": "OpenAI's text_completion object; with `stream: true`, server-sent events ending in "
                   "`data: [DONE]`",
    "content": {"application/json": {"schema": {"type": "object"}}, **SSE_CONTENT}}})
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                      settings: SettingsDep):
    _refuse_unsupported(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_count("prompt", len(prompts), settings.max_batch_requests)
    base = settings.model_name()
    task = None if body.model == base else body.model
    params = streaming.sampling_params(settings.max_new_tokens_cap, max_new_tokens=body.max_tokens,
                                       param_name="max_tokens", **body.sampling_kwargs(),
                                       prompt_logprobs=body.echo and body.logprobs is not None)

    def context(i: int) -> ErrorContext:
        # OpenAI's names for the engine's: the task is the `model`, the text is the prompt.
        return ErrorContext(rename={"task": "model", "text": f"prompt[{i}]" if len(prompts) > 1 else "prompt"},
                            hints={"model": f"`model` is a task name or {base!r} for the base model"})

    submissions = [EngineRequest(str(text), task, params, body.sent(), settings.max_new_tokens_cap, body.raw)
                   for text in prompts]
    handles = await streaming.submit_all(engine, metrics, submissions, context)
    reply = _Reply(body.model, usage=bool(body.stream_options and body.stream_options.include_usage),
                   tokenizer=engine.tokenizer, logprobs=body.logprobs is not None)
    if not body.stream:
        results = await unless_disconnected(request, streaming.all_results(handles, metrics, "prompt"))
        echoed = [_echoed(str(text), c, engine.tokenizer) for text, c in
                  zip(prompts, streaming.completions(results), strict=True)] if body.echo else None
        return reply.full(streaming.completions(results), echoed)
    events = _merged(handles, metrics)
    try:
        first = await unless_disconnected(request, anext(events))  # errors before any token get a status
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(reply.stream(first, events, len(handles)), media_type="text/event-stream",
                             headers=SSE_HEADERS)


class _Reply:
    """Builds OpenAI's response objects for one request."""

    def __init__(self, model: str, usage: bool, tokenizer: Any = None, logprobs: bool = False) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = usage
        self.tokenizer = tokenizer
        self.logprobs = logprobs  # the request asked for them
        self.offsets: dict[int, int] = {}  # streaming: where each choice's next token starts in its text

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    @staticmethod
    def _usage(completions: list[Completion]) -> dict:
        prompt = sum(c.usage.prompt_tokens for c in completions)
        completion = sum(c.usage.completion_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def full(self, completions: list[Completion], echoed: list[str] | None = None) -> dict:
        """`echoed`: with `echo`, each prompt as the choice's text starts with it."""
        choices = []
        for i, c in enumerate(completions):
            prompt = echoed[i] if echoed is not None else ""
            logprobs = None
            if self.logprobs and c.logprobs is not None:
                ids = list(c.token_ids)
                entries: list[TokenLogprob | None] = list(c.logprobs)
                if echoed is not None:  # the prompt's tokens first; the first has no log-probability
                    ids = list(c.prompt_ids) + ids
                    entries = [None, *(c.prompt_logprobs or ()), *entries]
                logprobs = logprob_format.completion(ids, entries, self.tokenizer)
            choices.append({"index": i, "text": prompt + c.text, "logprobs": logprobs,
                            "finish_reason": FINISH[c.finish_reason]})
        return {**self._envelope(choices), "usage": self._usage(completions)}

    async def stream(self, first: tuple[int, Event], events: AsyncGenerator[tuple[int, Event], None],
                     n: int) -> AsyncIterator[bytes]:
        done: list[Completion] = []
        item = first
        try:
            while True:
                index, piece = item
                if isinstance(piece, Completion):
                    done.append(piece)
                    choice = {"index": index, "text": "", "logprobs": None,
                              "finish_reason": FINISH[piece.finish_reason]}
                elif isinstance(piece, TokenDelta):
                    choice = {"index": index, "text": piece.text, "logprobs": self._piece_logprobs(index, piece),
                              "finish_reason": None}
                yield sse(self._envelope([choice]))
                if len(done) == n:
                    break
                item = await anext(events)
            if self.include_usage:
                yield sse({**self._envelope([]), "usage": self._usage(done)})
        except Exception as exc:  # headers are sent: report in-stream, as OpenAI does
            yield sse(describe(exc)[1])
        finally:
            await events.aclose()
        yield sse("[DONE]")


    def _piece_logprobs(self, index: int, piece: TokenDelta) -> dict | None:
        if not self.logprobs or not piece.logprobs:
            return None
        shape = logprob_format.completion(piece.token_ids, piece.logprobs, self.tokenizer, self.offsets.get(index, 0))
        if shape["tokens"]:
            self.offsets[index] = shape["text_offset"][-1] + len(shape["tokens"][-1])
        return shape


def _echoed(prompt: str, completion: Completion, tokenizer: Any) -> str:
    """The prompt as the model saw it: the client's text, or with the task's template around it."""
    if list(tokenizer(prompt)["input_ids"]) == list(completion.prompt_ids):
        return prompt
    return tokenizer.decode(list(completion.prompt_ids), skip_special_tokens=True)


async def _merged(handles: list[RequestHandle], metrics: Metrics) -> AsyncGenerator[tuple[int, Event], None]:
    """Items of several requests as they come, tagged with the request's index."""
    queue: asyncio.Queue[tuple[int, Event | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for item in streaming.events(handle, metrics):
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


def refuse(checks: list[tuple[str, bool, str, object]]) -> None:
    """A 422 naming the first field whose check does not hold: what promptswap cannot honour is refused, not
    silently ignored."""
    for name, ok, expected, actual in checks:
        if not ok:
            raise InvalidParameter(name, expected, actual)


def _refuse_unsupported(body: CompletionRequest) -> None:
    refuse([
        ("n", body.n == 1, "1 (one choice per prompt)", body.n),
        ("best_of", body.best_of in (None, 1), "1 or absent", body.best_of),
        ("echo", not (body.echo and body.stream), "false with stream (echo is returned whole, not streamed)",
         body.echo),
        ("logprobs", body.logprobs is None or (isinstance(body.logprobs, int) and 0 <= body.logprobs <= 5),
         "an integer in [0, 5] (OpenAI's range; /generate takes up to 20)", body.logprobs),
        ("suffix", not body.suffix, "absent (insertion is not supported)", body.suffix),
        *body.unsupported(),
    ])
