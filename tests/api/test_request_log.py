"""The operator's view of each request (issue 11): an X-Request-ID on every answer, one structured log
line per finished request, and metrics that tell client errors from server errors."""

from __future__ import annotations

import json
import logging
import time

import pytest

from server.process.logs import JsonFormatter, TextFormatter
from tests.api.conftest import scrape_metrics, upload_multipart

SECRET_TEXT = "the secret input text"


@pytest.fixture
def client(llama_server):
    with llama_server.client() as c:
        yield c


@pytest.fixture
def request_lines(caplog):
    caplog.set_level(logging.INFO, logger="promptswap.requests")

    def lines(request_id: str) -> list[dict]:
        return [r.fields for r in caplog.records if r.name == "promptswap.requests"
                and r.fields["request_id"] == request_id]

    return lines


def test_a_well_formed_request_id_is_kept_and_any_other_replaced(client):
    r = client.post("/generate", json={"text": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": "client-id.42"})
    assert r.headers["x-request-id"] == "client-id.42"
    for bad in ("has spaces", "x" * 129, "new\\nline", ""):
        r = client.post("/generate", json={"text": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
    for r in (client.get("/no/such/path"), client.post("/generate", json={}), client.get("/health")):
        assert r.headers["x-request-id"]  # errors and open endpoints too


def test_one_line_per_finished_request_with_its_numbers_and_never_its_text(client, adapters, request_lines):
    assert upload_multipart(client, "logged", adapters["prefix"]).status_code in (200, 201)
    version = client.get("/prompts/logged").json()["version"]
    body = {"task": "logged", "text": SECRET_TEXT, "max_new_tokens": 4, "ignore_eos": True}
    client.post("/generate", json=body, headers={"X-Request-ID": "req-ok"})
    [line] = request_lines("req-ok")
    assert line["outcome"] == "ok" and line["finish_reason"] == "length"
    assert line["task"] == "logged" and line["version"] == version
    assert line["virtual_tokens"] == 3 and line["completion_tokens"] == 4 and line["prompt_tokens"] > 0
    assert 0 <= line["ttft_s"] <= line["total_s"]
    assert SECRET_TEXT not in json.dumps(line)

    client.post("/generate", json={**body, "task": "not-there"}, headers={"X-Request-ID": "req-404"})
    [line] = request_lines("req-404")
    assert line["outcome"] == "client_error" and line["error"] == "UnknownTask"

    client.post("/generate/batch", json={"requests": [body, body]}, headers={"X-Request-ID": "req-batch"})
    assert [x["outcome"] for x in request_lines("req-batch")] == ["ok", "ok"]  # one line per request


def test_a_plain_request_whose_client_left_is_logged_as_cancelled(llama_server, request_lines):
    body = {"text": "long", "max_new_tokens": 1000, "ignore_eos": True}
    with llama_server.client(timeout=0.3) as c, pytest.raises(Exception):  # noqa: B017 -- httpx's timeout
        c.post("/generate", json=body, headers={"X-Request-ID": "req-gone"})
    deadline = time.monotonic() + 30
    while not request_lines("req-gone"):
        assert time.monotonic() < deadline, "the abandoned request was never logged"
        time.sleep(0.05)
    [line] = request_lines("req-gone")
    assert line["outcome"] == "cancelled" and line["completion_tokens"] < 1000


def test_metrics_tell_client_errors_from_server_errors(client, llama_server, monkeypatch):
    client.post("/generate", json={"text": "hi", "task": "missing-task"})
    engine = llama_server.engine

    def broken_run(batch, prefixes=()):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(engine.runner, "run", broken_run)
    r = client.post("/generate", json={"text": "hi", "max_new_tokens": 2})
    assert r.status_code == 500
    monkeypatch.undo()
    m = scrape_metrics(client)
    assert m[("promptswap_requests_total", (("outcome", "client_error"), ("task", "_unknown")))] >= 1
    assert m[("promptswap_requests_total", (("outcome", "server_error"), ("task", "_base")))] >= 1


def test_log_formats():
    record = logging.LogRecord("promptswap.requests", logging.INFO, __file__, 1, "request %s", ("ok",), None)
    record.fields = {"request_id": "abc", "task": None, "total_s": 0.5, "error": "has space"}
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "request ok" and parsed["request_id"] == "abc" and parsed["task"] is None
    assert parsed["time"].endswith("Z") and parsed["level"] == "INFO"
    text = TextFormatter().format(record)
    assert text.endswith('request ok request_id=abc task=- total_s=0.5 error="has space"')


def test_text_lines_escape_what_a_client_sent():
    record = logging.LogRecord("promptswap.requests", logging.INFO, __file__, 1, "request %s", ("x",), None)
    record.fields = {"task": "evil\x1b[31m\nforged=line"}
    line = TextFormatter().format(record)
    assert "\x1b" not in line and "\n" not in line and '\\u001b[31m\\nforged=line"' in line
