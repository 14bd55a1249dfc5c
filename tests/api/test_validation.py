"""Strict request validation (issue 11): no coercion between JSON types, one answer for a malformed task
name on every endpoint, a cap on every list, and a 415 that names the content type to send."""

from __future__ import annotations

import pytest

from tests.api.conftest import invalid_status


@pytest.fixture
def client(llama_server):
    with llama_server.client() as c:
        yield c



BAD_NAME = "bad name!"  # breaks the naming rules: 422 everywhere; a well-formed unknown name is a 404


@pytest.mark.parametrize(("body", "param"), [
    ({"text": "hi", "max_new_tokens": True}, "max_new_tokens"),
    ({"text": "hi", "ignore_eos": "yes"}, "ignore_eos"),
    ({"text": "hi", "max_new_tokens": "3"}, "max_new_tokens"),
    ({"text": "hi", "temperature": "0.5"}, "temperature"),
    ({"text": "hi", "seed": 1.5}, "seed"),
    ({"text": 5}, "text"),
    ({"text": "hi", "stream": 1}, "stream"),
])
def test_no_coercion_between_json_types(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_openai_fields_are_strict_too(client, llama_server):
    model = llama_server.settings.model_name()
    r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # OpenAI's status for it
    r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "echo": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_openai_names_on_promptswap_endpoints_hint_at_promptswap_names(client, llama_server):
    # /generate forbids unknown fields: OpenAI's max_tokens is refused with the field it takes instead.
    r = client.post("/generate", json={"text": "hi", "max_tokens": 5})
    assert r.status_code == 422 and r.json()["error"] == {
        "type": "invalid_request_error", "param": "max_tokens",
        "message": "max_tokens: Extra inputs are not permitted, got 5; did you mean 'max_new_tokens'?"}
    r = client.post("/generate/batch", json={"requests": [{"text": "hi", "max_completion_tokens": 5}]})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "requests[0].max_completion_tokens"
    assert error["message"].endswith("did you mean 'max_new_tokens'?")
    r = client.post("/generate", json={"text": "hi", "temprature": 0.5})  # any misspelling, from the body's fields
    assert r.json()["error"]["message"].endswith("did you mean 'temperature'?")
    # A hint only names a field the endpoint takes: /tokenize has no max_new_tokens, and nothing is like xyz.
    for path, body in (("/tokenize", {"prompt": "hi", "max_tokens": 5}), ("/generate", {"text": "hi", "xyz": 1})):
        r = client.post(path, json=body)
        assert r.status_code == 422 and "did you mean" not in r.json()["error"]["message"], r.text
    # OpenAI's bodies ignore unknown fields, as OpenAI does (its clients send extras): max_new_tokens is not read.
    model = llama_server.settings.model_name()
    r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_new_tokens": 3})
    assert r.status_code == 200


def test_a_malformed_task_name_is_422_naming_it_on_every_endpoint(client, llama_server):
    checks = [
        (client.post("/generate", json={"task": BAD_NAME, "text": "hi"}), "task"),
        (client.post("/generate", json={"task": BAD_NAME, "text": "hi", "stream": True}), "task"),
        (client.post("/generate/batch", json={"requests": [{"task": BAD_NAME, "text": "hi"}]}), "requests[0].task"),
        (client.get(f"/prompts/{BAD_NAME}"), "task"),
        (client.delete(f"/prompts/{BAD_NAME}"), "task"),
        (client.put(f"/prompts/{BAD_NAME}", content=b"x", headers={"content-type": "application/octet-stream"}),
         "task"),
        (client.post("/v1/completions", json={"model": BAD_NAME, "prompt": "hi"}), "model"),
        (client.get(f"/v1/models/{BAD_NAME}"), "model"),
    ]
    for r, param in checks:
        assert r.status_code == invalid_status(r.request.url.path), (r.request.url, r.text)
        assert r.json()["error"]["param"] == param, (r.request.url, r.text)
    for r in (client.post("/generate", json={"task": "well-formed-unknown", "text": "hi"}),
              client.get("/prompts/well-formed-unknown"), client.get("/v1/models/well-formed-unknown")):
        assert r.status_code == 404, r.text


def test_every_list_has_a_cap(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_batch_requests=3)
    model = server.settings.model_name()
    try:
        with server.client() as c:
            r = c.post("/generate/batch", json={"requests": [{"text": "a"}] * 4})
            assert r.status_code == 422 and r.json()["error"]["param"] == "requests"
            assert "at most 3" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"model": model, "prompt": ["a"] * 4, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            assert c.post("/v1/completions", json={"model": model, "prompt": ["a"] * 3, "max_tokens": 1}).is_success
            r = c.post("/generate", json={"text": "a", "stop": ["x"] * 17})
            assert r.status_code == 422 and r.json()["error"]["param"] == "stop"
            doc = c.get("/openapi.json").json()["components"]["schemas"]
            assert "at most --max-batch-requests" in doc["BatchRequest"]["properties"]["requests"]["description"]
            assert "at most 16" in doc["GenerateParams"]["properties"]["stop"]["description"]
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/generate", "/generate/batch", "/v1/completions"])
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_wrong_content_type_is_415_naming_the_right_one(client, path, ctype):
    r = client.post(path, content=b'{"text": "hi"}', headers={"content-type": ctype})
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]["message"] and ctype in r.json()["error"]["message"]
