"""n samples of one text over real HTTP: the openai client's n on chat and completions (OpenAI's choice order,
usage counting each prompt once), /generate's outputs shape and its indexed stream, /generate/batch entries with
n, and refusals naming the field. Greedy samples equal the single answer; seeded sample i equals a single request
with seed + i, so every check compares against n=1 answers of the same server."""

from __future__ import annotations

import json
from collections import defaultdict

import openai
import pytest

from tests.api.conftest import invalid_status, sse_events, upload_multipart

TEXT = "Translate English to French: bread =>"
PROMPTS = ["the quick brown fox", "Translate English to French: cheese =>"]
MESSAGES = [{"role": "user", "content": "Where is the station?"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def task(llama_server, adapters):
    """A task with virtual tokens, so that usage's counts include them."""
    with llama_server.client() as c:
        assert upload_multipart(c, "samples-prefix", adapters["prefix"]).status_code in (200, 201)
    return "samples-prefix"



@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


def _chat(oa, task, **kw):
    return oa.chat.completions.create(model=task, messages=MESSAGES, max_tokens=8, **kw)


def test_greedy_chat_samples_are_all_the_single_answer(oa, task):
    single = _chat(oa, task, **GREEDY)
    done = _chat(oa, task, n=3, **GREEDY)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.message.content for c in done.choices] == [single.choices[0].message.content] * 3
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in done.choices)
    # the conversation counts once; every choice's tokens count
    assert done.usage.prompt_tokens == single.usage.prompt_tokens
    assert done.usage.completion_tokens == 3 * 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + 24


