"""Choices over HTTP: the scoring answer's shape, mixed batches, the task's stored choices, refusals, and the
OpenAPI document describing both answers of /generate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import upload_raw

TEMPLATE = "Review: {text}\nVerdict:"


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        gen = torch.Generator().manual_seed(5)
        meta = {"kind": "prompt", "template": TEMPLATE, "choices": json.dumps(["thumbs up", "thumbs down"])}
        upload_raw(c, "verdict", save({"prompt_embeddings": torch.randn(4, 64, generator=gen)}, metadata=meta))
        yield c


def test_a_scoring_answer_lists_every_choice_most_likely_first(client):
    r = client.post("/generate", json={"task": "verdict", "text": "great film", "choices": ["good", "bad", "meh"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"task", "best", "choices", "usage"} and body["task"] == "verdict"
    scores = [c["logprob"] for c in body["choices"]]
    assert scores == sorted(scores, reverse=True) and body["best"] == body["choices"][0]["text"]
    for c in body["choices"]:
        assert set(c) == {"text", "logprob", "mean_logprob", "num_tokens"}
        assert c["mean_logprob"] == pytest.approx(c["logprob"] / c["num_tokens"])
    assert body["usage"]["completion_tokens"] == sum(c["num_tokens"] for c in body["choices"])
    # the template applies to scoring too: raw text scores differently
    raw = client.post("/generate", json={"task": "verdict", "text": "great film", "choices": ["good", "bad", "meh"],
                                         "raw": True}).json()
    assert raw["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"]


def test_stored_choices_and_a_mixed_batch(client):
    batch = {"requests": [
        {"task": "verdict", "text": "a dull film", "choices": True},
        {"task": "verdict", "text": "a dull film", "max_new_tokens": 3},
        {"text": "plain base model", "choices": ["yes", "no"]},
    ]}
    r = client.post("/generate/batch", json=batch)
    assert r.status_code == 200, r.text
    stored, generated, base = r.json()["results"]
    assert sorted(c["text"] for c in stored["choices"]) == ["thumbs down", "thumbs up"]
    assert "token_ids" in generated and generated["usage"]["completion_tokens"] == 3
    assert base["task"] is None and len(base["choices"]) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"task": "verdict", "text": "x", "choices": ["a"], "stream": True}, "choices"),
    ({"task": "verdict", "text": "x", "choices": [str(i) for i in range(65)]}, "choices"),
    ({"task": "verdict", "text": "x", "choices": ["a", "a"]}, "choices"),
    ({"task": "verdict", "text": "x", "choices": ["a", ""]}, "choices[1]"),
    ({"text": "no task", "choices": True}, "choices"),
])
def test_bad_choices_get_a_422_naming_the_field(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_a_bad_choice_in_a_batch_names_its_entry(client):
    batch = {"requests": [{"text": "fine", "choices": ["a"]}, {"text": "bad", "choices": ["a", "a"]}]}
    r = client.post("/generate/batch", json=batch)
    assert r.status_code == 422 and r.json()["error"]["param"] == "requests[1].choices"


def test_the_openapi_document_describes_both_answers(client):
    doc = client.get("/openapi.json").json()
    schema = doc["paths"]["/generate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    refs = json.dumps(schema)
    assert "GenerateResponse" in refs and "ChoicesResponse" in refs
    assert "choices" in doc["components"]["schemas"]["GenerateRequest"]["properties"]


def test_choices_refuse_per_token_logprobs_and_bodies_that_do_not_decode(client):
    r = client.post("/generate", json={"task": "verdict", "text": "x", "choices": ["a"], "logprobs": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/generate", content=b'{"text": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text
