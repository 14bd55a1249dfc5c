"""OpenAI-compatible chat: POST /v1/chat/completions. `model` is a task name, or the base model's served name.

The conversation goes through the tokenizer's own chat template (`add_generation_prompt`), and the task's
virtual tokens go before the whole templated conversation, as PEFT would put them; the task's text
template is not applied (the chat template frames the text instead). A model without a chat template
cannot chat: 422 naming `messages`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api import logprobs as logprob_format
from server.api import streaming
from server.api.deps import EngineDep, MetricsDep, SettingsDep
from server.api.errors import ErrorContext, describe
from server.api.openapi import SSE_CONTENT, errors
from server.api.routes.openai import FINISH, refuse
from server.api.schemas import ChatRequest
from server.api.streaming import SSE_HEADERS, Event, sse, unless_disconnected
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.sequence import MAX_LOGPROBS, Completion, TokenDelta

router = APIRouter(prefix="/v1", tags=["openai"])  # needs the API token (server/api/auth.py)

@router.post("/chat/completions", responses={**errors(404, 415, 422, 503), 200: {
    "description": "OpenAI's chat.completion object; with `stream: true`, chat.completion.chunk server-sent "
                   "events ending in `data: [DONE]`",
    "content": {"application/json": {"schema": {"type": "object"}}, **SSE_CONTENT}}})
async def chat_completions(body: ChatRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                           settings: SettingsDep):
    _refuse_unsupported(body)
    base = settings.model_name()
    task = None if body.model == base else body.model
    text = _templated(engine.tokenizer, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:  # OpenAI's default is "as long as it takes": the server's cap (and the context's end)
        max_tokens = settings.max_new_tokens_cap
    params = streaming.sampling_params(settings.max_new_tokens_cap, max_new_tokens=max_tokens,
                                       param_name="max_completion_tokens" if body.max_completion_tokens is not None
                                       else "max_tokens", **body.sampling_kwargs())
    context = ErrorContext(rename={"task": "model", "text": "messages"},
                           hints={"model": f"`model` is a task name or {base!r} for the base model"})
    submission = EngineRequest(text, task, params, body.sent(), settings.max_new_tokens_cap, raw=True,
                               add_special_tokens=False)
    [handle] = await streaming.submit_all(engine, metrics, [submission], lambda i: context)
    reply = _ChatReply(body.model, engine.tokenizer, logprobs=body.logprobs,
                       usage=bool(body.stream_options and body.stream_options.include_usage))
    if not body.stream:
        result = await unless_disconnected(request, streaming.result(handle, metrics))
        return reply.full(streaming.completions([result])[0])
    events = streaming.events(handle, metrics)
    try:
        first = await unless_disconnected(request, anext(events))  # errors before any token get a status
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(reply.stream(first, events), media_type="text/event-stream", headers=SSE_HEADERS)


def _templated(tokenizer: Any, body: ChatRequest) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameter("messages", "a model with a chat template (this model's tokenizer has none: use "
                               "/v1/completions or /generate)", f"{len(body.messages)} messages")
    conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (e.g. roles must alternate) speak for it
        raise InvalidParameter("messages", "a conversation this model's chat template accepts",
                               f"{type(exc).__name__}: {exc}") from None


def _refuse_unsupported(body: ChatRequest) -> None:
    format_type = (body.response_format or {}).get("type", "text")
    refuse([
        ("n", body.n == 1, "1 (one choice)", body.n),
        ("tools", not body.tools, "absent (tool calls are not supported)", body.tools),
        ("response_format", format_type == "text", '{"type": "text"} (structured output is not supported)',
         body.response_format),
        *body.unsupported(),
        ("top_logprobs", body.top_logprobs is None or body.logprobs, "absent unless logprobs is true",
         body.top_logprobs),
        ("top_logprobs", body.top_logprobs is None or (isinstance(body.top_logprobs, int)
                                                       and 0 <= body.top_logprobs <= MAX_LOGPROBS),
         f"an integer in [0, {MAX_LOGPROBS}]", body.top_logprobs),
        ("tool_choice", body.tool_choice in (None, "none"), 'absent or "none" (tool calls are not supported)',
         body.tool_choice),
        ("functions", not body.functions, "absent (function calls are not supported)", body.functions),
    ])


class _ChatReply:
    def __init__(self, model: str, tokenizer: Any, logprobs: bool, usage: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = usage

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _usage(c: Completion) -> dict:
        return {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
                "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens}

    def full(self, c: Completion) -> dict:
        logprobs = logprob_format.chat(c.logprobs, self.tokenizer) if self.logprobs and c.logprobs else None
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                  "finish_reason": FINISH[c.finish_reason]}
        return {**self._envelope("chat.completion", [choice]), "usage": self._usage(c)}

    async def stream(self, first: Event, events: AsyncGenerator[Event, None]) -> AsyncIterator[bytes]:
        chunk = "chat.completion.chunk"
        yield sse(self._envelope(chunk, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]))
        item = first
        try:
            while True:
                if isinstance(item, Completion):
                    yield sse(self._envelope(chunk, [{"index": 0, "delta": {}, "logprobs": None,
                                                      "finish_reason": FINISH[item.finish_reason]}]))
                    if self.include_usage:
                        yield sse({**self._envelope(chunk, []), "usage": self._usage(item)})
                    break
                if isinstance(item, TokenDelta):
                    logprobs = logprob_format.chat(item.logprobs, self.tokenizer) \
                        if self.logprobs and item.logprobs else None
                    yield sse(self._envelope(chunk, [{"index": 0, "delta": {"content": item.text},
                                                      "logprobs": logprobs, "finish_reason": None}]))
                item = await anext(events)
        except Exception as exc:  # headers are sent: report in-stream, as OpenAI does
            yield sse(describe(exc)[1])
        finally:
            await events.aclose()
        yield sse("[DONE]")
