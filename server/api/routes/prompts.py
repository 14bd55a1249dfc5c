"""Task prompts: upload or replace (PUT), list and describe (GET), delete (DELETE).

An upload is either the raw safetensors file as the body (application/octet-stream) or a
multipart form with a `weights` file and an optional PEFT `config` file. Validation, storage
and versions are prompt_store's; this module only moves bytes between HTTP and the registry.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prompt_store.errors import UnknownTask
from prompt_store.geometry import Kind
from prompt_store.registry import PromptDescriptor, PromptRegistry, PromptSnapshot
from prompt_store.template import MAX_DESCRIPTION_CHARS, MAX_SYSTEM_CHARS
from server.api import conditional
from server.api.deps import RegistryDep
from server.api.errors import ReadOnlyPrompts, UnsupportedMediaType
from server.api.json_body import JsonRoute, parse_json
from server.api.openapi import errors
from server.api.schemas import PromptList
from server.engine.errors import InvalidParameter

# Reads need the API token, writes the admin token (server/api/auth.py).
router = APIRouter(tags=["prompts"], route_class=JsonRoute)


def _writable(request: Request) -> None:
    """Writes are refused (405) on a server started with --read-only-prompts, before the body is read."""
    if request.app.state.settings.read_only_prompts:
        raise ReadOnlyPrompts()


_WRITE = [Depends(_writable)]

MetadataQuery = Annotated[str | None, Query(
    description='JSON {"description": ..., "defaults": {max_new_tokens, temperature, top_k, top_p, stop, seed, '
                'ignore_eos, logprobs}}: the task\'s description and the generation defaults its requests start '
                "from (only what a request sends overrides them). Also a multipart field.")]
KindQuery = Annotated[Kind | None, Query(
    description="prompt or prefix; needed only when neither the file's metadata nor a config decides it")]
IfMatch = Annotated[str | None, Header(
    alias="If-Match", description='Write only if the task is at this version: its ETag ("7"), or * for any')]
IfNoneMatch = Annotated[str | None, Header(
    alias="If-None-Match", description="Write only if the task is at none of these versions; * for "
                                       "'only if it does not exist yet'")]
_ETAG = {"ETag": {"description": 'The task\'s version, quoted ("7"): send it back as If-Match',
                  "schema": {"type": "string"}}}


_PATCH_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "description": {"type": ["string", "null"], "maxLength": MAX_DESCRIPTION_CHARS},
        "defaults": {"type": ["object", "null"], "description": "max_new_tokens, temperature, top_k, top_p, stop, "
                                                                "seed, ignore_eos, logprobs, repetition_penalty, "
                                                                "presence_penalty, frequency_penalty; a null value "
                                                                "removes one"},
        "system": {"type": ["string", "null"], "maxLength": MAX_SYSTEM_CHARS,
                   "description": "The chat system message the task's conversations get when they bring none "
                                  "(/v1/chat/completions)"},
    },
}


def _upload_body(named: bool) -> dict:
    """The request body for the OpenAPI docs: the route reads it itself, in either form."""
    fields = {
        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
        "config": {"type": "string", "format": "binary", "description": "PEFT adapter_config.json (optional)"},
        "kind": {"type": "string", "enum": ["prompt", "prefix"]},
        "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
        "metadata": {"type": "string", "description": 'JSON {"description": ..., "defaults": {...}}'},
    }
    if named:
        fields["task"] = {"type": "string"}
    required = ["task", "weights"] if named else ["weights"]
    form = {"schema": {"type": "object", "properties": fields, "required": required}}
    content = {"multipart/form-data": form}
    if not named:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


@router.get("/prompts", response_model=PromptList)
def list_prompts(registry: RegistryDep):
    """Every task, including files in the prompt directory that failed to load (with their error)."""
    return {"prompts": [d.to_dict() for d in registry.list()]}


_STORED = {
    **errors(405, 412, 415, 422, 503, 507),
    200: {"description": "Replaced: the task's new descriptor", "headers": _ETAG},
    201: {"description": "Created: the task's descriptor (Location: /prompts/{task})", "headers": _ETAG},
}


@router.get("/prompts/{task}", responses={**errors(404, 422), 200: {"headers": _ETAG},
                                          304: {"description": "Not modified: If-None-Match names this version"}})
def describe_prompt(task: str, request: Request, registry: RegistryDep,
                    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None) -> Response:
    descriptor = registry.describe(task)
    headers = _etag_header(descriptor.version)
    if conditional.not_modified(conditional.header(request, "If-None-Match"), descriptor.version):
        return Response(status_code=304, headers=headers)
    return JSONResponse(descriptor.to_dict(), headers=headers)


@router.put("/prompts/{task}", status_code=201, responses=_STORED, dependencies=_WRITE,
            openapi_extra=_upload_body(named=False))
async def put_prompt(task: str, request: Request, registry: RegistryDep,
                     kind: KindQuery = None,
                     description: str | None = Query(None),
                     metadata: MetadataQuery = None,
                     if_match: IfMatch = None, if_none_match: IfNoneMatch = None) -> Response:
    """Upload or replace `task`: 201 when created, 200 when replaced; the body is its descriptor."""
    when = _conditions(request)  # a malformed header is refused before the body is read
    upload = await _read_upload(request, kind, description, metadata)
    return await _store(registry, task, upload, when)


@router.put("/prompts", status_code=201, responses=_STORED, dependencies=_WRITE,
            openapi_extra=_upload_body(named=True))
async def put_prompt_form(request: Request, registry: RegistryDep,
                          kind: KindQuery = None,
                          description: str | None = Query(None),
                          metadata: MetadataQuery = None,
                          if_match: IfMatch = None, if_none_match: IfNoneMatch = None) -> Response:
    """The multipart form of PUT /prompts/{task}, with the task name in a `task` field."""
    when = _conditions(request)
    if not _is_multipart(request):
        raise InvalidParameter("content-type", "multipart/form-data with a `task` field",
                               request.headers.get("content-type"))
    upload = await _read_upload(request, kind, description, metadata)
    task = upload.pop("task", None)
    if not task:
        raise InvalidParameter("task", "a form field naming the task", None)
    return await _store(registry, task, upload, when)


@router.patch("/prompts/{task}", dependencies=_WRITE, responses={**errors(404, 405, 412, 415, 422, 503, 507),
                                            200: {"description": "Changed: the task's new descriptor",
                                                  "headers": _ETAG}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/merge-patch+json": {"schema": _PATCH_SCHEMA},
                  "application/json": {"schema": _PATCH_SCHEMA}}}})
async def patch_prompt(task: str, request: Request, registry: RegistryDep, if_match: IfMatch = None,
                       if_none_match: IfNoneMatch = None) -> Response:
    """Change the task's description, generation defaults and chat system message without uploading its weights
    again: a JSON merge patch (RFC 7396; null removes). It makes a new version; If-Match guards it like PUT."""
    when = _conditions(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/merge-patch+json"):
        raise UnsupportedMediaType(f"a patch is application/merge-patch+json (or application/json), got {ctype}")
    changes = _json(await request.body(), "body")
    snapshot = await run_in_threadpool(registry.patch, task, changes, when=when)
    return JSONResponse(_describe_written(registry, task, snapshot).to_dict(), headers=_etag_header(snapshot.version))


@router.delete("/prompts/{task}", status_code=204, responses=errors(404, 405, 412, 422, 503, 507),
               dependencies=_WRITE)
def delete_prompt(task: str, request: Request, registry: RegistryDep, if_match: IfMatch = None,
                  if_none_match: IfNoneMatch = None) -> Response:
    registry.delete(task, when=_conditions(request))
    return Response(status_code=204)


async def _store(registry: PromptRegistry, task: str, upload: dict[str, Any],
                 when: conditional.Preconditions) -> Response:
    # Validation, dtype conversion and the fsync'd write take a while: keep them off the event loop.
    snapshot, created = await run_in_threadpool(lambda: registry.put(task, when=when, **upload))
    body = _describe_written(registry, task, snapshot).to_dict()
    headers = _etag_header(snapshot.version)
    if created:
        headers["Location"] = f"/prompts/{task}"
    return JSONResponse(body, status_code=201 if created else 200, headers=headers)


def _describe_written(registry: PromptRegistry, task: str, snapshot: PromptSnapshot) -> PromptDescriptor:
    """The descriptor of the version this write made (with its stored size), even if another write or a delete
    has landed since."""
    try:
        descriptor = registry.describe(task)
    except UnknownTask:  # deleted since: this write still happened
        return PromptDescriptor.of(snapshot, None)
    return descriptor if descriptor.version == snapshot.version else PromptDescriptor.of(snapshot, None)


def _conditions(request: Request) -> conditional.Preconditions:
    """If-Match and If-None-Match over all their header lines (the declared parameters document them)."""
    return conditional.preconditions(conditional.header(request, "If-Match"),
                                     conditional.header(request, "If-None-Match"))


def _etag_header(version: int | None) -> dict[str, str]:
    tag = conditional.etag(version)
    return {"ETag": tag} if tag is not None else {}


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _read_upload(request: Request, kind: str | None, description: str | None,
                       metadata: str | None) -> dict[str, Any]:
    """The registry.put arguments (data, kind, config, description, defaults) from either body form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        raise UnsupportedMediaType(f"upload the prompt as application/octet-stream (the safetensors file) "
                                   f"or multipart/form-data (weights + config files), got {ctype}")
    if not _is_multipart(request):
        return {"data": await request.body(), "kind": kind, "config": None,
                **_metadata_fields(metadata, description)}
    # At most a few small fields and two files; the body limit bounds the files' size.
    form = await request.form(max_files=2, max_fields=8)
    try:
        weights = form.get("weights")
        if not isinstance(weights, UploadFile):
            raise InvalidParameter("weights", "a file part named `weights` (adapter_model.safetensors)",
                                   type(weights).__name__ if weights is not None else None)
        config_part = form.get("config")  # a file part, or the JSON pasted as a text field
        if isinstance(config_part, UploadFile):
            config: bytes | None = await config_part.read() or None
        else:
            config = config_part.encode() if config_part else None
        out = {
            "data": await weights.read(),
            "config": config,
            "kind": kind or _text(form.get("kind")),
            **_metadata_fields(metadata or await _field(form.get("metadata")),
                               description or _text(form.get("description"))),
        }
        if "task" in form:
            out["task"] = _text(form.get("task"))
        return out
    finally:
        await form.close()