def test_seeded_samples_are_repeatable_and_sample_i_draws_from_seed_plus_i(oa, task):
    sampled = {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    first = _chat(oa, task, n=3, seed=41, **sampled)
    again = _chat(oa, task, n=3, seed=41, **sampled)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # sampled, not greedy: the samples differ
    for i in range(3):
        assert _chat(oa, task, seed=41 + i, **sampled).choices[0].message.content == texts[i]


def test_completions_number_choices_prompt_major_and_count_each_prompt_once(oa, task):
    greedy = oa.completions.create(model=task, prompt=PROMPTS, max_tokens=6, n=2, **GREEDY)
    singles = [oa.completions.create(model=task, prompt=p, max_tokens=6, **GREEDY) for p in PROMPTS]
    assert singles[0].choices[0].text != singles[1].choices[0].text  # else the order would go unchecked
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    assert [c.text for c in greedy.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert greedy.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert greedy.usage.completion_tokens == 4 * 6
    # sampled: choice prompt * n + sample is that prompt's single answer with seed + sample
    seeded = {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    done = oa.completions.create(model=task, prompt=PROMPTS, max_tokens=6, n=2, best_of=2, seed=7, **seeded)
    for p, prompt in enumerate(PROMPTS):
        for s in range(2):
            alone = oa.completions.create(model=task, prompt=prompt, max_tokens=6, seed=7 + s, **seeded)
            assert done.choices[p * 2 + s].text == alone.choices[0].text, (p, s)


def test_echo_applies_to_every_choice(oa, llama_server):
    model = llama_server.settings.model_name()
    done = oa.completions.create(model=model, prompt=PROMPTS, max_tokens=3, n=2, echo=True, **GREEDY)
    assert [c.text.startswith(PROMPTS[c.index // 2]) for c in done.choices] == [True] * 4


def _by_index(chunks, text_of) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += text_of(choice) or ""
    return dict(texts)


def test_streamed_chat_samples_reassemble_into_the_whole_answer(oa, task):
    kw = {"n": 2, "seed": 5, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    whole = _chat(oa, task, **kw)
    chunks = list(_chat(oa, task, stream=True, stream_options={"include_usage": True}, **kw))
    assert _by_index(chunks, lambda c: c.delta.content) == {c.index: c.message.content for c in whole.choices}
    roles = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.role]
    assert [(r.index, r.delta.role, r.delta.content) for r in roles] == [(0, "assistant", ""), (1, "assistant", "")]
    assert all(c.choices[0].delta.role == "assistant" for c in chunks[:2])  # before any content
    finishes = sorted((c.choices[0].index, c.choices[0].finish_reason) for c in chunks
                      if c.choices and c.choices[0].finish_reason)
    assert finishes == [(0, "length"), (1, "length")]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_completions_reassemble_by_choice_index(oa, task):
    kw = {"model": task, "prompt": PROMPTS, "max_tokens": 6, "n": 2, "seed": 3, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    whole = oa.completions.create(**kw)
    chunks = list(oa.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert _by_index(chunks, lambda c: c.text) == {c.index: c.text for c in whole.choices}
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2, 3]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_generate_answers_every_sample_in_outputs(client, task):
    body = {"task": task, "text": TEXT, "max_new_tokens": 5, "ignore_eos": True, "temperature": 1.0, "seed": 21}
    r = client.post("/generate", json={**body, "n": 2})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"task", "outputs", "usage"} and answer["task"] == task
    singles = [client.post("/generate", json={**body, "seed": 21 + i}).json() for i in range(2)]
    for i, (out, single) in enumerate(zip(answer["outputs"], singles, strict=True)):
        assert out == {"index": i, "text": single["text"], "token_ids": single["token_ids"],
                       "finish_reason": "length"}  # no logprobs unless asked
    assert answer["usage"] == {"prompt_tokens": singles[0]["usage"]["prompt_tokens"],
                               "virtual_tokens": singles[0]["usage"]["virtual_tokens"], "completion_tokens": 10,
                               "cached_tokens": answer["usage"]["cached_tokens"]}
    assert answer["usage"]["virtual_tokens"] == 3
    asked = client.post("/generate", json={**body, "n": 2, "logprobs": 1}).json()
    assert [len(o["logprobs"]) for o in asked["outputs"]] == [5, 5]
    # n: 1 is the single answer, byte for byte (greedy, so that two calls agree)
    plain = {"task": task, "text": TEXT, "max_new_tokens": 5}
    assert client.post("/generate", json={**plain, "n": 1}).content == client.post("/generate", json=plain).content


def test_streamed_generate_events_carry_their_sample_index(client, task):
    body = {"task": task, "text": TEXT, "max_new_tokens": 6, "ignore_eos": True, "temperature": 1.0, "seed": 8,
            "n": 2}
    whole = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [(name, json.loads(data)) for name, data in sse_events(r)]
    assert all(name is None and "index" in e for name, e in events)
    for out in whole["outputs"]:
        mine = [e for _, e in events if e["index"] == out["index"]]
        assert "".join(e["text"] for e in mine) == out["text"]
        assert [t for e in mine for t in e["token_ids"]] == out["token_ids"]
        last = mine[-1]  # today's final event, for this sample
        assert last["finish_reason"] == "length" and last["text"] == "" and last["token_ids"] == []
        assert last["usage"] == {**whole["usage"], "completion_tokens": 6}
        assert all("finish_reason" not in e for e in mine[:-1])


def test_batch_entries_take_n(client, task):
    entries = [{"task": task, "text": TEXT, "max_new_tokens": 3, "n": 2},
               {"text": "the quick brown fox", "max_new_tokens": 3}]
    r = client.post("/generate/batch", json={"requests": entries})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    alone = client.post("/generate", json=entries[0] | {"n": 1}).json()
    assert [o["text"] for o in first["outputs"]] == [alone["text"]] * 2
    assert first["usage"]["completion_tokens"] == 2 * alone["usage"]["completion_tokens"]
    assert second == client.post("/generate", json=entries[1]).json()  # the single answer, as it was


def test_the_openapi_document_describes_the_samples_answer(client):
    doc = client.get("/openapi.json").json()
    schema = doc["paths"]["/generate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "SamplesResponse" in json.dumps(schema)
    assert "n" in doc["components"]["schemas"]["GenerateRequest"]["properties"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"text": "x", "n": 0}, "n"),
    ("/generate", {"text": "x", "n": 17}, "n"),
    ("/generate", {"text": "x", "n": 2, "choices": ["a", "b"]}, "n"),
    ("/generate/batch", {"requests": [{"text": "x"}, {"text": "y", "n": 17}]}, "requests[1].n"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 17}, "n"),
])
def test_bad_n_is_refused_naming_the_field(client, llama_server, path, body, param):
    if path.startswith("/v1"):
        body = {"model": llama_server.settings.model_name(), "max_tokens": 2, **body}
    r = client.post(path, json=body)
    assert r.status_code == invalid_status(path), r.text
    assert r.json()["error"]["param"] == param


def test_the_client_sees_best_of_refused(oa, task):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=task, prompt=TEXT, max_tokens=2, n=2, best_of=3)
    assert err.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=task, messages=MESSAGES, max_tokens=2, n=0)
    assert err.value.body["param"] == "n"


def test_a_batch_whose_samples_could_never_all_be_in_flight_is_a_422(llama_server):
    capacity = llama_server.engine.capacity
    entries = capacity // 16 + 1  # each with 16 samples: more than max_running + max_queue together
    with llama_server.client() as c:
        r = c.post("/generate/batch", json={"requests": [{"text": f"hi {i}", "max_new_tokens": 1, "n": 16}
                                                         for i in range(entries)]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "n", r.text
        assert str(capacity) in r.json()["error"]["message"]
        assert llama_server.engine.stats().waiting == 0  # nothing was submitted
