"""Issue 28's holes, from the outside in: a real server over HTTP, real concurrent requests.

- One request whose logits processing fails (its grammar raises, as a schema requiring itself did) ends alone
  with its own error; every other request in flight, of every kind, streamed or not, n > 1 included, gets the
  answer it gets alone, and nothing of the failing request's content reaches any other answer.
- Formats that cannot be honoured (repetition bombs, a string pattern bomb inside a schema, an object that
  requires itself) are a 422 naming `response_format` at admission, never a 200 that breaks the format.
- 200 distinct hostile formats leave the server's resident memory within a stated bound.
- A repetition penalty that would overflow is a 422, as a request's parameter and as a task's default.
"""

from __future__ import annotations

import json
import threading

import pytest

from server.engine.grammar import ResponseFormat
from tests.api.conftest import invalid_status, iter_sse, upload_multipart

MARKER = "only-the-bad-client-knows-this"
TEXT = "The quick brown fox jumps over the lazy dog and then"
BAD_SCHEMA = {"type": "object", "description": MARKER, "required": ["k"],
              "properties": {"k": {"type": "string", "maxLength": 60}}}
SELF_REQUIRING = {"type": "object", "properties": {"k": {"$ref": "#"}}, "required": ["k"]}
# RSS may grow this much over 200 distinct hostile formats (each kept ~150-200 MB before: ~30 GB).
RSS_BOUND_BYTES = 64 * 2**20


@pytest.fixture(scope="module")
def server(start_server, llama_dir, adapters):
    server = start_server(model=str(llama_dir), max_new_tokens_cap=64, max_context=512, max_running=16)
    with server.client() as c:
        for method, path in adapters.items():
            assert upload_multipart(c, method, path).status_code == 201
    yield server
    server.stop()


class RaisingGrammar:
    """Wraps a request's real grammar; raises in advance after two tokens, quoting the request's own schema."""

    def __init__(self, real) -> None:
        self.real, self.taken = real, 0

    def mask(self, row):
        self.real.mask(row)

    def advance(self, token):
        if self.taken == 2:
            raise RuntimeError(f"Too many items while matching {json.dumps(BAD_SCHEMA)}")
        self.real.advance(token)
        self.taken += 1

    @property
    def ended(self):
        return self.real.ended


def innocent_requests(model: str) -> list[tuple[str, dict]]:
    """Greedy requests of every kind on /generate and chat, one with n = 2, half of them streamed."""
    out = []
    for i, task in enumerate([None, "prompt_tuning", "p_tuning", "prefix", "prefix_projection"]):
        body = {"text": TEXT, "max_new_tokens": 12, "ignore_eos": True, "stream": i % 2 == 1,
                **({"task": task} if task else {}), **({"n": 2} if i == 2 else {})}
        out.append(("/generate", body))
    out.append(("/v1/chat/completions", {"model": "prefix", "max_tokens": 12, "temperature": 0, "stream": True,
                                         "messages": [{"role": "user", "content": TEXT}]}))
    out.append(("/v1/chat/completions", {"model": model, "max_tokens": 12, "temperature": 0,
                                         "messages": [{"role": "user", "content": TEXT}]}))
    return out


def send(client, path: str, body: dict) -> tuple[int, str]:
    """(status, the whole answer as text: the body, or every streamed event)."""
    if not body.get("stream"):
        r = client.post(path, json=body)
        return r.status_code, r.text
    with client.stream("POST", path, json=body) as r:
        return r.status_code, "\n".join(f"{name}: {data}" for name, data in iter_sse(r))


def answer_text(path: str, body: dict, raw: str) -> str:
    """The generated text(s) of an answer, however it came (streamed or not, n samples or one)."""
    if not body.get("stream"):
        parsed = json.loads(raw)
        if path == "/generate":
            return "|".join(o["text"] for o in parsed["outputs"]) if "outputs" in parsed else parsed["text"]
        return parsed["choices"][0]["message"]["content"]
    pieces: dict[int, str] = {}
    for line in raw.splitlines():
        _, _, data = line.partition(": ")
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if path == "/generate":
            pieces[event.get("index", 0)] = pieces.get(event.get("index", 0), "") + event.get("text", "")
        else:
            for choice in event["choices"]:
                pieces[choice["index"]] = pieces.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return "|".join(pieces[i] for i in sorted(pieces))


