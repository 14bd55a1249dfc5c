"""n samples of one text (Engine.submit_samples): the text's pages are computed once and read by every sample;
greedy samples equal the single request's PEFT tokens; seeded samples are repeatable."""

from __future__ import annotations

import random

import pytest

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.pages import PAGE_SIZE
from server.engine.sequence import SamplingParams
from tests.engine.conftest import random_text

TEXT = random_text(random.Random(11), 45)


def results(engine, request):
    return [h.result(timeout=120) for h in engine.submit_samples(request)]


@pytest.mark.parametrize("task", [None, "pt8", "ptune5", "prefix16"])
def test_greedy_samples_are_all_the_single_requests_peft_tokens(make_engine, reference, task):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    done = results(engine, EngineRequest(TEXT, task=task, params=params, n=3))
    expected = reference.greedy(task, TEXT, 8)
    assert [list(r.token_ids) for r in done] == [expected] * 3
    # The text was computed once: the other two samples read every full page of it but the last token's.
    n_text = len(engine.tokenizer(TEXT)["input_ids"])
    assert engine.stats().prefix_cache_hits == 2 * ((n_text - 1) // PAGE_SIZE) * PAGE_SIZE > 0


def test_seeded_samples_are_repeatable_and_each_its_own(make_engine):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    first = [list(r.token_ids) for r in results(engine, EngineRequest(TEXT, task="pt8", params=params, n=4))]
    again = [list(r.token_ids) for r in results(engine, EngineRequest(TEXT, task="pt8", params=params, n=4))]
    assert first == again
    assert len({tuple(t) for t in first}) > 1  # seed, seed + 1, ...: different draws
    # Sample i is the single request seeded with seed + i.
    alone = engine.submit(EngineRequest(TEXT, task="pt8", params=SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=43, ignore_eos=True))).result(timeout=60)
    assert list(alone.token_ids) == first[1]


def test_samples_wait_in_line_and_survive_a_tight_pool(make_engine, reference):
    probe = make_engine()
    engine = make_engine(kv_cache_bytes=14 * probe.page_bytes, max_running=4, max_tokens_per_step=32)
    params = SamplingParams(max_new_tokens=2 * PAGE_SIZE, ignore_eos=True)
    handles = engine.submit_samples(EngineRequest(TEXT, task="prefix16", params=params, n=5))
    expected = reference.greedy("prefix16", TEXT, 2 * PAGE_SIZE)
    for handle in handles:
        assert list(handle.result(timeout=120).token_ids) == expected


def test_n_is_checked(make_engine):
    engine = make_engine()
    for n in (0, 17):
        with pytest.raises(InvalidParameter) as caught:
            engine.submit_samples(EngineRequest(TEXT, n=n))
        assert caught.value.param == "n"
    with pytest.raises(InvalidParameter) as caught:
        engine.submit_samples(EngineRequest(TEXT, n=2, choices=["yes", "no"]))
    assert caught.value.param == "n"
    with pytest.raises(InvalidParameter):
        engine.submit(EngineRequest(TEXT, n=2))  # one handle: submit_samples takes n


def test_more_samples_than_could_ever_be_in_flight_is_a_422_not_a_503(make_engine):
    engine = make_engine(max_running=2, max_tokens_per_step=16, max_queue=1)
    with pytest.raises(InvalidParameter) as caught:
        engine.submit_samples(EngineRequest(TEXT, n=4))
    assert caught.value.param == "n" and "at most 3" in str(caught.value)


def test_a_sample_group_counts_its_text_once_and_regroups_what_comes_flat():
    from server.engine.results import Usage
    from server.engine.samples import SampleGroup, flatten, owners, regroup

    usage = SampleGroup.usage([Usage(10, 5, 3), Usage(10, 5, 4)])
    assert usage == Usage(10, 5, 7)
    groups = [SampleGroup(["a0", "a1"]), SampleGroup(["b0"]), SampleGroup(["c0", "c1", "c2"])]
    assert flatten(groups) == ["a0", "a1", "b0", "c0", "c1", "c2"]
    assert owners(groups) == [0, 0, 1, 2, 2, 2]
    assert regroup([f"result of {h}" for h in flatten(groups)], groups)[2] == ["result of c0", "result of c1",
                                                                              "result of c2"]
    for samples, capacity, entries in ((17, 16, 1), (20, 16, 4)):
        with pytest.raises(InvalidParameter) as caught:
            SampleGroup.check_fits(samples, capacity, entries=entries)
        assert caught.value.param == "n"
    SampleGroup.check_fits(16, 16)
    SampleGroup.check_fits(30, 16, entries=30)  # a batch of single requests: the batch's own limit decides
    for bad in (0, 17, True, 2.0):
        with pytest.raises(InvalidParameter):
            SampleGroup.check_n(bad)
