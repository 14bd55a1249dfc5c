"""PUT/GET/DELETE /prompts over real HTTP: both body forms, every PEFT kind, errors, restart, hot replace."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import save

from server.demo.tiny_models import build_tiny_model
from tests.api.conftest import EXPECTED, iter_sse, stream_in_background, upload_multipart, upload_raw

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


def prompt_bytes(tensor: torch.Tensor, **metadata: str) -> bytes:
    return save({"prompt_embeddings": tensor.contiguous()}, metadata=metadata or None)


@pytest.mark.parametrize("method", list(EXPECTED))
def test_multipart_upload_of_each_peft_kind(client, adapters, method):
    task = f"mp-{method.replace('_', '-')}"
    r = upload_multipart(client, task, adapters[method])
    assert r.status_code == 201, r.text
    kind, n = EXPECTED[method]
    body = r.json()
    assert (body["task"], body["kind"], body["num_virtual_tokens"]) == (task, kind, n)
    assert body["version"] >= 1 and len(body["sha256"]) == 64 and body["error"] is None
    assert r.headers["location"] == f"/prompts/{task}"
    assert client.get(f"/prompts/{task}").json() == body
    gen = client.post("/generate", json={"task": task, "text": TEXT, "max_new_tokens": 3}).json()
    assert gen["usage"]["virtual_tokens"] == n


@pytest.mark.parametrize("method", list(EXPECTED))
def test_raw_safetensors_upload_of_each_peft_kind(client, adapters, method):
    """PEFT's weights file alone: no metadata, so the kind comes from `?kind=` (or the shape)."""
    task = f"raw-{method.replace('_', '-')}"
    kind, n = EXPECTED[method]
    data = (adapters[method] / "adapter_model.safetensors").read_bytes()
    r = upload_raw(client, task, data, params={"kind": kind})
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["num_virtual_tokens"]) == (kind, n)
    # On this model the widths differ (64 vs 128), so the shape alone also decides the kind.
    r = upload_raw(client, task + "-x", data)
    assert r.status_code == 201 and r.json()["kind"] == kind


