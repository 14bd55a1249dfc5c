"""OpenAI-compatible chat: POST /v1/chat/completions. `model` is a task name, or the base model's served name.

The conversation goes through the tokenizer's own chat template (`add_generation_prompt`), and the task's
virtual tokens go before the whole templated conversation, as PEFT would put them; the task's text
template is not applied (the chat template frames the text instead). A model without a chat template
cannot chat: 422 naming `messages`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api import logprobs as logprob_format
from server.api import streaming
from server.api.deps import EngineDep, MetricsDep, SettingsDep
from server.api.errors import ErrorContext
from server.api.json_body import JsonRoute
from server.api.openapi import SSE_CONTENT, errors
from server.api.responses import answer
from server.api.routes.openai import FINISH, OpenAIReply, refuse
from server.api.schemas import ChatMessage, ChatRequest
from server.api.streaming import Result
from server.engine.admission import EngineRequest
from server.engine.chat import Conversation
from server.engine.results import Completion, TokenDelta

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JsonRoute)  # needs the API token (server/api/auth.py)

@router.post("/chat/completions", responses={**errors(400, 404, 415, 503), 200: {
    "description": "OpenAI's chat.completion object; with `stream: true`, chat.completion.chunk server-sent "
                   "events ending in `data: [DONE]`",
    "content": {"application/json": {"schema": {"type": "object"}}, **SSE_CONTENT}}})
async def chat_completions(body: ChatRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
                           settings: SettingsDep):
    _refuse_unsupported(body)
    base = settings.model_name()
    task = None if body.model == base else body.model
    fmt = body.engine_format()
    context = ErrorContext(rename={"task": "model", "text": "messages", "response_format": body.format_param()},
                           hints={"model": f"`model` is a task name or {base!r} for the base model"})
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:  # OpenAI's default is "as long as it takes": the server's cap (and the context's end)
        max_tokens = settings.max_new_tokens_cap
    max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = streaming.sampling_params(settings.max_new_tokens_cap, max_new_tokens=max_tokens,
                                       names={"max_new_tokens": max_name, "logprobs": "top_logprobs"},
                                       **body.sampling_kwargs())
    submission = EngineRequest(task=task, params=params, sent=body.sent(),
                               max_new_tokens_cap=settings.max_new_tokens_cap, response_format=fmt,
                               n=body.n, conversation=conversation(body.messages))
    [group] = await streaming.submit_all(engine, metrics, [submission], lambda i: context)
    reply = _ChatReply(body.model, engine.tokenizer, logprobs=body.logprobs,
                       usage=bool(body.stream_options and body.stream_options.include_usage), n=body.n)
    return await answer(request, list(group), metrics, reply, stream=body.stream)


def conversation(messages: list[ChatMessage], add_generation_prompt: bool = True) -> Conversation:
    """The messages as the engine renders them (with the task's system message, from the request's snapshot)."""
    return Conversation(tuple((m.role, m.text()) for m in messages), add_generation_prompt)


def _refuse_unsupported(body: ChatRequest) -> None:
    refuse([
        ("tools", not body.tools, "absent (tool calls are not supported)", body.tools),
        *body.unsupported(),
        ("top_logprobs", body.top_logprobs is None or body.logprobs, "absent unless logprobs is true",
         body.top_logprobs),
        ("tool_choice", body.tool_choice in (None, "none"), 'absent or "none" (tool calls are not supported)',
         body.tool_choice),
        ("functions", not body.functions, "absent (function calls are not supported)", body.functions),
    ])


class _ChatReply(OpenAIReply):
    """A chat.completion object, n choices; streamed, chat.completion.chunk objects: the assistant's role first
    (for each choice), then the content's pieces of the choices as they come."""

    id_prefix = "chatcmpl"
    chunk = "chat.completion.chunk"

    def full(self, results: list[Result]) -> dict:
        completions = streaming.completions(results)
        choices = []
        for i, c in enumerate(completions):
            logprobs = logprob_format.chat(c.logprobs, self.tokenizer) if self.logprobs and c.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                            "finish_reason": FINISH[c.finish_reason]})
        return {**self._envelope("chat.completion", choices), "usage": self._usage(completions)}

    def opening(self) -> list[dict]:
        return [self._envelope(self.chunk, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]) for i in range(self.n)]

    def piece(self, index: int, delta: TokenDelta) -> dict:
        logprobs = logprob_format.chat(delta.logprobs, self.tokenizer) if self.logprobs and delta.logprobs else None
        return self._envelope(self.chunk, [{"index": index, "delta": {"content": delta.text}, "logprobs": logprobs,
                                            "finish_reason": None}])

    def final(self, index: int, completion: Completion) -> dict:
        return self._envelope(self.chunk, [{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": FINISH[completion.finish_reason]}])
