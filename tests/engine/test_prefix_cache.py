"""Automatic prefix caching in the real engine: full pages computed for a task prefix and tokens are read by
later requests with the same ones, for every task kind, and every answer stays PEFT's own."""

from __future__ import annotations

import random

import pytest

from server.engine import attention, runner
from server.engine.admission import EngineRequest
from server.engine.pages import PAGE_SIZE
from server.engine.sequence import SamplingParams
from tests.engine.conftest import random_text
from tests.engine.test_choices import CHOICES, reference_scores

KINDS = [None, "pt8", "ptune5", "prefix16", "prefix64proj"]  # no task, prompt tuning, P-tuning, prefixes
PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


def tokens_of(engine, text: str, task: str | None, params: SamplingParams = PARAMS) -> list[int]:
    return list(engine.submit(EngineRequest(text, task=task, params=params)).result(timeout=120).token_ids)


def hits(engine) -> int:
    return engine.stats().prefix_cache_hits


@pytest.mark.parametrize("task", KINDS)
def test_the_same_long_text_twice_reads_its_pages_and_gives_peft_tokens(make_engine, reference, task):
    text = random_text(random.Random(1), 70)
    engine = make_engine()
    n_text = len(engine.tokenizer(text)["input_ids"])
    assert n_text > 3 * PAGE_SIZE
    first = tokens_of(engine, text, task)
    assert hits(engine) == 0
    second = tokens_of(engine, text, task)
    # Every full page but the one holding the last text token (its logits pick the next token) is read.
    assert hits(engine) == (n_text - 1) // PAGE_SIZE * PAGE_SIZE
    assert engine.stats().prefix_cache_queries == 2 * n_text
    assert first == second == reference.greedy(task, text, PARAMS.max_new_tokens)


def test_pages_are_keyed_by_the_task_prefix_too(make_engine, reference):
    """The same text under another task (or another kind) means other keys and values: nothing is shared."""
    text = random_text(random.Random(2), 60)
    engine = make_engine()
    for task in KINDS:
        assert tokens_of(engine, text, task) == reference.greedy(task, text, PARAMS.max_new_tokens), task
    assert hits(engine) == 0
    assert tokens_of(engine, text, "pt8") == reference.greedy("pt8", text, PARAMS.max_new_tokens)
    assert hits(engine) > 0


def test_texts_sharing_a_prefix_run_together_under_many_tasks(make_engine, reference):
    """A long shared instruction, then each request's own text: concurrent requests of mixed tasks and kinds,
    some reading pages others filled a moment before, in small steps (chunked prefill, queueing)."""
    rng = random.Random(3)
    instruction = random_text(rng, 50)
    engine = make_engine(max_running=6, max_tokens_per_step=48)
    warm = [engine.submit(EngineRequest(f"{instruction} warm", task=task, params=PARAMS)) for task in KINDS]
    for handle in warm:
        handle.result(timeout=120)
    requests = [(rng.choice(KINDS), f"{instruction} {random_text(rng, rng.randint(1, 12))}") for _ in range(14)]
    handles = [engine.submit(EngineRequest(text, task=task, params=PARAMS)) for task, text in requests]
    for (task, text), handle in zip(requests, handles, strict=True):
        assert list(handle.result(timeout=120).token_ids) == reference.greedy(task, text, PARAMS.max_new_tokens), task
    assert hits(engine) >= len(requests) * 2 * PAGE_SIZE  # the instruction's pages, at least two each