def test_multipart_without_config_and_the_named_form(client, adapters):
    r = upload_multipart(client, "mp-noconfig", adapters["prefix"], with_config=False)
    assert r.status_code == 201 and r.json()["kind"] == "prefix"
    data = (adapters["prompt_tuning"] / "adapter_model.safetensors").read_bytes()
    r = client.put("/prompts", data={"task": "named-form", "kind": "prompt"},
                   files={"weights": ("adapter_model.safetensors", data)})
    assert r.status_code == 201, r.text
    assert r.json()["task"] == "named-form" and r.json()["num_virtual_tokens"] == 5
    r = client.put("/prompts", files={"weights": ("w.safetensors", data)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "task"


def test_replace_is_200_new_version_and_takes_effect_at_once(client, adapters):
    task = "replace-me"
    assert upload_multipart(client, task, adapters["prompt_tuning"]).status_code == 201
    request = {"task": task, "text": TEXT, "max_new_tokens": 8, "ignore_eos": True}
    before = client.post("/generate", json=request).json()
    first = client.get(f"/prompts/{task}").json()
    r = upload_multipart(client, task, adapters["prefix_projection"])
    assert r.status_code == 200, r.text
    assert r.json()["version"] > first["version"] and r.json()["sha256"] != first["sha256"]
    assert r.json()["kind"] == "prefix"
    after = client.post("/generate", json=request).json()
    assert after["usage"]["virtual_tokens"] == 6 and after["token_ids"] != before["token_ids"]


def test_list_get_delete(client, adapters):
    assert upload_multipart(client, "to-delete", adapters["prefix"]).status_code == 201
    listed = client.get("/prompts").json()["prompts"]
    assert "to-delete" in {p["task"] for p in listed}
    assert client.delete("/prompts/to-delete").status_code == 204
    assert client.get("/prompts/to-delete").status_code == 404
    assert client.delete("/prompts/to-delete").status_code == 404
    r = client.post("/generate", json={"task": "to-delete", "text": TEXT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "task"
    assert "to-delete" not in {p["task"] for p in client.get("/prompts").json()["prompts"]}


def test_an_unknown_task_names_the_closest_served_tasks_on_every_endpoint(client, adapters):
    assert upload_multipart(client, "sentiment", adapters["prompt_tuning"]).status_code in (200, 201)
    hint = "unknown task 'sentimnt'; did you mean 'sentiment'"
    answers = {
        "GET /prompts/{task}": client.get("/prompts/sentimnt"),
        "DELETE /prompts/{task}": client.delete("/prompts/sentimnt"),
        "PATCH /prompts/{task}": client.patch("/prompts/sentimnt", json={"description": "x"}),
        "/generate": client.post("/generate", json={"task": "sentimnt", "text": TEXT}),
        "/generate/batch": client.post("/generate/batch", json={"requests": [{"task": "sentimnt", "text": TEXT}]}),
        "/tokenize": client.post("/tokenize", json={"model": "sentimnt", "prompt": TEXT}),
        "/v1/models/{model}": client.get("/v1/models/sentimnt"),
        "/v1/completions": client.post("/v1/completions", json={"model": "sentimnt", "prompt": TEXT}),
        "/v1/chat/completions": client.post("/v1/chat/completions", json={
            "model": "sentimnt", "messages": [{"role": "user", "content": TEXT}]}),
    }
    for endpoint, r in answers.items():
        assert r.status_code == 404, (endpoint, r.text)
        assert hint in r.json()["error"]["message"], (endpoint, r.json())
    assert answers["/generate"].json()["error"]["message"] == "unknown task 'sentimnt'; did you mean 'sentiment'?"
    # OpenAI's endpoints add that `model` may also name the base model, as a sentence after the question.
    message = answers["/v1/completions"].json()["error"]["message"]
    assert message.startswith(hint + "? `model` is a task name or ")
    r = client.post("/generate", json={"task": "zzzzzz", "text": TEXT})  # nothing close: no suggestion
    assert r.status_code == 404 and r.json()["error"]["message"] == "unknown task 'zzzzzz'"
    assert client.delete("/prompts/sentiment").status_code == 204


def test_invalid_prompt_file_is_422_naming_expected_and_actual(client):
    r = upload_raw(client, "bad-width", prompt_bytes(torch.randn(4, 100)))
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] and "100" in error["message"] and ("64" in error["message"] or "128" in error["message"])
    r = upload_raw(client, "bad-file", b"not a safetensors file at all")
    assert r.status_code == 422 and r.json()["error"]["message"]
    r = upload_raw(client, "nan", prompt_bytes(torch.full((2, 64), float("nan"))), params={"kind": "prompt"})
    assert r.status_code == 422
    r = upload_raw(client, "bad-kind", prompt_bytes(torch.randn(2, 64)), params={"kind": "lora"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "kind"
    assert client.get("/prompts/bad-width").status_code == 404  # nothing was stored


def test_invalid_task_name_is_refused(client):
    r = upload_raw(client, "..hidden", prompt_bytes(torch.randn(2, 64)))
    assert r.status_code == 422 and r.json()["error"]["param"] == "task"


def test_json_body_is_415(client):
    r = client.put("/prompts/json-body", json={"weights": [1, 2]})
    assert r.status_code == 415 and "octet-stream" in r.json()["error"]["message"]


def test_ambiguous_shape_is_422_asking_for_kind(start_server, tmp_path_factory):
    """On a model where hidden == layers*2*kv_dim, a bare [n, 64] tensor fits both kinds."""
    model = build_tiny_model(tmp_path_factory.mktemp("one-layer"), arch="llama", num_hidden_layers=1)
    server = start_server(model=str(model))
    try:
        with server.client() as c:
            r = upload_raw(c, "which", prompt_bytes(torch.randn(3, 64)))
            assert r.status_code == 422 and r.json()["error"]["param"] == "kind"
            assert "kind" in r.json()["error"]["message"]
            r = upload_raw(c, "which", prompt_bytes(torch.randn(3, 64)), params={"kind": "prefix"})
            assert r.status_code == 201
    finally:
        server.stop()


def test_body_too_large_is_413_before_reading(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_prompt_bytes=4096, max_request_bytes=2048)
    big = prompt_bytes(torch.randn(64, 64))  # 16 KiB: over max_prompt_bytes, within the HTTP upload limit
    try:
        with server.client() as c:
            # Over the registry's limit but within the HTTP envelope: refused by the registry.
            r = upload_raw(c, "big", big)
            assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
            # A declared length over the HTTP limit is refused from the header alone.
            huge = b"\0" * (4096 + 2**20 + 1)
            r = upload_raw(c, "huge", huge)
            assert r.status_code == 413 and str(len(huge)) in r.json()["error"]["message"]
            # No Content-Length (chunked): counted as it arrives and cut off at the limit.
            r = upload_raw(c, "huge", iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]))
            assert r.status_code == 413
            r = c.post("/generate", json={"text": "x" * 4000})
            assert r.status_code == 413 and r.json()["error"]["param"] == "body"
            assert c.get("/health").status_code == 200
    finally:
        server.stop()


def test_restart_keeps_prompts_and_lists_failed_files(start_server, llama_dir, adapters, tmp_path):
    prompt_dir = tmp_path / "prompts"
    first = start_server(model=str(llama_dir), prompt_dir=prompt_dir)
    request = {"task": "kept", "text": TEXT, "max_new_tokens": 6, "ignore_eos": True}
    with first.client() as c:
        assert upload_multipart(c, "kept", adapters["p_tuning"]).status_code == 201
        assert upload_raw(c, "kept-raw", (adapters["prefix"] / "adapter_model.safetensors").read_bytes(),
                          params={"kind": "prefix"}).status_code == 201
        described = {p["task"]: p for p in c.get("/prompts").json()["prompts"]}
        before = c.post("/generate", json=request).json()
    first.stop()
    (prompt_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")

    second = start_server(model=str(llama_dir), prompt_dir=prompt_dir)
    try:
        with second.client() as c:
            listed = {p["task"]: p for p in c.get("/prompts").json()["prompts"]}
            for task in ("kept", "kept-raw"):
                for key in ("kind", "num_virtual_tokens", "sha256", "version"):
                    assert listed[task][key] == described[task][key], (task, key)
            assert listed["broken"]["error"]  # listed with its error, and the others still load
            assert c.post("/generate", json=request).json() == before
            r = c.post("/generate", json={"task": "broken", "text": TEXT})
            assert r.status_code == 404 and "failed to load" in r.json()["error"]["message"]
    finally:
        second.stop()


def test_replace_while_streaming_keeps_the_old_version_for_running_requests(client, adapters):
    """A request keeps the prompt version it started with; the next request gets the new one."""
    task = "hot-swap"
    assert upload_multipart(client, task, adapters["prefix"]).status_code == 201
    request = {"task": task, "text": TEXT, "max_new_tokens": 60, "ignore_eos": True}
    old = client.post("/generate", json=request).json()

    streamed, first_piece, thread = stream_in_background(
        lambda: client.stream("POST", "/generate", json={**request, "stream": True}))
    assert first_piece.wait(30)
    r = upload_multipart(client, task, adapters["prefix_projection"])  # replaced mid-stream
    assert r.status_code == 200
    thread.join(60)
    tokens = [t for e in streamed[:-1] for t in e["token_ids"]]
    assert tokens == old["token_ids"] and streamed[-1]["usage"]["virtual_tokens"] == 3
    new = client.post("/generate", json=request).json()
    assert new["usage"]["virtual_tokens"] == 6 and new["token_ids"] != old["token_ids"]


def test_concurrent_streams_of_one_task_during_replace(llama_server, adapters):
    """Several clients streaming the task while it is replaced: every stream completes whole."""
    task = "hot-swap-many"
    with llama_server.client() as c:
        assert upload_multipart(c, task, adapters["prompt_tuning"]).status_code == 201
    results: list[list] = [[] for _ in range(4)]
    started = threading.Barrier(5)

    def stream(i: int) -> None:
        with llama_server.client() as c, c.stream("POST", "/generate", json={
            "task": task, "text": f"{TEXT} {i}", "max_new_tokens": 40, "ignore_eos": True, "stream": True,
        }) as r:
            events = iter_sse(r)
            results[i].append(json.loads(next(events)[1]))
            started.wait(30)
            results[i].extend(json.loads(data) for _, data in events)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(30)
    with llama_server.client() as c:
        assert upload_multipart(c, task, adapters["p_tuning"]).status_code == 200
    for t in threads:
        t.join(60)
    for events in results:
        assert events[-1]["finish_reason"] == "length"
        assert events[-1]["usage"] == {"prompt_tokens": events[-1]["usage"]["prompt_tokens"],
                                       "virtual_tokens": 5, "completion_tokens": 40,
                                       "cached_tokens": events[-1]["usage"]["cached_tokens"]}
        assert sum(len(e["token_ids"]) for e in events[:-1]) == 40

