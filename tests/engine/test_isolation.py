"""One request's failure while its logits are read (its grammar's mask or advance, its draw) ends that request
alone, with its own error; every other request of the step gets the tokens it would have had alone (PEFT's,
when greedy), whatever its kind, streamed or not, n samples included. A failure of the loop itself tells the
requests it ends nothing of another request's content."""

from __future__ import annotations

import random

import pytest

from server.engine import logits
from server.engine.admission import EngineRequest
from server.engine.errors import RequestFailed
from server.engine.grammar import FormatBroken, ResponseFormat
from server.engine.results import Completion, TokenDelta
from server.engine.sequence import SamplingParams
from tests.engine.conftest import random_text

TEXT = random_text(random.Random(5), 30)
TASKS = (None, "pt8", "ptune5", "prefix16", "prefix64proj")
MARKER = "secret-of-the-bad-request"


class RaisingGrammar:
    """A real request grammar that raises in `where` ("mask" or "advance") once `after` tokens are taken."""

    def __init__(self, real, where: str, after: int) -> None:
        self.real, self.where, self.after, self.taken = real, where, after, 0

    def mask(self, row):
        if self.where == "mask" and self.taken >= self.after:
            raise RuntimeError(f"grammar mask exploded: {MARKER}")
        self.real.mask(row)

    def advance(self, token):
        if self.where == "advance" and self.taken >= self.after:
            raise FormatBroken(self.taken, f"advance exploded: {MARKER}")
        self.real.advance(token)
        self.taken += 1

    @property
    def ended(self):
        return self.real.ended


def healthy(engine, stream: bool):
    """Greedy requests of every kind, one of them n = 2, half streamed: (task, handles, stream)."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    out = []
    for i, task in enumerate(TASKS):
        handles = engine.submit_samples(EngineRequest(TEXT, task=task, params=params, n=2 if i == 1 else 1))
        out.append((task, handles, stream and i % 2 == 0))
    return out


def tokens_of(handle, stream: bool) -> list[int]:
    if not stream:
        return list(handle.result(timeout=120).token_ids)
    seen: list[int] = []
    for event in handle:
        if isinstance(event, TokenDelta):
            seen.extend(event.token_ids)
        else:
            assert isinstance(event, Completion)
    return seen


@pytest.mark.parametrize("where", ["mask", "advance"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_raising_grammar_fails_its_request_alone(make_engine, reference, monkeypatch, where, stream):
    engine = make_engine(max_running=16)
    grammars = engine.admission.grammars
    real_for_request = grammars.for_request
    bad_format = ResponseFormat("regex", "[a-z ]{60}")  # no end before 2 tokens
    monkeypatch.setattr(grammars, "for_request", lambda fmt: RaisingGrammar(real_for_request(fmt), where, 2)
                        if fmt == bad_format else real_for_request(fmt))
    bad = engine.submit_samples(EngineRequest(TEXT, task="pt8", response_format=bad_format, n=2,
                                              params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)))
    good = healthy(engine, stream)
    for handle in bad:
        with pytest.raises((FormatBroken, RequestFailed)) as caught:
            handle.result(timeout=120)
        assert handle.generated_tokens == 2
        if where == "advance":
            assert caught.value.param == "response_format"
    for task, handles, streamed in good:
        expected = reference.greedy(task, TEXT, 8)
        for handle in handles:
            assert tokens_of(handle, streamed) == expected, task


def test_a_raising_draw_fails_its_request_alone_and_seeded_neighbours_keep_their_tokens(make_engine, reference,
                                                                                       monkeypatch):
    engine = make_engine(max_running=16)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=21, ignore_eos=True)
    alone = list(engine.submit(EngineRequest(TEXT, task="prefix16", params=sampled)).result(timeout=120).token_ids)

    real_pick = logits.pick

    def pick(row, seq):
        if seq.params.seed == 666 and len(seq.output_ids) == 3:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_pick(row, seq)

    monkeypatch.setattr(logits, "pick", pick)
    bad = engine.submit_samples(EngineRequest(TEXT, task="ptune5", n=2, params=SamplingParams(
        max_new_tokens=8, temperature=0.7, seed=666, ignore_eos=True)))
    neighbour = engine.submit(EngineRequest(TEXT, task="prefix16", params=sampled))
    good = healthy(engine, stream=True)
    with pytest.raises(RequestFailed, match="probability tensor"):
        bad[0].result(timeout=120)
    assert bad[0].generated_tokens == 3
    assert len(bad[1].result(timeout=120).token_ids) == 8  # sample 1 draws from seed 667: not the failing one
    assert list(neighbour.result(timeout=120).token_ids) == alone
    for task, handles, streamed in good:
        for handle in handles:
            assert tokens_of(handle, streamed) == reference.greedy(task, TEXT, 8), task


def test_a_failed_step_tells_the_requests_it_ends_nothing_of_the_others(make_engine, monkeypatch):
    engine = make_engine()
    real_process = logits.process
    failures = [RuntimeError(f"a bug that quotes a schema: {MARKER}")]

    def process(output):
        if failures:
            raise failures.pop()
        return real_process(output)

    monkeypatch.setattr(logits, "process", process)
    handles = [engine.submit(EngineRequest(TEXT, task=task, params=SamplingParams(max_new_tokens=4)))
               for task in TASKS]
    errors = []
    for handle in handles:
        try:
            handle.result(timeout=120)
        except RequestFailed as exc:
            errors.append(exc)
    assert errors, "the injected failure ended no request"
    assert all(MARKER not in str(exc) for exc in errors)
    # the loop goes on serving
    assert engine.submit(EngineRequest(TEXT, params=SamplingParams(max_new_tokens=3))).result(timeout=60)
