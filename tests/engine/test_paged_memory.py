"""Paged KV memory in the real engine: preemption changes no token, prefixes are shared, memory follows use."""

from __future__ import annotations

import time

import pytest

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidConfig
from server.engine.pages import PAGE_SIZE, pages_for
from server.engine.results import TokenDelta
from server.engine.sequence import SamplingParams

TEXTS = ["the quick brown fox jumps over the lazy dog", "select price from model where token", "café über 東京",
         "prompt prefix tuning batch server", "42 3.14 translate the fox", "lazy lazy dog over"]


def tight_engine(make_engine, pages: int, **config):
    """An engine whose KV pool holds `pages` pages: small enough that these requests must preempt."""
    probe = make_engine()
    return make_engine(kv_cache_bytes=pages * probe.page_bytes, **config)


def streamed_ids(handle) -> list[int]:
    return [t for item in handle for t in item.token_ids if isinstance(item, TokenDelta)]


def test_preempted_greedy_requests_give_the_peft_tokens_and_stream_nothing_twice(make_engine, reference):
    engine = tight_engine(make_engine, pages=14, max_running=8)
    params = SamplingParams(max_new_tokens=3 * PAGE_SIZE, ignore_eos=True)
    tasks = ["pt8", "prefix16", None, "pt64", "ptune5", "prefix1"]
    handles = [engine.submit(EngineRequest(text, task=task, params=params)) for text, task in zip(TEXTS, tasks,
                                                                                                  strict=True)]
    streams = [streamed_ids(h) for h in handles]
    stats = engine.stats()
    assert stats.preemptions > 0, "the pool was meant to run short"
    for (text, task), handle, streamed in zip(zip(TEXTS, tasks, strict=True), handles, streams, strict=True):
        tokens = list(handle.result(timeout=60).token_ids)
        assert streamed == tokens  # every token streamed exactly once, resumed requests included
        assert tokens == reference.greedy(task, text, params.max_new_tokens), f"task={task}"


def test_a_preempted_seeded_sampling_request_keeps_its_random_stream(make_engine):
    params = SamplingParams(max_new_tokens=3 * PAGE_SIZE, temperature=0.9, top_k=40, seed=77, ignore_eos=True)
    alone = make_engine().submit(EngineRequest(TEXTS[0], task="pt8", params=params)).result(timeout=60).token_ids
    engine = tight_engine(make_engine, pages=14, max_running=8)
    crowd = [engine.submit(EngineRequest(t, task="prefix16", params=SamplingParams(max_new_tokens=3 * PAGE_SIZE,
                                                                                   ignore_eos=True)))
             for t in TEXTS[1:5]]
    squeezed = engine.submit(EngineRequest(TEXTS[0], task="pt8", params=params))  # the newest: preempted first
    assert squeezed.result(timeout=60).token_ids == alone
    for h in crowd:
        h.result(timeout=60)
    assert engine.stats().preemptions > 0


def test_requests_of_one_task_hold_its_prefix_once(make_engine, registry):
    engine = make_engine(max_running=16)
    virtual = registry.get("pt64").num_virtual_tokens
    params = SamplingParams(max_new_tokens=2000, ignore_eos=True)
    handles = [engine.submit(EngineRequest("hello there", task="pt64", params=params)) for _ in range(12)]
    for h in handles:  # all of them decoding
        next(iter(h))
    stats = engine.stats()
    assert stats.running == 12 and stats.kv_pages_shared == pages_for(virtual)
    text_pages = stats.kv_pages_used - stats.kv_pages_shared
    assert text_pages < 12 * pages_for(virtual)  # the prefix is not copied per request
    for h in handles:
        h.cancel()
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    idle = engine.stats()
    assert idle.kv_pages_used == idle.kv_pages_shared == pages_for(virtual)  # the prefix stays cached


def test_a_new_upload_of_the_same_weights_recomputes_nothing(make_engine, registry, adapter_dirs):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    engine.submit(EngineRequest("hello", task="pt8", params=params)).result(timeout=30)
    registry.put_path("pt8", adapter_dirs["pt8"])  # a new version, the same prompt weights
    registry.put_path("pt8_copy", adapter_dirs["pt8"])  # another task name, the same weights
    engine.submit(EngineRequest("hello", task="pt8", params=params)).result(timeout=30)
    engine.submit(EngineRequest("hello", task="pt8_copy", params=params)).result(timeout=30)
    assert engine.stats().prompt_cache_misses == 1 and engine.stats().prompt_cache_hits == 2


@pytest.mark.slow
def test_a_long_request_no_longer_throttles_short_ones(make_engine):
    # Budget for about 3 requests at their maximum (the old rule), but all 8 run at once.
    probe = make_engine()
    long = SamplingParams(max_new_tokens=40 * PAGE_SIZE, ignore_eos=True)
    short = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = make_engine(kv_cache_bytes=3 * 42 * probe.page_bytes, max_running=16)
    handles = [engine.submit(EngineRequest("a long one", params=long))] + [engine.submit(EngineRequest(f"short {i}",
                                                                                                       params=short))
                                                               for i in range(7)]
    for h in handles:
        h.result(timeout=120)
    assert engine.stats().peak_running == 8 and engine.stats().preemptions == 0


def test_a_budget_below_one_page_is_refused_naming_the_setting(make_engine):
    page = make_engine().page_bytes
    with pytest.raises(InvalidConfig) as err:
        make_engine(kv_cache_bytes=2 * page - 1)  # one page for requests, and the null page
    assert err.value.field == "kv_cache_bytes" and f"{2 * page} bytes" in str(err.value)
    assert make_engine(kv_cache_bytes=2 * page).stats().kv_pages_total == 1


@pytest.mark.slow
def test_what_a_page_held_before_never_reaches_its_next_owner(make_engine, reference):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine.submit(EngineRequest("warm up the pool", task="pt8", params=params)).result(timeout=30)
    # What an overflowing request could leave behind: every page but the null page full of NaN.
    kv = engine.runner.kv
    for keys, values in kv.storage():
        keys[:, 1:] = float("nan")
        values[:, 1:] = float("inf")
    for task in (None, "prefix16", "pt64"):  # new pages, reused pages, a cached prefix evicted or not
        text = "the lazy dog"
        assert list(engine.submit(EngineRequest(text, task=task, params=params)).result(timeout=30).token_ids) == \
            reference.greedy(task, text, 8), task
