"""Hostile bodies from outside (issue 28's minor holes), each against a real server over HTTP: the exact status,
the error's `param`, and a normal request served right after.

- a lone surrogate anywhere inside `response_format` (a pattern, an enum value, a description, a property
  name at any depth) was a 500; it is a 422 naming where it is, on every endpoint that takes a format;
- /detokenize answered 200 for any `model`; it checks it as /tokenize does;
- a body nested 100,000 deep was "bytes that do not decode"; nesting has its own 422 naming the limit;
- a task's `description` had no length cap; it is capped as `system` is, on uploads and patches alike.
"""

from __future__ import annotations

import json

import pytest

from prompt_store.template import MAX_DESCRIPTION_CHARS
from server.api.json_body import MAX_JSON_DEPTH
from tests.api.conftest import invalid_status, upload_multipart

LONE = "\\ud800"  # JSON's escape for a lone surrogate: the bodies below are written as JSON text


@pytest.fixture(scope="module")
def server(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_new_tokens_cap=64, max_context=512)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.settings.model_name()


def post_raw(client, path: str, body: str, method: str = "POST", content_type: str = "application/json"):
    return client.request(method, path, content=body.encode(), headers={"content-type": content_type})


def assert_still_serves(client, model: str) -> None:
    """A plain request and a formatted one, after the hostile one: both answered."""
    r = client.post("/generate", json={"text": "hello", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    schema = {"type": "object", "properties": {"a": {"type": "string", "enum": ["x"]}}, "required": ["a"]}
    r = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200


def _schema_format(schema: str) -> str:
    return f'{{"type": "json_schema", "json_schema": {{"name": "s", "schema": {schema}}}}}'


# (what the surrogate is in, the response_format as JSON text, the param named on /generate)
FORMATS = [
    ("regex pattern", f'{{"type": "regex", "pattern": "ab{LONE}c"}}', "response_format.pattern"),
    ("enum value", _schema_format(f'{{"enum": ["ok", "x{LONE}"]}}'), "response_format.json_schema.schema.enum[1]"),
    ("description", _schema_format(f'{{"type": "string", "description": "{LONE}"}}'),
     "response_format.json_schema.schema.description"),
    ("property name", _schema_format(f'{{"type": "object", "properties": {{"{LONE}": {{"type": "string"}}}}}}'),
     f'response_format.json_schema.schema.properties["{LONE}"]'),
    ("deep property name", _schema_format(
        f'{{"type": "object", "properties": {{"a": {{"type": "object", "properties": {{"b{LONE}": {{}}}}}}}}}}'),
     f'response_format.json_schema.schema.properties.a.properties["b{LONE}"]'),
    ("schema name", f'{{"type": "json_schema", "json_schema": {{"name": "{LONE}", "schema": {{}}}}}}',
     "response_format.json_schema.name"),
    ("pattern inside a schema", _schema_format(f'{{"type": "string", "pattern": "^{LONE}+$"}}'),
     "response_format.json_schema.schema.pattern"),
]
IDS = [what for what, _, _ in FORMATS]


def _check_surrogate_refused(r, param: str) -> None:
    assert r.status_code == invalid_status(r.request.url.path), r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and "UTF-8" in error["message"], error


@pytest.mark.parametrize(("fmt", "param"), [(f, p) for _, f, p in FORMATS], ids=IDS)
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_in_response_format_on_generate(server, model, fmt, param, stream):
    with server.client() as c:
        body = f'{{"text": "hello", "max_new_tokens": 4, "stream": {json.dumps(stream)}, "response_format": {fmt}}}'
        _check_surrogate_refused(post_raw(c, "/generate", body), param)
        assert_still_serves(c, model)


@pytest.mark.parametrize(("fmt", "param"), [(f, p) for _, f, p in FORMATS], ids=IDS)
def test_lone_surrogate_in_response_format_on_batch_names_the_entry(server, model, fmt, param):
    with server.client() as c:
        body = f'{{"requests": [{{"text": "fine"}}, {{"text": "hello", "response_format": {fmt}}}]}}'
        _check_surrogate_refused(post_raw(c, "/generate/batch", body), f"requests[1].{param}")
        assert_still_serves(c, model)


# /v1/* take no regex format: the schema ones only; their refusal is OpenAI's 400.
SCHEMA_FORMATS = [(f, p) for what, f, p in FORMATS if what != "regex pattern"]
SCHEMA_IDS = [what for what, _, _ in FORMATS if what != "regex pattern"]


@pytest.mark.parametrize(("fmt", "param"), SCHEMA_FORMATS, ids=SCHEMA_IDS)
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_in_response_format_on_openai_endpoints(server, model, endpoint, fmt, param, stream):
    prompt = '"prompt": "hello"' if endpoint == "/v1/completions" else '"messages": [{"role": "user", "content": "hi"}]'
    body = (f'{{"model": "{model}", {prompt}, "max_tokens": 4, "stream": {json.dumps(stream)}, '
            f'"response_format": {fmt}}}')
    with server.client() as c:
        _check_surrogate_refused(post_raw(c, endpoint, body), param)
        assert_still_serves(c, model)


def test_lone_surrogate_in_a_text_format_is_refused_too(server, model):
    """type "text" ignores the rest of the format, but what it carries is still the request's text."""
    fmt = f'{{"type": "text", "json_schema": {{"name": "n", "schema": {{"enum": ["{LONE}"]}}}}}}'
    body = f'{{"model": "{model}", "prompt": "hello", "max_tokens": 2, "response_format": {fmt}}}'
    with server.client() as c:
        _check_surrogate_refused(post_raw(c, "/v1/completions", body), "response_format.json_schema.schema.enum[0]")
        assert_still_serves(c, model)


# -- /detokenize checks `model` as /tokenize does ------------------------------------------------------------


@pytest.fixture(scope="module")
def task(server, adapters) -> str:
    with server.client() as c:
        assert upload_multipart(c, "hostile-task", adapters["prefix"]).status_code == 201
    return "hostile-task"


@pytest.mark.parametrize(("name", "status"), [
    ("no-such-task", 404),  # a name no task is served under
    ("../etc", 422),  # a name no task can have
    (None, 200),  # the base model
    ("BASE", 200),  # the base model's served name
    ("TASK", 200),  # a served task
])
def test_detokenize_checks_model_like_tokenize(server, model, task, name, status):
    name = {"BASE": model, "TASK": task}.get(name, name)  # type: ignore[arg-type]
    with server.client() as c:
        tok = c.post("/tokenize", json={"model": name, "prompt": "hello"})
        detok = c.post("/detokenize", json={"model": name, "tokens": [1, 2]})
        assert tok.status_code == detok.status_code == status, (tok.text, detok.text)
        if status != 200:
            assert tok.json()["error"]["param"] == detok.json()["error"]["param"] == "model"
            assert tok.json()["error"]["message"] == detok.json()["error"]["message"]
        else:
            assert detok.json()["prompt"] == c.post("/detokenize", json={"tokens": [1, 2]}).json()["prompt"]
        assert_still_serves(c, model)


# -- nesting depth -------------------------------------------------------------------------------------------


def _deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def _check_too_deep(r, param: str = "body") -> None:
    assert r.status_code == invalid_status(r.request.url.path), r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert f"at most {MAX_JSON_DEPTH} levels deep" in error["message"] and "decode" not in error["message"], error


@pytest.mark.parametrize("nested", [_deep_array, _deep_object], ids=["arrays", "objects"])
@pytest.mark.parametrize("path", ["/generate", "/generate/batch", "/v1/completions", "/v1/chat/completions",
                                  "/tokenize", "/detokenize"])
def test_a_body_nested_100k_deep_is_a_422_naming_the_limit(server, model, path, nested):
    with server.client() as c:
        _check_too_deep(post_raw(c, path, nested(100_000)))
        assert_still_serves(c, model)


def test_the_depth_limit_is_exact(server, model):
    """The whole body counts, the outermost object being 1: an ignored extra field at the limit is accepted,
    one level more is refused (a depth the interpreter's parser would still take)."""
    def body(depth: int) -> str:  # the body's object is 1 level, the field's arrays the rest
        return f'{{"model": "{model}", "prompt": "hello", "max_tokens": 1, "extra": {_deep_array(depth - 1)}}}'

    with server.client() as c:
        assert post_raw(c, "/v1/completions", body(MAX_JSON_DEPTH)).status_code == 200
        _check_too_deep(post_raw(c, "/v1/completions", body(MAX_JSON_DEPTH + 1)))
        assert_still_serves(c, model)


def test_a_deep_patch_or_upload_metadata_is_a_422_naming_it(server, model, task, adapters):
    with server.client() as c:
        patch = f'{{"description": "x", "defaults": {_deep_object(100_000)}}}'
        _check_too_deep(post_raw(c, f"/prompts/{task}", patch, method="PATCH",
                                 content_type="application/merge-patch+json"))
        r = upload_multipart(c, task, adapters["prefix"], data={"metadata": _deep_array(100_000)})
        _check_too_deep(r, "metadata")
        assert_still_serves(c, model)


# -- the description is capped as the system message is -----------------------------------------------------


def _description(client, task: str) -> str | None:
    return client.get(f"/prompts/{task}").json().get("description")


def _check_too_long(r) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "description", error
    assert str(MAX_DESCRIPTION_CHARS) in error["message"], error


def test_patch_description_is_capped(server, model, task):
    with server.client() as c:
        assert c.patch(f"/prompts/{task}", json={"description": "kept"}).status_code == 200
        for size in (MAX_DESCRIPTION_CHARS + 1, 3_000_000):
            _check_too_long(c.patch(f"/prompts/{task}", json={"description": "d" * size}))
        assert _description(c, task) == "kept"  # nothing written
        r = c.patch(f"/prompts/{task}", json={"description": "d" * MAX_DESCRIPTION_CHARS})
        assert r.status_code == 200, r.text
        assert _description(c, task) == "d" * MAX_DESCRIPTION_CHARS
        assert_still_serves(c, model)


@pytest.mark.parametrize("how", ["description field", "metadata field", "query"])
def test_upload_description_is_capped(server, model, adapters, how):
    long = "d" * (MAX_DESCRIPTION_CHARS + 1)
    with server.client() as c:
        if how == "description field":
            r = upload_multipart(c, "hostile-upload", adapters["prefix"], data={"description": long})
        elif how == "metadata field":
            r = upload_multipart(c, "hostile-upload", adapters["prefix"],
                                 data={"metadata": json.dumps({"description": long})})
        else:
            r = upload_multipart(c, "hostile-upload", adapters["prefix"], params={"description": long})
        _check_too_long(r)
        assert c.get("/prompts/hostile-upload").status_code == 404  # nothing stored
        assert_still_serves(c, model)