def test_decoding_requests_that_share_pages_read_them_once_and_keep_peft_tokens(make_engine, reference, monkeypatch):
    """Cascade attention (attention.SharedDecode): requests decoding together whose histories begin with the same
    pages (a task prefix and an instruction found in the prefix cache, the text of n samples) read those pages once
    for all, then each its own, merged by log-sum-exp; every answer stays PEFT's own."""
    monkeypatch.setattr(runner, "CASCADE_MIN_SAVED_ROWS", 1)  # every shared page cascades, however few
    monkeypatch.setattr(runner, "CASCADE_MIN_STEP_ROWS", 1)
    cascaded: list[int] = []  # requests per cascade, one entry per layer and step
    cascade = attention._cascade
    monkeypatch.setattr(attention, "_cascade",
                        lambda kv, layer, q, *rest: cascaded.append(len(q)) or cascade(kv, layer, q, *rest))
    rng = random.Random(4)
    instruction = random_text(rng, 40)
    engine = make_engine(max_running=16)
    for task in KINDS:  # the instruction's pages, cached under each task
        tokens_of(engine, f"{instruction} warm", task)
    requests = [(task, f"{instruction} {random_text(rng, rng.randint(1, 9))}") for task in KINDS for _ in range(3)]
    handles = [engine.submit(EngineRequest(text, task=task, params=PARAMS)) for task, text in requests]
    samples = engine.submit_samples(EngineRequest(instruction, task="prefix16", params=PARAMS, n=3))
    for (task, text), handle in zip(requests, handles, strict=True):
        assert list(handle.result(timeout=120).token_ids) == reference.greedy(task, text, PARAMS.max_new_tokens), task
    expected = reference.greedy("prefix16", instruction, PARAMS.max_new_tokens)
    assert [list(h.result(timeout=120).token_ids) for h in samples] == [expected] * 3
    assert cascaded and max(cascaded) >= 3


def test_a_scoring_request_reads_the_pages_of_its_text(make_engine, reference, adapter_dirs):
    text = random_text(random.Random(4), 50)
    engine = make_engine()
    tokens_of(engine, text, "prefix16")
    before = hits(engine)
    scored = engine.submit(EngineRequest(text, task="prefix16", choices=CHOICES)).result(timeout=60)
    assert hits(engine) > before
    expected = reference_scores(reference, adapter_dirs, "prefix16", text, CHOICES)
    for choice in scored.choices:
        assert choice.logprob == pytest.approx(expected[choice.text][0], abs=2e-4)


def test_a_request_scoring_its_prompt_tokens_computes_them_all(make_engine):
    """Prompt log-probabilities need every prompt position's logits: such a request reads no cached page."""
    text = random_text(random.Random(5), 50)
    engine = make_engine()
    tokens_of(engine, text, None)
    echo = SamplingParams(max_new_tokens=2, logprobs=0, prompt_logprobs=True)
    result = engine.submit(EngineRequest(text, params=echo)).result(timeout=60)
    assert hits(engine) == 0
    assert len(result.prompt_logprobs) == len(result.prompt_ids) - 1


def test_caching_can_be_turned_off(make_engine, reference):
    text = random_text(random.Random(7), 60)
    engine = make_engine(prefix_caching=False)
    for _ in range(2):
        assert tokens_of(engine, text, "ptune5") == reference.greedy("ptune5", text, PARAMS.max_new_tokens)
    stats = engine.stats()
    assert stats.prefix_cache_hits == stats.prefix_cache_queries == stats.kv_pages_cached == 0


def test_idle_cached_pages_give_way_to_new_requests(make_engine, reference):
    """A pool that holds a few requests: cached pages nobody reads are taken back, oldest first, and every
    request still gets its PEFT tokens."""
    probe = make_engine()
    engine = make_engine(kv_cache_bytes=20 * probe.page_bytes, max_running=2)
    rng = random.Random(8)
    filled = 0  # full pages the requests computed and registered, over the run
    for i in range(6):
        text = random_text(rng, 40)
        assert tokens_of(engine, text, KINDS[i % len(KINDS)]) == reference.greedy(KINDS[i % len(KINDS)], text, 6)
        filled += (len(engine.tokenizer(text)["input_ids"]) + PARAMS.max_new_tokens - 1) // PAGE_SIZE
    stats = engine.stats()
    assert filled > stats.kv_pages_total > stats.kv_pages_used  # so some cached pages were taken back
    assert stats.kv_pages_cached > 0