def test_a_failing_grammar_ends_its_request_alone_and_reaches_no_other(server, monkeypatch):
    model = server.settings.model_name()
    requests = innocent_requests(model)
    with server.client() as c:
        alone = [send(c, path, body) for path, body in requests]
    assert all(status == 200 for status, _ in alone), alone

    grammars = server.engine.admission.grammars
    real = grammars.for_request
    bad_format = ResponseFormat.json_schema(BAD_SCHEMA)
    monkeypatch.setattr(grammars, "for_request",
                        lambda fmt: RaisingGrammar(real(fmt)) if fmt == bad_format else real(fmt))
    bad_bodies = [
        ("/generate", {"text": TEXT, "max_new_tokens": 20, "temperature": 0.8, "seed": 1,
                       "response_format": {"type": "json_schema", "json_schema": {"schema": BAD_SCHEMA}}}),
        ("/generate", {"task": "prefix", "text": TEXT, "max_new_tokens": 20, "stream": True, "n": 2,
                       "response_format": {"type": "json_schema", "json_schema": {"schema": BAD_SCHEMA}}}),
    ]
    everything = bad_bodies + requests
    answers: list[tuple[int, str] | None] = [None] * len(everything)
    go = threading.Barrier(len(everything))

    def run(i: int) -> None:
        with server.client() as client:
            go.wait()
            answers[i] = send(client, *everything[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(everything))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    plain_bad, streamed_bad = answers[0], answers[1]
    assert plain_bad is not None and plain_bad[0] == 500
    assert json.loads(plain_bad[1])["error"]["type"] == "server_error"
    assert streamed_bad is not None and streamed_bad[0] == 200 and "error: " in streamed_bad[1]
    for (path, body), before, after in zip(requests, alone, answers[len(bad_bodies):], strict=True):
        assert after is not None and after[0] == 200, (path, body, after)
        assert MARKER not in after[1]
        assert answer_text(path, body, after[1]) == answer_text(path, body, before[1]), (path, body)
    with server.client() as c:  # and it goes on serving
        assert c.post("/generate", json={"text": TEXT, "max_new_tokens": 3}).status_code == 200


@pytest.mark.parametrize(("path", "format_body"), [
    ("/generate", {"type": "regex", "pattern": "a{1000000000}"}),
    ("/generate", {"type": "regex", "pattern": "((a{1000}){1000}){1001}"}),
    ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "required": ["s"],
        "properties": {"s": {"type": "string", "pattern": "^((x{1000}){1000}){5000}$"}}}}}),
    ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "self", "schema": SELF_REQUIRING}}),
], ids=["huge-repeat", "nested-repeat", "schema-pattern-bomb", "self-requiring"])
def test_a_format_that_cannot_be_honoured_is_refused_not_answered_200(server, path, format_body):
    model = server.settings.model_name()
    body = ({"text": TEXT, "max_new_tokens": 8} if path == "/generate" else
            {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": TEXT}]})
    with server.client() as c:
        for stream in (False, True):
            r = c.post(path, json={**body, "stream": stream, "response_format": format_body})
            assert r.status_code == invalid_status(path), r.text
            assert r.json()["error"]["param"] == "response_format"


def test_two_hundred_distinct_hostile_formats_leave_memory_bounded(server):
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    with server.client() as c:
        def hostile(i: int) -> int:
            return c.post("/generate", json={"text": TEXT, "max_new_tokens": 4, "response_format": {
                "type": "regex", "pattern": f"((a{{1000}}){{1000}}){{{1001 + i}}}"}}).status_code

        assert {hostile(i) for i in range(5)} == {422}  # warm: llguidance's tokenizer view, the pool's threads
        before = rss()
        assert {hostile(i) for i in range(5, 205)} == {422}
        grown = rss() - before
        print(f"RSS grew {grown / 2**20:.1f} MiB over 200 distinct hostile formats (bound "
              f"{RSS_BOUND_BYTES / 2**20:.0f} MiB)")
        assert grown < RSS_BOUND_BYTES
        assert server.engine.admission.grammars.cached_bytes <= server.engine.config.format_cache_bytes
        assert c.post("/generate", json={"text": TEXT, "max_new_tokens": 3}).status_code == 200


def test_an_overflowing_repetition_penalty_is_a_422_as_a_request_and_as_a_default(server):
    with server.client() as c:
        for value in (1e-38, 1e-300, 0.001):
            r = c.post("/generate", json={"text": TEXT, "temperature": 1.0, "repetition_penalty": value})
            assert r.status_code == 422 and r.json()["error"]["param"] == "repetition_penalty", r.text
            assert "0.01" in r.json()["error"]["message"]
            r = c.patch("/prompts/prefix", json={"defaults": {"repetition_penalty": value}})
            assert r.status_code == 422 and "repetition_penalty" in r.json()["error"]["param"], r.text
        assert c.get("/prompts/prefix").json()["defaults"] in (None, {})
        r = c.post("/generate", json={"task": "prefix", "text": TEXT, "temperature": 1.0, "max_new_tokens": 4,
                                      "repetition_penalty": 0.01})
        assert r.status_code == 200, r.text
