"""OpenAI-compatible completions: `model` is a task name, or the base model's served name for none.

Shapes follow OpenAI's legacy Completions API (what the official client parses); parameters
promptswap cannot honour (best_of other than n, logit_bias, suffix, ...) are refused with a 422 rather
than silently ignored. With `n`, each prompt has n choices, numbered as OpenAI does: prompt-major,
sample-minor (choice prompt * n + sample), the order streaming.submit_all gives their handles in.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from prompt_store.errors import PromptError
from server.api import logprobs as logprob_format
from server.api import streaming
from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.errors import ErrorContext, ErrorInContext, describe, in_openai_shape
from server.api.json_body import JsonRoute
from server.api.limits import check_count
from server.api.openapi import SSE_CONTENT, errors
from server.api.responses import Reply, answer
from server.api.schemas import CompletionRequest
from server.api.streaming import Result
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.results import Completion, TokenDelta, TokenLogprob
from server.engine.samples import SampleGroup, flatten, owners

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JsonRoute)  # needs the API token (server/api/auth.py)

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


@router.get("/models/{model}", responses=errors(400, 404))
def get_model(model: str, request: Request, settings: SettingsDep, registry: RegistryDep) -> dict:
    base = settings.model_name()
    if model == base:
        return _model_card(base, request.app.state.started_at, None)
    try:
        desc = registry.get(model)  # UnknownTask -> 404, a malformed name -> 422
    except PromptError as exc:
        raise ErrorInContext(exc, ErrorContext(rename={"task": "model"})) from exc
    return _model_card(model, desc.created_at, base, desc)


@router.post("/completions", responses={**errors(400, 404, 415, 503), 200: {
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
                                       names={"max_new_tokens": "max_tokens"}, **body.sampling_kwargs(),
                                       prompt_logprobs=body.echo and body.logprobs is not None)

    fmt = body.engine_format()

    def context(i: int) -> ErrorContext:
        # OpenAI's names for the engine's: the task is the `model`, the text is the prompt.
        return ErrorContext(rename={"task": "model", "text": f"prompt[{i}]" if len(prompts) > 1 else "prompt",
                                    "response_format": body.format_param()},
                            hints={"model": f"`model` is a task name or {base!r} for the base model"})

    submissions = [EngineRequest(str(text), task, params, body.sent(), settings.max_new_tokens_cap, body.raw,
                                 response_format=fmt, n=body.n) for text in prompts]
    groups = await streaming.submit_all(engine, metrics, submissions, context)
    reply = _Reply(body.model, engine.tokenizer, logprobs=body.logprobs is not None,
                   usage=bool(body.stream_options and body.stream_options.include_usage), n=body.n,
                   echo=[str(text) for text in prompts] if body.echo else None)
    return await answer(request, flatten(groups), metrics, reply, stream=body.stream, name="prompt",
                        owners=owners(groups))


class OpenAIReply(Reply):
    """What OpenAI's completions and chat answers share: the envelope, usage (with stream_options.include_usage,
    a last chunk with no choices), an error as a plain event, and `data: [DONE]` at the end of a stream.
    A request of `n` samples per text has n handles per text, text-major: handle i is choice i."""

    done = "[DONE]"
    id_prefix: str
    chunk: str  # the object a streamed chunk is

    def __init__(self, model: str, tokenizer: Any, logprobs: bool, usage: bool, n: int) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs  # the request asked for them
        self.include_usage = usage
        self.n = n  # choices per text

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _usage(self, completions: list[Completion]) -> dict:
        """`completions` in the order of the choices. Each text counts once, as OpenAI counts it (its samples
        share its pages); every choice's tokens count."""
        texts = [SampleGroup.usage([c.usage for c in completions[i:i + self.n]])
                 for i in range(0, len(completions), self.n)]
        prompt = sum(u.prompt_tokens for u in texts)
        completion = sum(u.completion_tokens for u in texts)
        cached = sum(u.cached_tokens for u in texts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def closing(self, completions: list[Completion]) -> list[dict]:
        return [{**self._envelope(self.chunk, []), "usage": self._usage(completions)}] if self.include_usage else []

    def error(self, exc: BaseException) -> dict:
        return in_openai_shape(*describe(exc)[:2])[1]


class _Reply(OpenAIReply):
    """text_completion objects, n choices per prompt; streamed, the choices' pieces interleave as they come."""

    id_prefix = "cmpl"
    chunk = "text_completion"

    def __init__(self, model: str, tokenizer: Any, logprobs: bool, usage: bool, n: int,
                 echo: list[str] | None) -> None:
        super().__init__(model, tokenizer, logprobs, usage, n)
        self.echo = echo  # with `echo`: the prompts, as each choice's text starts with its own
        self.offsets: dict[int, int] = {}  # streaming: where each choice's next token starts in its text

    def full(self, results: list[Result]) -> dict:
        completions = streaming.completions(results)
        echoed = [_echoed(self.echo[i // self.n], c, self.tokenizer) for i, c in
                  enumerate(completions)] if self.echo is not None else None
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
        return {**self._envelope(self.chunk, choices), "usage": self._usage(completions)}

    def piece(self, index: int, delta: TokenDelta) -> dict:
        return self._envelope(self.chunk, [{"index": index, "text": delta.text,
                                            "logprobs": self._piece_logprobs(index, delta), "finish_reason": None}])

    def final(self, index: int, completion: Completion) -> dict:
        return self._envelope(self.chunk, [{"index": index, "text": "", "logprobs": None,
                                            "finish_reason": FINISH[completion.finish_reason]}])

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


def refuse(checks: list[tuple[str, bool, str, object]]) -> None:
    """A 422 naming the first field whose check does not hold: what promptswap cannot honour is refused, not
    silently ignored."""
    for name, ok, expected, actual in checks:
        if not ok:
            raise InvalidParameter(name, expected, actual)


def _refuse_unsupported(body: CompletionRequest) -> None:
    refuse([
        # n's range is the engine's to check; the n samples are the choices, none is ranked out.
        ("best_of", body.best_of in (None, 1, body.n), "absent, 1 or n (choices are not ranked on the server)",
         body.best_of),
        ("echo", not (body.echo and body.stream), "false with stream (echo is returned whole, not streamed)",
         body.echo),
        ("logprobs", body.logprobs is None or (isinstance(body.logprobs, int) and 0 <= body.logprobs <= 5),
         "an integer in [0, 5] (OpenAI's range; /generate takes up to 20)", body.logprobs),
        ("suffix", not body.suffix, "absent (insertion is not supported)", body.suffix),
        *body.unsupported(),
    ])
