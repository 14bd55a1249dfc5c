"""Structured output in the real engine (llguidance): every answer matches its format, for every task kind,
greedy and sampled, while the requests beside it without a format keep their PEFT tokens."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.grammar import ResponseFormat
from server.engine.sequence import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"enum": ["food", "service", "price"]}, "maxItems": 3},
    },
    "required": ["sentiment", "score"],
    "additionalProperties": False,
}
PATTERN = r"(yes|no), [0-9]{1,3} (cats|dogs)"
TEXT = "The risotto was cold and the waiter ignored us. Review as JSON:"


def run(engine, task, fmt, params):
    return engine.submit(EngineRequest(TEXT, task=task, params=params, response_format=fmt)).result(timeout=120)


@pytest.mark.parametrize("task", [None, "pt8", "ptune5", "prefix16"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_answer_matches_its_schema_and_ends_there(make_engine, task, temperature):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=120, temperature=temperature, seed=11)
    done = run(engine, task, ResponseFormat.json_schema(SCHEMA), params)
    jsonschema.validate(json.loads(done.text), SCHEMA)
    assert done.finish_reason == "stop"  # the grammar was complete: it stopped there
    again = run(engine, task, ResponseFormat.json_schema(SCHEMA), params)
    assert again.token_ids == done.token_ids  # greedy, or seeded: repeatable


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_regular_expression_is_matched_whole(make_engine, temperature):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=40, temperature=temperature, seed=5, ignore_eos=True)
    done = run(engine, "prefix16", ResponseFormat("regex", PATTERN), params)
    assert re.fullmatch(PATTERN, done.text), done.text


def test_requests_without_a_format_keep_their_peft_tokens_in_the_same_batch(make_engine, reference):
    engine = make_engine(max_running=8)
    plain = SamplingParams(max_new_tokens=10, ignore_eos=True)
    shaped = [engine.submit(EngineRequest(TEXT, task=task, params=SamplingParams(max_new_tokens=120),
                                          response_format=ResponseFormat.json_schema(SCHEMA)))
              for task in ("pt8", None, "prefix16")]
    free = [engine.submit(EngineRequest(TEXT, task=task, params=plain)) for task in ("pt8", None, "prefix16")]
    for handle, task in zip(free, ("pt8", None, "prefix16"), strict=True):
        assert list(handle.result(timeout=120).token_ids) == reference.greedy(task, TEXT, 10), task
    for handle in shaped:
        jsonschema.validate(json.loads(handle.result(timeout=120).text), SCHEMA)


def test_any_json_object(make_engine):
    """A free JSON object may go on as long as a random model likes: cut by length, it is still a JSON prefix;
    what must hold is that every token kept the text inside the grammar."""
    engine = make_engine()
    done = run(engine, None, ResponseFormat("json_object"), SamplingParams(max_new_tokens=60))
    assert done.text.startswith("{")
    if done.finish_reason == "stop":
        assert isinstance(json.loads(done.text), dict)


@pytest.mark.parametrize(("fmt", "expected"), [
    (lambda: ResponseFormat("regex", "(("), "unclosed group"),  # llguidance's cause, not only its first line
    (lambda: ResponseFormat.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}), "schema"),
    (lambda: ResponseFormat("regex", "a" * 70_000), "at most"),
    (lambda: ResponseFormat("regex", "[^\\x00-\\x{10FFFF}]"), "regular expression"),  # no text matches it
])
def test_a_format_that_cannot_be_compiled_is_refused_naming_response_format(make_engine, fmt, expected):
    engine = make_engine()
    with pytest.raises(InvalidParameter) as caught:
        run(engine, None, fmt(), SamplingParams(max_new_tokens=4))
    assert caught.value.param == "response_format" and expected in str(caught.value)


def test_not_with_choices(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidParameter) as caught:
        engine.submit(EngineRequest(TEXT, choices=["yes", "no"], response_format=ResponseFormat("json_object")))
    assert caught.value.param == "response_format"


def test_a_schema_is_probed_once_and_each_request_has_a_matcher_of_its_own(make_engine, monkeypatch):
    engine = make_engine()
    grammars = engine.admission.grammars
    probes = []
    probe = grammars._probe
    monkeypatch.setattr(grammars, "_probe", lambda fmt, grammar: (probes.append(fmt), probe(fmt, grammar)))
    fmt = ResponseFormat.json_schema(SCHEMA)
    handles = [engine.submit(EngineRequest(TEXT, params=SamplingParams(max_new_tokens=60), response_format=fmt))
               for _ in range(3)]
    matchers = {id(h._seq.grammar._matcher) for h in handles}
    for handle in handles:
        jsonschema.validate(json.loads(handle.result(timeout=120).text), SCHEMA)
    assert probes == [fmt] and list(grammars._verdicts) == [fmt]
    assert len(matchers) == 3  # no budget shared between requests


def test_properties_come_out_in_the_order_the_schema_declares_them_nested_too(make_engine):
    engine = make_engine()
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha", "mid"],
              "properties": {"zeta": {"enum": ["z"]},
                             "alpha": {"type": "object", "additionalProperties": False, "required": ["y", "b"],
                                       "properties": {"y": {"enum": [1]}, "b": {"enum": [2]}}},
                             "mid": {"enum": [True]}}}
    done = run(engine, "pt8", ResponseFormat.json_schema(schema), SamplingParams(max_new_tokens=80))
    parsed = json.loads(done.text)
    assert list(parsed) == ["zeta", "alpha", "mid"] and list(parsed["alpha"]) == ["y", "b"], done.text
