"""Penalties over HTTP: OpenAI's presence_penalty and frequency_penalty on chat and completions (the official
client), vLLM's repetition_penalty extension, /generate's three, a task default, and range errors naming the field."""

from __future__ import annotations

import pytest
import torch

from tests.api.conftest import invalid_status, upload_raw
from tests.peft_reference import greedy, load_reference

TEXT = "the quick brown fox jumps over the lazy dog the quick brown fox"


@pytest.fixture(scope="module")
def peft(llama_dir):
    from transformers import AutoTokenizer

    return load_reference(llama_dir), AutoTokenizer.from_pretrained(llama_dir)


def expected(peft, repetition=1.0, presence=0.0, frequency=0.0, steps=10, ids=None) -> list[int]:
    from transformers import RepetitionPenaltyLogitsProcessor

    model, tokenizer = peft

    def process(x, logits, out):
        if repetition != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(repetition)(x, logits)
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
        return logits

    return greedy(model, ids if ids is not None else list(tokenizer(TEXT)["input_ids"]), steps, process)


def test_generate_applies_all_three(llama_server, peft):
    body = {"text": TEXT, "max_new_tokens": 10, "ignore_eos": True, "repetition_penalty": 1.6,
            "presence_penalty": 0.4, "frequency_penalty": 0.7}
    with llama_server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == expected(peft, 1.6, 0.4, 0.7)


def test_openai_endpoints_take_openais_penalties_and_vllms_repetition_penalty(oa, llama_server, peft):
    model = llama_server.settings.model_name()
    done = oa.completions.create(model=model, prompt=TEXT, max_tokens=10, temperature=0, presence_penalty=1.0,
                                 frequency_penalty=0.5, extra_body={"ignore_eos": True, "repetition_penalty": 1.4},
                                 logprobs=0)
    tokenizer = llama_server.tokenizer
    assert done.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected(peft, 1.4, 1.0, 0.5)]
    messages = [{"role": "user", "content": TEXT}]
    chat = oa.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                      frequency_penalty=1.2, presence_penalty=-0.5, logprobs=True,
                                      extra_body={"ignore_eos": True})
    ids = list(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    want = expected(peft, presence=-0.5, frequency=1.2, ids=ids)
    assert [e.token for e in chat.choices[0].logprobs.content] == [tokenizer.decode([t]) for t in want]


def test_a_task_may_default_to_a_penalty(llama_server, peft):
    geometry_width = llama_server.engine.base.geometry.hidden_size
    from safetensors.torch import save

    weights = save({"prompt_embeddings": torch.zeros(1, geometry_width)},
                   metadata={"kind": "prompt", "defaults": '{"repetition_penalty": 1.6}'})
    with llama_server.client() as c:
        assert upload_raw(c, "penalized", weights).status_code == 201
        assert c.get("/prompts/penalized").json()["defaults"] == {"repetition_penalty": 1.6}
        plain = c.post("/generate", json={"task": "penalized", "text": TEXT, "max_new_tokens": 10, "ignore_eos": True,
                                          "repetition_penalty": 1.0})
        defaulted = c.post("/generate", json={"task": "penalized", "text": TEXT, "max_new_tokens": 10,
                                              "ignore_eos": True})
    assert plain.status_code == defaulted.status_code == 200
    assert plain.json()["token_ids"] != defaulted.json()["token_ids"]  # the request's own value wins


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/generate", "repetition_penalty", 0), ("/generate", "presence_penalty", 3),
    ("/generate", "frequency_penalty", -2.5),
    ("/v1/completions", "presence_penalty", 2.5), ("/v1/chat/completions", "repetition_penalty", 20),
])
def test_penalties_out_of_range_are_refused_naming_the_field(llama_server, path, field, value):
    body = {"text": TEXT} if path == "/generate" else {"model": llama_server.settings.model_name()}
    if path == "/v1/completions":
        body["prompt"] = TEXT
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": TEXT}]
    with llama_server.client() as c:
        r = c.post(path, json={**body, field: value})
    assert r.status_code == invalid_status(path) and r.json()["error"]["param"] == field, r.text
