"""The OpenAI-compatible API, driven by the official `openai` client (and raw HTTP for the wire format)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.api.conftest import sse_events, upload_multipart

TEXT = "Translate English to French: bread =>"


@pytest.fixture(scope="module")
def task(llama_server, adapters):
    with llama_server.client() as c:
        assert upload_multipart(c, "oa-prefix", adapters["prefix"]).status_code in (200, 201)
    return "oa-prefix"



def test_models_lists_the_base_model_and_every_task(oa, task, llama_dir):
    ids = [m.id for m in oa.models.list()]
    assert ids[0] == llama_dir.name  # the served name: the model path's last component
    assert task in ids
    assert oa.models.retrieve(task).id == task


def test_completion_with_a_task_equals_generate(oa, llama_server, task):
    c = oa.completions.create(model=task, prompt=TEXT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert c.object == "text_completion" and c.model == task and len(c.choices) == 1
    with llama_server.client() as http:
        ref = http.post("/generate", json={"task": task, "text": TEXT, "max_new_tokens": 7,
                                           "ignore_eos": True}).json()
    assert c.choices[0].text == ref["text"] and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 7 and c.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert c.usage.total_tokens == c.usage.prompt_tokens + 7


def test_base_model_name_means_no_prompt(oa, llama_server, llama_dir):
    c = oa.completions.create(model=llama_dir.name, prompt=TEXT, max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    with llama_server.client() as http:
        ref = http.post("/generate", json={"text": TEXT, "max_new_tokens": 5, "ignore_eos": True}).json()
    assert c.choices[0].text == ref["text"]


def test_streaming_with_the_client(oa, task):
    plain = oa.completions.create(model=task, prompt=TEXT, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    chunks = list(oa.completions.create(model=task, prompt=TEXT, max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == plain.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_stream_wire_format_ends_with_done(llama_server, task):
    with llama_server.client() as http, http.stream("POST", "/v1/completions", json={
        "model": task, "prompt": TEXT, "max_tokens": 3, "stream": True,
    }) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [data for _, data in sse_events(r)]
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        assert json.loads(data)["object"] == "text_completion"


def test_a_list_of_prompts_gives_one_choice_each(oa, task):
    prompts = [TEXT, "the quick brown fox", "SELECT"]
    c = oa.completions.create(model=task, prompt=prompts, max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, c.choices, strict=True):
        alone = oa.completions.create(model=task, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert choice.text == alone.choices[0].text


def test_errors_reach_the_client_as_openai_errors(oa, task):
    with pytest.raises(openai.NotFoundError) as err:
        oa.completions.create(model="no-such-task", prompt=TEXT, max_tokens=2)
    assert "no-such-task" in str(err.value)
    assert err.value.body["param"] == "model" and "`model` is a task name" in err.value.body["message"]
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=2, n=17)  # n > 1 is served (test_samples_http)
    assert err.value.status_code == 400 and set(err.value.body) == {"message", "type", "param", "code"}
    assert err.value.body["param"] == "n" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens" and err.value.body["message"].startswith("max_tokens must be")
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=task, prompt=[1, 2, 3], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=2, logprobs=6)  # OpenAI's range is 0..5
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=2, echo=True, stream=True)
    assert err.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt="", max_tokens=2)
    assert err.value.body["param"] == "prompt"  # the client's name for it, not the engine's `text`
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=[TEXT, "the end " * 2000], max_tokens=2)
    assert err.value.body["param"] == "prompt[1]"


def test_the_openapi_document_says_400_on_openais_endpoints_and_422_on_promptswaps(llama_server):
    with llama_server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert "400" in responses and "422" not in responses, path
        assert "OpenAI" in responses["400"]["description"]
    assert "422" in paths["/generate"]["post"]["responses"]
