"""response_format over HTTP: the openai client's json_schema and json_object on chat and completions, /generate's
regex, streamed and not, greedy and sampled; every answer parses and validates; bad formats are a 422 naming
response_format."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.api.conftest import invalid_status

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "stars": {"type": "integer", "minimum": 1,
                                                                          "maximum": 5}},
    "required": ["name", "stars"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}


def test_properties_keep_the_order_the_schema_declares(oa, llama_server):
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha"],
              "properties": {"zeta": {"enum": ["last letter"]}, "alpha": {"type": "object", "required": ["y", "b"],
                                                                         "additionalProperties": False,
                                                                         "properties": {"y": {"enum": [1]},
                                                                                        "b": {"enum": [2]}}}}}
    done = oa.chat.completions.create(
        model=llama_server.settings.model_name(), messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "ordered", "schema": schema}})
    parsed = json.loads(done.choices[0].message.content)
    assert list(parsed) == ["zeta", "alpha"] and list(parsed["alpha"]) == ["y", "b"]


@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_follow_the_schema(oa, llama_server, temperature, stream):
    model = llama_server.settings.model_name()
    kw = {"model": model, "messages": [{"role": "user", "content": "Review the cafe as JSON."}],
          "max_tokens": 80, "temperature": temperature, "seed": 3, "response_format": JSON_SCHEMA}
    if stream:
        chunks = list(oa.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        done = oa.chat.completions.create(**kw)
        text, finish = done.choices[0].message.content, [done.choices[0].finish_reason]
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == ["stop"]


def test_completions_take_a_schema_and_json_object(oa, llama_server):
    model = llama_server.settings.model_name()
    done = oa.completions.create(model=model, prompt=["a review:", "another:"], max_tokens=80, temperature=0,
                                 extra_body={"response_format": JSON_SCHEMA})
    for choice in done.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
        assert choice.finish_reason == "stop"
    free = oa.completions.create(model=model, prompt="json:", max_tokens=40, temperature=0,
                                 extra_body={"response_format": {"type": "json_object"}})
    assert free.choices[0].text.startswith("{")


def test_generate_takes_a_regex(llama_server):
    pattern = r"(red|green|blue) [0-9]{2}"
    with llama_server.client() as c:
        for body in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 9}):
            r = c.post("/generate", json={"text": "a colour and a number:", "max_new_tokens": 20, "ignore_eos": True,
                                          "response_format": {"type": "regex", "pattern": pattern}, **body})
            assert r.status_code == 200, r.text
            assert re.fullmatch(pattern, r.json()["text"]), r.json()["text"]
        r = c.post("/generate/batch", json={"requests": [
            {"text": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}},
            {"text": "y", "max_new_tokens": 5}]})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["results"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"text": "x", "response_format": {"type": "regex", "pattern": "(("}}, "response_format"),
    ("/generate", {"text": "x", "response_format": {"type": "regex"}}, "response_format.pattern"),
    ("/generate", {"text": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/generate", {"text": "x", "response_format": {"type": "json_object", "jsonschema": {}}},
     "response_format.jsonschema"),  # a misspelt key on promptswap's own API is an error, not ignored
    ("/generate", {"text": "x", "choices": ["a", "b"], "response_format": {"type": "json_object"}},
     "response_format"),
    ("/generate/batch", {"requests": [{"text": "x"}, {"text": "y", "response_format": {"type": "regex",
                                                                                       "pattern": "(("}}]},
     "requests[1].response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "regex", "pattern": "a+"}},
     "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}}, "response_format"),
])
def test_a_format_that_cannot_be_applied_is_refused_naming_it(llama_server, path, body, param):
    if path.startswith("/v1"):
        body = {"model": llama_server.settings.model_name(), **body}
    with llama_server.client() as c:
        r = c.post(path, json=body)
        assert r.status_code == invalid_status(path), r.text
        assert r.json()["error"]["param"] == param, r.json()
        assert c.post("/generate", json={"text": "still fine", "max_new_tokens": 2}).status_code == 200
