"""POST /tokenize and POST /detokenize, in vLLM's shapes: what the model reads for a text or a conversation.

A task's text goes through its template (unless `raw`) and its virtual tokens are reported apart, by the
engine's own admission rules (Engine.tokenize), so the count is what a generation request would use.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import PromptError
from prompt_store.registry import PromptRegistry
from server.api.deps import EngineDep, RegistryDep, SettingsDep
from server.api.errors import ErrorContext, ErrorInContext
from server.api.json_body import JsonRoute
from server.api.openapi import errors
from server.api.routes.chat import conversation
from server.api.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.config import Settings
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter

router = APIRouter(tags=["tokenize"], route_class=JsonRoute)  # needs the API token (server/api/auth.py)


def _task(model: str | None, settings: Settings, registry: PromptRegistry) -> str | None:
    """The task `model` names, for /tokenize and /detokenize alike: None for the base model (its served name, or
    null); a name no task is served under is a 404 naming `model` (a name no task can have, a 422)."""
    if model in (None, settings.model_name()):
        return None
    try:
        registry.get(model)
    except PromptError as exc:
        raise ErrorInContext(exc, ErrorContext(rename={"task": "model"})) from exc
    return model


@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(404, 415, 422))
async def tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep,
                   registry: RegistryDep) -> TokenizeResponse:
    task = _task(body.model, settings, registry)
    if body.messages is not None:  # as chat reads it: the task's system message too, when it brings none
        request = EngineRequest(task=task, conversation=conversation(body.messages, body.add_generation_prompt))
        name = "messages"
    else:
        assert body.prompt is not None  # one of the two: checked by the schema
        request = EngineRequest(body.prompt, task, raw=body.raw, add_special_tokens=body.add_special_tokens
                                if body.add_special_tokens is not None else True)
        name = "prompt"
    try:
        out = await run_in_threadpool(engine.tokenize, request)  # tokenizing is CPU work: off the event loop
    except Exception as exc:
        raise ErrorInContext(exc, ErrorContext(rename={"task": "model", "text": name})) from exc
    return TokenizeResponse(count=len(out.ids), max_model_len=engine.max_context, tokens=out.ids,
                            token_strs=[engine.tokenizer.decode([t]) for t in out.ids] if body.return_token_strs
                            else None, virtual_tokens=out.virtual_tokens, templated=out.templated)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(404, 415, 422))
async def detokenize(body: DetokenizeRequest, engine: EngineDep, settings: SettingsDep,
                     registry: RegistryDep) -> DetokenizeResponse:
    _task(body.model, settings, registry)  # the text is the base tokenizer's whatever the task: only checked
    vocab = engine.base.model.config.get_text_config().vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParameter("tokens", f"token ids in [0, {vocab})", bad)
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, body.tokens))