def _json(raw: bytes | str, param: str) -> Any:
    try:
        return parse_json(raw, param)  # nested too deep: JsonTooDeep naming `param`
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameter(param, "a JSON object", f"invalid JSON ({type(exc).__name__}: {exc})") from None


def _metadata_fields(metadata: str | None, description: str | None) -> dict[str, Any]:
    """`metadata` ({"description", "defaults"}, JSON) and an explicit `description` (which wins) as put()
    arguments."""
    fields: dict[str, Any] = {"description": description, "defaults": None}
    if metadata is None:
        return fields
    parsed = _json(metadata, "metadata")
    if not isinstance(parsed, dict) or not set(parsed) <= {"description", "defaults"}:
        raise InvalidParameter("metadata", 'a JSON object with "description" and/or "defaults"',
                               sorted(parsed) if isinstance(parsed, dict) else type(parsed).__name__)
    if description is None and parsed.get("description") is not None:
        if not isinstance(parsed["description"], str):
            raise InvalidParameter("metadata.description", "a string", parsed["description"])
        fields["description"] = parsed["description"]
    fields["defaults"] = parsed.get("defaults")
    return fields


async def _field(value: object) -> str | None:
    """A form field's text, sent as a plain field or as a file part (curl -F name=@file.json)."""
    if isinstance(value, UploadFile):
        raw = await value.read()
        try:
            return raw.decode("utf-8") or None
        except UnicodeDecodeError:
            raise InvalidParameter("metadata", "UTF-8 JSON", "bytes that do not decode") from None
    return _text(value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
