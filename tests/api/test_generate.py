"""POST /generate (plain and streamed) and POST /generate/batch over real HTTP."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.conftest import iter_sse, sse_events, upload_multipart

TEXT = "Translate English to French: cheese =>"


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tasks(llama_server, client, adapters):
    """One task of each kind on the shared server."""
    for task, method in (("gen-soft", "prompt_tuning"), ("gen-prefix", "prefix")):
        assert upload_multipart(client, task, adapters[method]).status_code in (200, 201)
    return {"soft": "gen-soft", "prefix": "gen-prefix"}


def test_health_names_the_model(client, llama_dir):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == llama_dir.name


def test_base_model_response_shape_and_defaults(llama_server, client):
    r = client.post("/generate", json={"text": TEXT, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"task", "text", "token_ids", "finish_reason", "usage"}
    assert body["task"] is None
    assert body["finish_reason"] == "length"
    assert len(body["token_ids"]) == 64  # the documented default max_new_tokens
    # The continuation only, tokenized exactly as tokenizer(text) does it.
    assert body["usage"] == {"prompt_tokens": len(llama_server.tokenizer(TEXT)["input_ids"]),
                             "virtual_tokens": 0, "completion_tokens": 64, "cached_tokens": 0}
    assert body["text"] == llama_server.tokenizer.decode(body["token_ids"])


def test_uploaded_tasks_give_peft_greedy_tokens(client, tasks, adapters, reference_greedy):
    for task, method in ((tasks["soft"], "prompt_tuning"), (tasks["prefix"], "prefix")):
        body = client.post("/generate", json={"task": task, "text": TEXT, "max_new_tokens": 6,
                                              "ignore_eos": True}).json()
        assert body["token_ids"] == reference_greedy(adapters[method], TEXT, 6), task
        assert body["task"] == task
        assert body["usage"]["virtual_tokens"] == {"prompt_tuning": 5, "prefix": 3}[method]


def test_stream_pieces_add_up_to_the_plain_response(client, tasks):
    request = {"task": tasks["prefix"], "text": TEXT, "max_new_tokens": 20, "ignore_eos": True}
    plain = client.post("/generate", json=request).json()
    with client.stream("POST", "/generate", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(data) for _, data in sse_events(r)]
    *pieces, last = events
    assert all(set(e) == {"text", "token_ids"} for e in pieces)
    assert "".join(e["text"] for e in pieces) == plain["text"]
    assert [t for e in pieces for t in e["token_ids"]] == plain["token_ids"]
    assert last["finish_reason"] == "length" and last["usage"] == plain["usage"]


def test_seeded_sampling_is_reproducible(client):
    request = {"text": TEXT, "max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 7,
               "ignore_eos": True}
    first = client.post("/generate", json=request).json()["token_ids"]
    assert client.post("/generate", json=request).json()["token_ids"] == first


def test_stop_string_ends_the_text_before_it(client):
    free = client.post("/generate", json={"text": TEXT, "max_new_tokens": 30, "ignore_eos": True}).json()
    stop = free["text"][5:8]
    assert stop.strip(), "the tiny model's continuation should have text to stop at"
    body = client.post("/generate", json={"text": TEXT, "max_new_tokens": 30, "ignore_eos": True,
                                          "stop": [stop]}).json()
    assert body["finish_reason"] == "stop"
    assert stop not in body["text"] and free["text"].startswith(body["text"])


def test_batch_results_come_in_order_and_match_single_requests(client, tasks):
    entries = [
        {"text": TEXT, "max_new_tokens": 5, "ignore_eos": True},
        {"task": tasks["soft"], "text": "the quick brown fox", "max_new_tokens": 7, "ignore_eos": True},
        {"task": tasks["prefix"], "text": "SELECT name FROM", "max_new_tokens": 3, "ignore_eos": True},
        {"task": tasks["soft"], "text": TEXT, "max_new_tokens": 4, "ignore_eos": True},
    ]
    r = client.post("/generate/batch", json={"requests": entries})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(entries)
    for entry, result in zip(entries, results, strict=True):
        assert result == client.post("/generate", json=entry).json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": TEXT, "temperature": -1}, "temperature"),
        ({"text": TEXT, "top_p": 0}, "top_p"),
        ({"text": TEXT, "top_k": -3}, "top_k"),
        ({"text": TEXT, "seed": -1}, "seed"),
        ({"text": TEXT, "max_new_tokens": 0}, "max_new_tokens"),
        ({"text": TEXT, "max_new_tokens": 1001}, "max_new_tokens"),  # over the server's cap of 1000
        ({"text": TEXT, "stop": [""]}, "stop"),
        ({"max_new_tokens": 3}, "text"),  # text is required
        ({"text": 5}, "text"),
        ({"text": TEXT, "max_tokens": 3}, "max_tokens"),  # a misspelt field is refused, not ignored
        ({"text": TEXT, "ignore_eos": "sometimes"}, "ignore_eos"),
        ({"text": ""}, "text"),  # no token to continue from
    ],
)
def test_invalid_parameters_are_422_naming_the_field(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_cap_error_names_the_cap(client):
    error = client.post("/generate", json={"text": TEXT, "max_new_tokens": 5000}).json()["error"]
    assert "1000" in error["message"] and "5000" in error["message"]


def test_malformed_json_is_422(client):
    r = client.post("/generate", content=b'{"text": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] == "body" and "not valid JSON" in r.json()["error"]["message"]


def test_unknown_task_is_404(client):
    r = client.post("/generate", json={"task": "no-such-task", "text": TEXT})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "task" and "no-such-task" in r.json()["error"]["message"]
    with client.stream("POST", "/generate", json={"task": "no-such-task", "text": TEXT, "stream": True}) as r:
        assert r.status_code == 404  # a streamed request fails before the stream starts


def test_text_longer_than_the_context_is_422_with_the_limit(client):
    r = client.post("/generate", json={"text": "word " * 1100})  # max_context is 1024 on this server
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "text" and "1023" in error["message"]


def test_batch_errors_name_the_entry_and_run_nothing(client):
    entries = [{"text": TEXT}, {"text": TEXT, "temperature": -2}]
    r = client.post("/generate/batch", json={"requests": entries})
    assert r.status_code == 422 and r.json()["error"]["param"] == "requests[1].temperature"
    r = client.post("/generate/batch", json={"requests": [{"text": TEXT}, {"task": "missing", "text": TEXT}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "requests[1].task"
    assert client.post("/generate/batch", json={"requests": []}).status_code == 422


def test_unknown_route_and_method_use_the_error_shape(client):
    assert client.get("/nope").json()["error"]["type"] == "not_found_error"
    r = client.get("/generate")
    assert r.status_code == 405 and "error" in r.json()


def test_a_bad_request_does_not_disturb_others(client, llama_server):
    good = {"text": TEXT, "max_new_tokens": 8, "ignore_eos": True}
    before = client.post("/generate", json=good).json()
    for bad in ({"text": TEXT, "temperature": "nan"}, {"text": ""}, {"text": "x" * 5, "top_p": 2}):
        client.post("/generate", json=bad)
    assert client.post("/generate", json=good).json() == before
    assert client.get("/health").status_code == 200


def _wait_until_idle(server, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_leaves_a_stream_frees_its_slot(llama_server, client):
    assert _wait_until_idle(llama_server)
    # 1000 tokens take the tiny model several seconds; a cancelled request is gone within a step.
    long = {"text": TEXT, "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
    with llama_server.client() as c, c.stream("POST", "/generate", json=long) as r:
        events = iter_sse(r)  # kept: a dropped iterator may close the stream, and the server cancels at once
        next(events)  # it is generating now
        assert llama_server.engine.stats().running == 1
    assert _wait_until_idle(llama_server, 2)


def test_a_client_that_times_out_cancels_its_request(llama_server):
    assert _wait_until_idle(llama_server)
    long = {"text": TEXT, "max_new_tokens": 1000, "ignore_eos": True}
    with llama_server.client(timeout=httpx.Timeout(30, read=0.2)) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=long)
    assert _wait_until_idle(llama_server, 2)
