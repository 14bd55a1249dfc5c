"""Holes found from outside (issue 10), each with a test that failed before its fix."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter, RequestTooLong

SURROGATE_BODY = '{"text": "abc \\ud800 def", "max_new_tokens": 2}'  # JSON for a lone surrogate


def post_raw(client, path: str, body: str):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", SURROGATE_BODY, "text"),
    ("/generate", SURROGATE_BODY[:-1] + ', "stream": true}', "text"),
    ("/generate/batch", '{"requests": [{"text": "fine"}, ' + SURROGATE_BODY + "]}", "requests[1].text"),
])
def test_text_that_cannot_be_encoded_is_a_422_naming_it(llama_server, path, body, param):
    with llama_server.client() as c:
        r = post_raw(c, path, body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param and "UTF-8" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize(("prompt", "param"), [('"x \\ud800"', "prompt"), ('["ok", "x \\udfff y"]', "prompt[1]")])
def test_openai_prompts_that_cannot_be_encoded_are_a_400_naming_the_prompt(llama_server, prompt, param):
    model = llama_server.settings.model_name()
    with llama_server.client() as c:
        r = post_raw(c, "/v1/completions", f'{{"model": "{model}", "prompt": {prompt}, "max_tokens": 2}}')
        assert r.status_code == 400 and r.json()["error"]["param"] == param


class RecordingTokenizer:
    """The engine's real tokenizer, recording whether each call ran on a thread with a running event loop."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((threading.current_thread().name, on_loop))
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture
def recording(llama_server):
    engine = llama_server.engine
    real = engine.admission.tokenizer  # what tokenizes every request's text, once, at admission
    engine.admission.tokenizer = RecordingTokenizer(real)
    yield engine.admission.tokenizer
    engine.admission.tokenizer = real


def test_tokenization_never_runs_on_the_event_loop(llama_server, recording):
    model = llama_server.settings.model_name()
    with llama_server.client() as c:
        assert c.post("/generate", json={"text": "hello there", "max_new_tokens": 2}).status_code == 200
        assert c.post("/generate", json={"text": "hello", "max_new_tokens": 2, "stream": True}).status_code == 200
        r = c.post("/generate/batch", json={"requests": [{"text": "a b"}, {"text": "c d"}]})
        assert r.status_code == 200
        r = c.post("/v1/completions", json={"model": model, "prompt": ["x", "y"], "max_tokens": 2})
        assert r.status_code == 200
    assert len(recording.calls) >= 6
    assert [call for call in recording.calls if call[1]] == []  # none ran where an event loop runs


def test_a_text_far_too_long_is_refused_before_it_is_tokenized(make_engine_for_llama):
    engine, tokenizer = make_engine_for_llama
    text = "x" * (engine.max_context * engine.admission.longest_token_chars + 1)  # more tokens than the context, surely
    with pytest.raises(RequestTooLong) as err:
        engine.submit(EngineRequest(text))
    assert err.value.param == "text" and "characters" in err.value.message
    assert tokenizer.calls == []  # refused by the cheap bound alone
    with pytest.raises(InvalidParameter, match="UTF-8"):
        engine.submit(EngineRequest("fine \ud800"))
    assert tokenizer.calls == []


@pytest.fixture
def make_engine_for_llama(llama_dir, tmp_path):
    from prompt_store import PromptRegistry
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine
    from server.model.model_loader import load_base_model

    base = load_base_model(llama_dir)
    engine = Engine(base, PromptRegistry(base.geometry, tmp_path / "prompts"), EngineConfig(max_context=64))
    engine.admission.tokenizer = RecordingTokenizer(engine.admission.tokenizer)
    yield engine, engine.admission.tokenizer


@pytest.mark.parametrize("path", ["/prompts", "/prompts/whatever"])
def test_after_a_500_the_keep_alive_connection_still_works(llama_server, monkeypatch, caplog, path):
    registry = llama_server.app.state.registry

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(registry, "list", broken)
    monkeypatch.setattr(registry, "describe", broken)
    with llama_server.client() as c:
        r = c.get(path)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "a bug" not in r.text  # the traceback stays in the log
        assert c.get("/health").status_code == 200  # the same connection: no reset
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(logged) == 1 and "a bug" in str(logged[0].exc_info[1])


@pytest.fixture(scope="module")
def secured_openapi(start_server, llama_dir):
    server = start_server(model=str(llama_dir), api_token="api-secret", admin_token="admin-secret")
    with server.client() as c:
        yield server, c.get("/openapi.json").json()
    server.stop()


def test_the_openapi_document_lists_every_status_with_the_error_schema(secured_openapi):
    _, doc = secured_openapi
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "422", "500", "503"} <= set(generate)
    for status in ("401", "404", "413", "422", "503"):
        assert generate[status]["content"]["application/json"]["schema"] == error, status
    assert "text/event-stream" in generate["200"]["content"]  # stream: true
    put = doc["paths"]["/prompts/{task}"]["put"]["responses"]
    assert {"200", "201", "400", "401", "413", "415", "422", "503", "507"} <= set(put)
    assert doc["paths"]["/prompts/{task}"]["put"]["security"] == [{"bearer": []}]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]  # open
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # not what this server answers
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in metrics and "application/json" not in metrics
    text = doc["components"]["schemas"]["GenerateParams"]["properties"]["text"]
    assert text.get("minLength") == 1  # "" is refused by the schema, not after it


def test_empty_text_is_refused_by_the_schema_naming_the_field(llama_server):
    with llama_server.client() as c:
        r = c.post("/generate", json={"text": ""})
        assert r.status_code == 422 and r.json()["error"]["param"] == "text"
        assert "at least 1 character" in r.json()["error"]["message"]


def test_options_and_405_list_every_method_of_the_path(secured_openapi):
    server, _ = secured_openapi
    with server.client() as c:
        r = c.options("/prompts/some-task")  # open: it only lists methods
        assert r.status_code == 204 and r.headers["allow"] == "DELETE, GET, OPTIONS, PATCH, PUT"
        r = c.post("/prompts/some-task", headers={"Authorization": "Bearer admin-secret"})
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, OPTIONS, PATCH, PUT"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert c.options("/no/such/path").status_code == 404
