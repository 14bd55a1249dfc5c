"""POST /tokenize and POST /detokenize, in vLLM's shapes: what the model reads for a text or a conversation.

A task's text goes through its template (unless `raw`) and its virtual tokens are reported apart, by the
engine's own admission rules (Engine.tokenize), so the count is what a generation request would use.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, SettingsDep
from server.api.errors import ErrorContext, ErrorInContext
from server.api.openapi import errors
from server.api.routes.chat import templated
from server.api.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter

router = APIRouter(tags=["tokenize"])  # needs the API token (server/api/auth.py)


@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(404, 415, 422))
async def tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep) -> TokenizeResponse:
    task = None if body.model in (None, settings.model_name()) else body.model
    if body.messages is not None:
        text, special, name = templated(engine.tokenizer, body.messages, body.add_generation_prompt), False, "messages"
    else:
        assert body.prompt is not None  # one of the two: checked by the schema
        text, special, name = body.prompt, True, "prompt"
    request = EngineRequest(text, task, raw=body.raw or body.messages is not None,
                            add_special_tokens=body.add_special_tokens if body.add_special_tokens is not None
                            else special)
    try:
        out = await run_in_threadpool(engine.tokenize, request)  # tokenizing is CPU work: off the event loop
    except Exception as exc:
        raise ErrorInContext(exc, ErrorContext(rename={"task": "model", "text": name})) from exc
    return TokenizeResponse(count=len(out.ids), max_model_len=engine.max_context, tokens=out.ids,
                            token_strs=[engine.tokenizer.decode([t]) for t in out.ids] if body.return_token_strs
                            else None, virtual_tokens=out.virtual_tokens, templated=out.templated)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(415, 422))
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    vocab = engine.base.model.config.get_text_config().vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParameter("tokens", f"token ids in [0, {vocab})", bad)
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, body.tokens))
