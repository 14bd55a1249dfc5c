"""Log-probabilities over HTTP: /generate's own shape (streamed too), OpenAI's completions shape with echo
(prompt tokens scored), checked against PEFT's logits on the tiny Llama."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from tests.api.conftest import iter_sse
from tests.peft_reference import PeftReference

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def peft_logprobs(llama_dir):
    reference = PeftReference(llama_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = reference.model(None)(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return reference.tokenizer, logprobs


def test_generate_reports_each_tokens_logprob_and_alternatives(client, peft_logprobs):
    tokenizer, logprobs = peft_logprobs
    body = client.post("/generate", json={"text": TEXT, "max_new_tokens": 4, "ignore_eos": True, "logprobs": 3}).json()
    prompt = list(tokenizer(TEXT)["input_ids"])
    expected = logprobs(prompt + body["token_ids"])
    assert len(body["logprobs"]) == 4
    for i, entry in enumerate(body["logprobs"]):
        row = expected[len(prompt) - 1 + i]
        assert entry["token_id"] == body["token_ids"][i] and entry["token"] == tokenizer.decode([entry["token_id"]])
        assert entry["logprob"] == pytest.approx(row[entry["token_id"]].item(), abs=2e-4)
        assert [t["token_id"] for t in entry["top"]] == torch.topk(row, 3).indices.tolist()
    assert "logprobs" not in client.post("/generate", json={"text": TEXT, "max_new_tokens": 2}).json()
    assert client.post("/generate", json={"text": TEXT, "logprobs": 21}).json()["error"]["param"] == "logprobs"


def test_streamed_pieces_carry_their_tokens_logprobs(client):
    whole = client.post("/generate", json={"text": TEXT, "max_new_tokens": 5, "ignore_eos": True,
                                           "logprobs": 1}).json()
    with client.stream("POST", "/generate", json={"text": TEXT, "max_new_tokens": 5, "ignore_eos": True,
                                                  "logprobs": 1, "stream": True}) as r:
        events = [json.loads(data) for _, data in iter_sse(r)]
    streamed = [e for event in events[:-1] for e in event.get("logprobs", [])]
    assert [e["token_id"] for e in streamed] == whole["token_ids"]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole["logprobs"]], abs=1e-5)


def test_openai_completions_logprobs_with_echo_score_the_prompt(llama_server, peft_logprobs):
    tokenizer, logprobs = peft_logprobs
    oa = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused")
    done = oa.completions.create(model=llama_server.settings.model_name(), prompt=TEXT, max_tokens=3, logprobs=2,
                                 echo=True, temperature=0, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    prompt = list(tokenizer(TEXT)["input_ids"])
    lp = choice.logprobs
    assert choice.text.startswith(TEXT) and len(lp.tokens) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    ids = prompt + list(tokenizer(choice.text[len(TEXT):], add_special_tokens=False)["input_ids"])[:3]
    expected = logprobs(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=2e-4)
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2, and the chosen token if it is not among them
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = oa.completions.create(model=llama_server.settings.model_name(), prompt=TEXT, max_tokens=3, logprobs=0,
                                  temperature=0)
    assert len(plain.choices[0].logprobs.tokens) == 3 and not plain.choices[0].text.startswith(TEXT)
