"""A task's text template and choices (written by `promptswap train`): stored, shown, kept across a restart,
and applied to the text by every generation route unless `raw`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from prompt_store import InvalidChoices, InvalidTemplate
from prompt_store.template import apply_template, check_template, parse_choices
from tests.api.conftest import upload_raw

TEMPLATE = 'Review: {text}\nJSON {"label": ?}\nSentiment:'
CHOICES = ["good", "bad"]


def _file(template: str | None = TEMPLATE, choices: str | None = json.dumps(CHOICES)) -> bytes:
    meta = {"kind": "prompt"}
    if template is not None:
        meta["template"] = template
    if choices is not None:
        meta["choices"] = choices
    return save({"prompt_embeddings": torch.randn(4, 64, generator=torch.Generator().manual_seed(3))}, metadata=meta)


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


def test_the_placeholder_is_replaced_literally_once():
    assert apply_template(TEMPLATE, "a {text} b") == 'Review: a {text} b\nJSON {"label": ?}\nSentiment:'
    assert apply_template(None, "as is") == "as is"
    for bad in ("no placeholder", "{text} twice {text}", 7):
        with pytest.raises(InvalidTemplate):
            check_template(bad)
    for bad in ("[]", '["a", "a"]', '"a"', '["", "b"]', json.dumps([str(i) for i in range(33)]), "not json"):
        with pytest.raises(InvalidChoices):
            parse_choices(bad)


def test_template_and_choices_are_stored_and_shown(client):
    r = upload_raw(client, "tmpl", _file())
    assert r.status_code == 201, r.text
    assert r.json()["template"] == TEMPLATE and r.json()["choices"] == CHOICES
    assert client.get("/prompts/tmpl").json()["choices"] == CHOICES


def test_every_route_applies_the_template_unless_raw(client):
    upload_raw(client, "tmpl-gen", _file())
    body = {"task": "tmpl-gen", "max_new_tokens": 6, "ignore_eos": True}
    framed = client.post("/generate", json={**body, "text": "great film"}).json()
    by_hand = client.post("/generate", json={**body, "text": apply_template(TEMPLATE, "great film"), "raw": True})
    assert by_hand.status_code == 200 and framed["token_ids"] == by_hand.json()["token_ids"]
    assert framed["usage"]["prompt_tokens"] == by_hand.json()["usage"]["prompt_tokens"]
    bare = client.post("/generate", json={**body, "text": "great film", "raw": True}).json()
    assert bare["usage"]["prompt_tokens"] < framed["usage"]["prompt_tokens"]
    batch = client.post("/generate/batch", json={"requests": [{**body, "text": "great film"},
                                                              {**body, "text": "great film", "raw": True}]}).json()
    assert [r["token_ids"] for r in batch["results"]] == [framed["token_ids"], bare["token_ids"]]
    completion = {"model": "tmpl-gen", "prompt": "great film", "max_tokens": 6, "ignore_eos": True,
                  "temperature": 0}
    assert client.post("/v1/completions", json=completion).json()["usage"]["prompt_tokens"] == \
        framed["usage"]["prompt_tokens"]
    assert client.post("/v1/completions", json={**completion, "raw": True}).json()["usage"]["prompt_tokens"] == \
        bare["usage"]["prompt_tokens"]


def test_a_bad_template_or_choices_is_refused_naming_the_field(client):
    r = upload_raw(client, "tmpl-bad", _file(template="no placeholder"))
    assert r.status_code == 422 and r.json()["error"]["param"] == "template", r.text
    r = upload_raw(client, "tmpl-bad", _file(choices='["x", "x"]'))
    assert r.status_code == 422 and r.json()["error"]["param"] == "choices", r.text


def test_template_and_choices_survive_a_restart(tmp_path, llama_dir):
    from transformers import AutoConfig

    from prompt_store import ModelGeometry, PromptRegistry

    geometry = ModelGeometry.from_config(AutoConfig.from_pretrained(llama_dir))
    PromptRegistry(geometry, tmp_path).put("t", _file())
    again = PromptRegistry(geometry, tmp_path)
    again.load_all()
    assert again.get("t").template == TEMPLATE and again.get("t").choices == tuple(CHOICES)
