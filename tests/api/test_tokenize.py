"""POST /tokenize and /detokenize (vLLM's shapes): the tokens a generation request would use, the task's template
applied and its virtual tokens reported; chat messages through the chat template; clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import upload_raw

TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def task(llama_server):
    width = llama_server.engine.base.geometry.hidden_size
    weights = save({"prompt_embeddings": torch.zeros(5, width)}, metadata={"kind": "prompt", "template": TEMPLATE})
    with llama_server.client() as c:
        assert upload_raw(c, "tok-task", weights).status_code == 201
    return "tok-task"


def test_a_prompt_gives_the_tokenizers_tokens(llama_server):
    tokenizer = llama_server.tokenizer
    with llama_server.client() as c:
        r = c.post("/tokenize", json={"prompt": "the quick brown fox", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = list(tokenizer("the quick brown fox")["input_ids"])
    assert body["tokens"] == ids and body["count"] == len(ids) and body["virtual_tokens"] == 0
    assert body["token_strs"] == [tokenizer.decode([t]) for t in ids] and body["templated"] is None
    assert body["max_model_len"] == llama_server.engine.max_context


def test_a_task_frames_the_text_with_its_template_and_reports_its_virtual_tokens(llama_server, task):
    tokenizer = llama_server.tokenizer
    with llama_server.client() as c:
        framed = c.post("/tokenize", json={"model": task, "prompt": "great film"}).json()
        raw = c.post("/tokenize", json={"model": task, "prompt": "great film", "raw": True}).json()
        generated = c.post("/generate", json={"task": task, "text": "great film", "max_new_tokens": 1}).json()
    text = TEMPLATE.replace("{text}", "great film")
    assert framed["templated"] == text and framed["tokens"] == list(tokenizer(text)["input_ids"])
    assert framed["virtual_tokens"] == 5 and framed["count"] == generated["usage"]["prompt_tokens"]
    assert raw["templated"] is None and raw["tokens"] == list(tokenizer("great film")["input_ids"])


def test_messages_go_through_the_chat_template(llama_server):
    tokenizer = llama_server.tokenizer
    messages = [{"role": "user", "content": "Where is the station?"}]
    with llama_server.client() as c:
        body = c.post("/tokenize", json={"messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_detokenize_gives_the_text_back(llama_server):
    with llama_server.client() as c:
        tokens = c.post("/tokenize", json={"prompt": "café über 東京"}).json()["tokens"]
        r = c.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200 and r.json()["prompt"] == llama_server.tokenizer.decode(tokens)


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, "prompt"),
    ("/tokenize", {}, 422, "prompt"),
    ("/tokenize", {"model": "no-such-task", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "surprise": 1}, 422, "surprise"),
    ("/detokenize", {"tokens": [1, 10**9]}, 422, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
])
def test_bad_input_is_a_clear_error(llama_server, path, body, status, param):
    with llama_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()
