"""A task's generation defaults and description: given at upload (a `metadata` field or query parameter),
changed without new weights (PATCH, a JSON merge patch, If-Match, a new version), shown by GET /prompts and
/v1/models, and applied on every endpoint where the request did not send a value itself."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import upload_raw

TEXT = "the quick brown fox"
DEFAULTS = {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0.0, "stop": ["never-there"]}


def weights(seed: int = 1) -> bytes:
    return save({"prompt_embeddings": torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))},
                metadata={"kind": "prompt"})


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        meta = json.dumps({"description": "answers briefly", "defaults": DEFAULTS})
        assert upload_raw(c, "brief", weights(), params={"metadata": meta}).status_code == 201
        yield c


def test_defaults_are_stored_and_shown(client, llama_server):
    described = client.get("/prompts/brief").json()
    assert described["defaults"] == DEFAULTS and described["description"] == "answers briefly"
    card = client.get("/v1/models/brief").json()
    assert card["defaults"] == DEFAULTS and card["description"] == "answers briefly"
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["brief"]["defaults"] == DEFAULTS
    form = client.put("/prompts/brief-form", files={"weights": ("w.safetensors", weights(2))},
                      data={"metadata": json.dumps({"defaults": {"max_new_tokens": 2}})})
    assert form.status_code == 201 and form.json()["defaults"] == {"max_new_tokens": 2}


def test_only_values_a_request_sends_override_the_defaults(client, llama_server):
    r = client.post("/generate", json={"task": "brief", "text": TEXT}).json()
    assert r["usage"]["completion_tokens"] == 3  # the task's default, not the API's 64
    nulls = client.post("/generate", json={"task": "brief", "text": TEXT, "max_new_tokens": None, "seed": None})
    assert nulls.json()["usage"]["completion_tokens"] == 3  # an explicit null sends nothing
    assert client.post("/generate", json={"task": "brief", "text": TEXT, "max_new_tokens": 5}
                       ).json()["usage"]["completion_tokens"] == 5
    oa = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused")
    done = oa.completions.create(model="brief", prompt=TEXT)  # OpenAI's max_tokens 16 and temperature 1: not sent
    assert done.usage.completion_tokens == 3 and done.choices[0].text == r["text"]  # greedy, as the default says
    assert oa.completions.create(model="brief", prompt=TEXT, max_tokens=4).usage.completion_tokens == 4
    chat = oa.chat.completions.create(model="brief", messages=[{"role": "user", "content": TEXT}])
    assert chat.usage.completion_tokens == 3
    batch = client.post("/generate/batch", json={"requests": [{"task": "brief", "text": TEXT},
                                                              {"task": "brief", "text": TEXT, "max_new_tokens": 1}]})
    assert [x["usage"]["completion_tokens"] for x in batch.json()["results"]] == [3, 1]


def test_patch_changes_defaults_without_new_weights(client):
    upload_raw(client, "patched", weights(3), params={"metadata": json.dumps({"defaults": DEFAULTS})})
    before = client.get("/prompts/patched")
    patch = {"defaults": {"max_new_tokens": 2, "stop": None}, "description": "now shorter"}
    r = client.patch("/prompts/patched", json=patch, headers={"If-Match": before.headers["etag"]})
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["defaults"] == {"max_new_tokens": 2, "ignore_eos": True, "temperature": 0.0}  # merged; null removed
    assert after["version"] > before.json()["version"] and r.headers["etag"] == f'"{after["version"]}"'
    assert after["sha256"] == before.json()["sha256"]  # the same weights
    assert client.post("/generate", json={"task": "patched", "text": TEXT}).json()["usage"]["completion_tokens"] == 2
    stale = client.patch("/prompts/patched", json={"description": "x"}, headers={"If-Match": before.headers["etag"]})
    assert stale.status_code == 412 and stale.json()["error"]["current_version"] == after["version"]
    cleared = client.patch("/prompts/patched", json={"defaults": None, "description": None}).json()
    assert cleared["defaults"] is None and cleared["description"] is None


@pytest.mark.parametrize(("call", "status", "param"), [
    (lambda c: c.patch("/prompts/patched-x", json={"description": "x"}), 404, "task"),
    (lambda c: c.patch("/prompts/brief", json={"template": "x {text}"}), 422, "template"),
    (lambda c: c.patch("/prompts/brief", json={"defaults": {"temperature": 500}}), 422, "defaults.temperature"),
    (lambda c: c.patch("/prompts/brief", json={"defaults": {"max_tokens": 5}}), 422, "defaults.max_tokens"),
    (lambda c: c.patch("/prompts/brief", content=b"{", headers={"content-type": "application/json"}), 422, "body"),
    (lambda c: c.patch("/prompts/brief", content=b"{}", headers={"content-type": "text/plain"}), 415, None),
    (lambda c: c.patch("/prompts/brief", json={"defaults": []}), 422, "defaults"),
    (lambda c: c.patch("/prompts/brief", json={"defaults": False}), 422, "defaults"),
    (lambda c: c.patch("/prompts/brief", content=b"[" * 5000 + b"]" * 5000,
                       headers={"content-type": "application/json"}), 422, "body"),
    (lambda c: upload_raw(c, "deep-meta", weights(), params={"metadata": "[" * 5000 + "]" * 5000}), 422, "metadata"),
    (lambda c: upload_raw(c, "bad-defaults", weights(), params={"metadata": '{"defaults": {"top_p": 2}}'}), 422,
     "defaults.top_p"),
    (lambda c: upload_raw(c, "bad-meta", weights(), params={"metadata": '{"colour": "red"}'}), 422, "metadata"),
])
def test_bad_patches_and_metadata_are_refused_by_name(client, call, status, param):
    r = call(client)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


def test_a_default_above_the_servers_cap_is_lowered_to_it(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_new_tokens_cap=4)
    with server.client() as c:
        meta = json.dumps({"defaults": {"max_new_tokens": 50, "ignore_eos": True}})
        upload_raw(c, "long", weights(), params={"metadata": meta})
        assert c.post("/generate", json={"task": "long", "text": TEXT}).json()["usage"]["completion_tokens"] == 4
    server.stop()


@pytest.mark.parametrize(("call", "param"), [
    (lambda c: upload_raw(c, "sur", weights(), params={"metadata": '{"description": "\\ud800"}'}), "description"),
    (lambda c: c.patch("/prompts/brief", content=b'{"description": "\\ud800"}',
                       headers={"content-type": "application/json"}), "description"),
    (lambda c: c.patch("/prompts/brief", content=b'{"defaults": {"stop": ["\\ud800"]}}',
                       headers={"content-type": "application/json"}), "defaults.stop"),
    (lambda c: c.patch("/prompts/brief", json={"defaults": {"stop": ["a", 1]}}), "defaults.stop"),
])
def test_text_that_cannot_be_stored_is_refused_before_a_version_is_used(client, call, param):
    before = client.patch("/prompts/brief", json={"description": "answers briefly"}).json()["version"]
    r = call(client)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    after = client.patch("/prompts/brief", json={"description": "answers briefly"}).json()
    assert after["version"] == before + 1  # the refused write took no version number
    assert after["bytes"] is not None  # a patch answers with the stored size, as GET does


def test_metadata_may_come_as_a_file_part(client):
    r = client.put("/prompts/meta-file", files={"weights": ("w.safetensors", weights(4)),
                                                "metadata": ("m.json", b'{"defaults": {"max_new_tokens": 2}}')})
    assert r.status_code == 201 and r.json()["defaults"] == {"max_new_tokens": 2}
