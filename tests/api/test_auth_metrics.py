"""Bearer tokens on the admin and API endpoints, the open-prompts warning, and Prometheus metrics."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import scrape_metrics, upload_multipart, upload_raw

ADMIN, API = "admin-secret", "api-secret"


@pytest.fixture(scope="module")
def secured(start_server, llama_dir):
    server = start_server(model=str(llama_dir), admin_token=ADMIN, api_token=API)
    yield server
    server.stop()


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def test_prompt_writes_need_the_admin_token(secured, adapters):
    with secured.client() as c:
        for headers in ({}, bearer("wrong"), bearer(API), {"authorization": ADMIN}):
            r = upload_multipart(c, "secret-task", adapters["prefix"], headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        assert upload_multipart(c, "secret-task", adapters["prefix"], headers=bearer(ADMIN)).status_code == 201
        assert c.delete("/prompts/secret-task", headers=bearer(API)).status_code == 401
        assert c.delete("/prompts/secret-task").status_code == 401
        assert c.delete("/prompts/secret-task", headers=bearer(ADMIN)).status_code == 204


def test_generation_needs_the_api_token(secured):
    body = {"text": "hello", "max_new_tokens": 2}
    with secured.client() as c:
        assert c.post("/generate", json=body).status_code == 401
        assert c.post("/generate", json=body, headers=bearer("nope")).status_code == 401
        assert c.post("/generate/batch", json={"requests": [body]}).status_code == 401
        assert c.post("/v1/completions", json={"model": "x", "prompt": "hi"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/generate", json=body, headers=bearer(API)).status_code == 200
        assert c.post("/generate", json=body, headers=bearer(ADMIN)).status_code == 200  # admin may too
        assert c.get("/v1/models", headers=bearer(API)).status_code == 200


def test_health_and_metrics_stay_open(secured):
    with secured.client() as c:
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_open_prompt_endpoints_are_warned_about(start_server, llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="promptswap"):
        server = start_server(model=str(llama_dir))
    server.stop()
    assert "no admin token" in caplog.text


def test_metrics_count_requests_tokens_and_caches(start_server, llama_dir, adapters):
    server = start_server(model=str(llama_dir))
    try:
        with server.client() as c:
            assert upload_multipart(c, "m-soft", adapters["prompt_tuning"]).status_code == 201
            for _ in range(3):
                c.post("/generate", json={"task": "m-soft", "text": "hi there", "max_new_tokens": 4,
                                          "ignore_eos": True})
            c.post("/generate", json={"text": "hi", "max_new_tokens": 2, "ignore_eos": True, "stream": True})
            c.post("/generate", json={"task": "unknown-task", "text": "hi"})
            m = scrape_metrics(c)
    finally:
        server.stop()
    ok = (("outcome", "ok"), ("task", "m-soft"))
    assert m[("promptswap_requests_total", ok)] == 3
    assert m[("promptswap_generated_tokens_total", ok)] == 12
    assert m[("promptswap_requests_total", (("outcome", "ok"), ("task", "_base")))] == 1
    assert m[("promptswap_requests_total", (("outcome", "client_error"), ("task", "_unknown")))] == 1
    assert m[("promptswap_time_to_first_token_seconds_count", (("task", "m-soft"),))] == 3
    assert m[("promptswap_request_latency_seconds_count", (("task", "m-soft"),))] == 3
    assert m[("promptswap_prompt_cache_misses_total", ())] >= 1
    assert m[("promptswap_prompt_cache_hits_total", ())] >= 2  # the prefix is computed once per version
    assert m[("promptswap_prompt_cache_bytes", ())] > 0
    assert m[("promptswap_queue_depth", ())] == 0 and m[("promptswap_running_requests", ())] == 0
    assert m[("promptswap_prompts", ())] == 1
    # idle: the task's prefix alone keeps pages, cached for the next request
    assert m[("promptswap_kv_pages_total", ())] > 0
    assert m[("promptswap_kv_pages_used", ())] == m[("promptswap_kv_pages_shared", ())] >= 1
    assert m[("promptswap_preemptions_total", ())] == 0


def test_queue_full_is_503_with_retry_after(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_running=1, max_queue=1)
    long = {"text": "hello", "max_new_tokens": 128, "ignore_eos": True}
    try:
        with server.client() as c:
            r = c.post("/generate/batch", json={"requests": [long, long, long]})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "overloaded_error"
            assert "queue" in r.json()["error"]["message"]
            # The batch's admitted entries were cancelled; they leave at the engine's next step.
            deadline = time.monotonic() + 30
            while (status := c.post("/generate", json={"text": "hi", "max_new_tokens": 2}).status_code) == 503:
                assert time.monotonic() < deadline, "the cancelled batch entries never left the queue"
                time.sleep(0.05)
            assert status == 200
    finally:
        server.stop()


def test_no_input_crashes_the_server(secured):
    """Garbage of every kind gets a 4xx; the server still answers afterwards."""
    garbage = save({"prompt_embeddings": torch.randn(2, 64)})[:40]  # a truncated header
    with secured.client(headers=bearer(ADMIN)) as c:
        for content, ctype in ((b"\xff\xfe", "application/json"), (b"[]", "application/json"),
                               (b"null", "application/json"), (b"{\"text\": null}", "application/json")):
            assert 400 <= c.post("/generate", content=content, headers={"content-type": ctype}).status_code < 500
        assert upload_raw(c, "trunc", garbage).status_code == 422
        assert upload_raw(c, "empty", b"").status_code == 422
        r = c.put("/prompts/bad-multipart", content=b"--x\r\nbroken", headers={
            "content-type": "multipart/form-data; boundary=x"})
        assert 400 <= r.status_code < 500
        assert c.get("/health").status_code == 200


def test_a_request_without_its_token_gets_401_before_its_body_is_read(secured):
    """Otherwise a client without a token learns the schema from 400s and 422s (issue 10, item 5)."""
    json_type = {"content-type": "application/json"}
    with secured.client() as c:
        assert c.post("/generate", content=b"{not json", headers=json_type).status_code == 401
        assert c.post("/generate", json={"txt": 1}).status_code == 401  # would be a 422 with the token
        assert c.post("/generate/batch", json={"requests": "nope"}, headers=bearer("wrong")).status_code == 401
        assert c.post("/v1/completions", json={"prompt": 3}).status_code == 401
        assert c.put("/prompts/x", content=b"garbage", headers={"content-type": "text/plain"}).status_code == 401
        assert c.put("/prompts/x", content=b"garbage", headers=bearer(API)).status_code == 401  # admin needed
        with_token = c.post("/generate", json={"txt": 1}, headers=bearer(API))
        assert with_token.status_code == 422 and with_token.json()["error"]["param"] == "text"
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # open
