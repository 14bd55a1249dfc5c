"""What a response format may cost, and that one is accepted only if it can be honoured: hostile formats the
outside probe found (a lexer-budget bomb, a schema whose object requires itself) are refused at admission
naming `response_format`; a slow one past the compile timeout too, and from then on at once; a grammar that
breaks mid-generation ends its own request with an error, never with text outside the format."""

from __future__ import annotations

import time

import pytest

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.grammar import FormatBroken, ResponseFormat
from server.engine.sequence import SamplingParams

SELF_REQUIRING = {"$defs": {"node": {"type": "object", "properties": {"k": {"$ref": "#/$defs/node"}},
                                     "required": ["k"]}}, "$ref": "#/$defs/node"}
HOSTILE = [
    ResponseFormat("regex", "a{1000000000}"),
    ResponseFormat("regex", "((a{1000}){1000}){1001}"),
    ResponseFormat.json_schema({"type": "object", "required": ["s"],
                                "properties": {"s": {"type": "string", "pattern": "^((x{1000}){1000}){5000}$"}}}),
    ResponseFormat.json_schema(SELF_REQUIRING),
]


def submit(engine, fmt, **params):
    return engine.submit(EngineRequest("Answer:", params=SamplingParams(**{"max_new_tokens": 8, **params}),
                                       response_format=fmt))


@pytest.mark.parametrize("fmt", HOSTILE, ids=["huge-repeat", "nested-repeat", "schema-pattern", "self-requiring"])
def test_a_format_that_cannot_be_honoured_is_refused_at_admission(make_engine, fmt):
    engine = make_engine()
    with pytest.raises(InvalidParameter) as caught:
        submit(engine, fmt)
    assert caught.value.param == "response_format"
    # the verdict is kept: the same format is refused again without compiling it again
    verdict = engine.admission.grammars._verdicts[fmt]
    assert verdict.refusal is not None and verdict.grammar is None
    with pytest.raises(InvalidParameter):
        submit(engine, fmt)
    # and the engine serves a plain request as before
    assert submit(engine, None).result(timeout=60).token_ids


def test_a_format_past_the_compile_timeout_is_a_422_and_is_refused_from_then_on(make_engine):
    engine = make_engine(format_compile_timeout_s=0.001)
    slow = ResponseFormat.json_schema({"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                                       for i in range(200)}})
    with pytest.raises(InvalidParameter, match="compiles within") as caught:
        submit(engine, slow)
    assert caught.value.param == "response_format"
    grammars = engine.admission.grammars
    deadline = time.monotonic() + 60
    while getattr(grammars._verdicts.get(slow), "refusal", None) is None:  # the compilation it started ends
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grammars.compile_timeout_s = 60.0
    with pytest.raises(InvalidParameter, match="compiles within"):
        submit(engine, slow)


def test_the_verdict_cache_is_bounded_in_bytes(make_engine):
    engine = make_engine(format_cache_bytes=4096)
    grammars = engine.admission.grammars
    for i in range(40):
        submit(engine, ResponseFormat("regex", f"(yes|no|maybe{i})")).result(timeout=60)
        assert grammars.cached_bytes <= 4096
    assert 0 < len(grammars._verdicts) < 40


class BreakingMatcher:
    """A real matcher that enters llguidance's error state after `after` tokens, as a limit reached on a path
    the probe did not take does: its mask then allows the end of sequence alone."""

    def __init__(self, real, after: int) -> None:
        self.real, self.after, self.taken = real, after, 0

    def unsafe_compute_mask_ptr(self, ptr, size):
        return self.real.unsafe_compute_mask_ptr(ptr, size)

    def consume_token(self, token):
        self.taken += 1
        return self.real.consume_token(token)

    def is_error(self):
        return self.taken >= self.after

    def get_error(self):
        return "lexer error: too many expressions constructed" if self.is_error() else ""

    def is_stopped(self):
        return self.real.is_stopped()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_that_breaks_mid_answer_ends_its_request_with_an_error_not_an_end(make_engine, temperature):
    engine = make_engine()
    grammars = engine.admission.grammars
    real = grammars._compile_for_request

    def breaking(fmt):
        grammar = real(fmt)
        grammar._matcher = BreakingMatcher(grammar._matcher, after=3)
        return grammar

    grammars._compile_for_request = breaking
    handle = submit(engine, ResponseFormat("regex", "[a-z ]{80}"), temperature=temperature, seed=1)
    with pytest.raises(FormatBroken, match="after 3 generated token") as caught:
        handle.result(timeout=60)
    assert caught.value.param == "response_format"
    assert handle.generated_tokens == 3
