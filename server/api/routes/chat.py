"""OpenAI-compatible chat: POST /v1/chat/completions. `model` is a task name, or the base model's served name.

The conversation goes through the tokenizer's own chat template (`add_generation_prompt`), and the task's
virtual tokens go before the whole templated conversation, as PEFT would put them; the task's text
template is not applied (the chat template frames the text instead). A model without a chat template
cannot chat: 400 naming `messages`.

With `tools` (server/api/tools.py): "required" or a named function constrains the answer to a call by grammar;
"auto" renders the tools with the chat template and parses the answer for a call; "none" renders them and
answers text. A call comes back as `message.tool_calls`, `content` null, `finish_reason` "tool_calls"; streamed,
as one `delta.tool_calls` when the choice ends.
"""

from __future__ import annotations

from typing import Any

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
from server.api.tools import ToolPlan, ToolStream, messages_extras, plan
from server.engine.admission import EngineRequest
from server.engine.chat import Conversation
from server.engine.errors import InvalidParameter
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
    tools = plan(body.tools, body.tool_choice,
                 [t.model_dump(exclude_none=True) for t in body.tools] if body.tools is not None else None,
                 parallel=body.parallel_tool_calls is not False)
    fmt = body.engine_format()
    format_param = body.format_param()
    if tools is not None and tools.mode == "forced":
        if fmt is not None:
            raise InvalidParameter(format_param, 'absent with tool_choice "required" or a named function (the '
                                   "answer is a call)", fmt.kind)
        fmt, format_param = tools.response_format(), tools.param
    context = ErrorContext(rename={"task": "model", "text": "messages", "response_format": format_param},
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
                               n=body.n, conversation=conversation(body.messages, tools=tools))
    [group] = await streaming.submit_all(engine, metrics, [submission], lambda i: context)
    reply = _ChatReply(body.model, engine.tokenizer, logprobs=body.logprobs,
                       usage=bool(body.stream_options and body.stream_options.include_usage), n=body.n, tools=tools)
    return await answer(request, list(group), metrics, reply, stream=body.stream)


def conversation(messages: list[ChatMessage], add_generation_prompt: bool = True,
                 tools: ToolPlan | None = None) -> Conversation:
    """The messages as the engine renders them (with the task's system message, from the request's snapshot),
    their tool calls and results, and the tools, for the chat template."""
    return Conversation(tuple((m.role, m.text()) for m in messages), add_generation_prompt,
                        tools.rendered if tools is not None else (), messages_extras(messages))


def _refuse_unsupported(body: ChatRequest) -> None:
    refuse([
        *body.unsupported(),
        ("top_logprobs", body.top_logprobs is None or body.logprobs, "absent unless logprobs is true",
         body.top_logprobs),
        ("functions", not body.functions, "absent (use tools: the older functions are not supported)",
         body.functions),
    ])


class _ChatReply(OpenAIReply):
    """A chat.completion object, n choices; streamed, chat.completion.chunk objects: the assistant's role first
    (for each choice), then the content's pieces of the choices as they come. With tools, each choice's text
    is parsed for calls (ToolPlan.calls); streamed, what may be a call is held back (ToolStream)."""

    id_prefix = "chatcmpl"
    chunk = "chat.completion.chunk"

    def __init__(self, model: str, tokenizer: Any, logprobs: bool, usage: bool, n: int,
                 tools: ToolPlan | None = None) -> None:
        super().__init__(model, tokenizer, logprobs, usage, n)
        self.tools = tools
        self.streams = [ToolStream(tools) for _ in range(n)] if tools is not None else []

    def full(self, results: list[Result]) -> dict:
        completions = streaming.completions(results)
        choices = []
        for i, c in enumerate(completions):
            logprobs = logprob_format.chat(c.logprobs, self.tokenizer) if self.logprobs and c.logprobs else None
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = FINISH[c.finish_reason]
            if self.tools is not None:
                content, calls = self.tools.calls(c.text)
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [call.openai() for call in calls]}
                    finish = "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {**self._envelope("chat.completion", choices), "usage": self._usage(completions)}

    def opening(self) -> list[dict]:
        forced = self.tools is not None and self.tools.mode == "forced"
        return [self._envelope(self.chunk, [{"index": i, "delta": {"role": "assistant", "content": None if forced
                                                                   else ""},
                                             "logprobs": None, "finish_reason": None}]) for i in range(self.n)]

    def piece(self, index: int, delta: TokenDelta) -> dict:
        logprobs = logprob_format.chat(delta.logprobs, self.tokenizer) if self.logprobs and delta.logprobs else None
        text = self.streams[index].feed(delta.text) if self.streams else delta.text
        # Held back (it may be a call): an empty delta, which still carries the tokens' logprobs.
        return self._envelope(self.chunk, [{"index": index, "delta": {"content": text} if text else {},
                                            "logprobs": logprobs, "finish_reason": None}])

    def final(self, index: int, completion: Completion) -> dict:
        delta: dict[str, Any] = {}
        finish = FINISH[completion.finish_reason]
        if self.streams:
            rest, calls = self.streams[index].finish(completion.text)
            if rest:
                delta["content"] = rest
            if calls:  # the whole call at once, in OpenAI's delta shape
                delta["tool_calls"] = [call.openai(k) for k, call in enumerate(calls)]
                finish = "tool_calls"
        return self._envelope(self.chunk, [{"index": index, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}])
