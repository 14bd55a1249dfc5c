"""The engine end to end: budgets, cancellation, snapshots, sampling, stops, isolation."""

from __future__ import annotations

import time

import pytest
import torch

from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.errors import QueueFull, RequestCancelled, RequestFailed, RequestTooLong
from server.engine.loop import Engine
from server.engine.results import TokenDelta
from server.engine.sequence import SamplingParams
from server.model.model_loader import load_base_model

GREEDY8 = SamplingParams(max_new_tokens=8, ignore_eos=True)


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_burst_leaves_memory_within_budgets(make_engine):
    engine = make_engine(max_running=6, prompt_cache_bytes=40_000)
    tasks = ["pt8", "pt64", "prefix16", "prefix64proj", "ptune5", None] * 4
    handles = [engine.submit(EngineRequest("a burst of requests", task=t, params=GREEDY8)) for t in tasks]
    for h in handles:
        h.result(timeout=60)
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0
    # Only cached task prefixes and the prefix cache's full pages keep pages when idle.
    assert stats.kv_pages_used == stats.kv_pages_shared + stats.kv_pages_cached
    assert stats.prompt_cache_bytes <= 40_000
    assert stats.prompt_cache_misses >= 5  # every task's prefix was computed, and evictions recomputed some


def test_kv_memory_stays_within_its_budget_while_running(make_engine, base_model):
    per_position = make_engine().runner.kv.bytes_per_position
    budget = per_position * 200  # room for a few slots of ~60 positions
    engine = make_engine(kv_cache_bytes=budget, max_running=32)
    peak = 0
    handles = [engine.submit(EngineRequest("the quick brown fox " * 3, task="pt8", params=GREEDY8)) for _ in range(12)]
    while not all(h.done for h in handles):
        peak = max(peak, engine.stats().kv_bytes)
        time.sleep(0.001)
    assert 0 < peak <= budget
    assert all(h.result().usage.completion_tokens == 8 for h in handles)


def test_a_task_prefix_is_computed_once_per_version(make_engine, registry, adapter_dirs):
    engine = make_engine()
    for _ in range(3):
        engine.submit(EngineRequest("hello", task="pt8", params=GREEDY8)).result(timeout=30)
    assert engine.stats().prompt_cache_misses == 1 and engine.stats().prompt_cache_hits == 2
    registry.put_path("pt8", adapter_dirs["pt64"])  # a new version: its prefix is computed anew
    engine.submit(EngineRequest("hello", task="pt8", params=GREEDY8)).result(timeout=30)
    assert engine.stats().prompt_cache_misses == 2


def test_cancelled_request_frees_its_slot(make_engine):
    engine = make_engine(max_running=1)
    long = engine.submit(EngineRequest("cancel me", params=SamplingParams(max_new_tokens=2000, ignore_eos=True)))
    stream = iter(long)
    assert isinstance(next(stream), TokenDelta)  # it runs and holds the only slot
    long.cancel()
    with pytest.raises(RequestCancelled):
        long.result(timeout=30)
    short = engine.submit(EngineRequest("next", params=GREEDY8))  # gets the freed slot
    assert short.result(timeout=30).usage.completion_tokens == 8
    # The loop gives the storage back right after the last request leaves the running batch.
    wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_bytes == 0)


def test_replacing_or_deleting_a_task_does_not_touch_running_requests(make_engine, registry, adapter_dirs, reference):
    engine = make_engine()
    text = "the quick brown fox"
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    replaced = engine.submit(EngineRequest(text, task="prefix16", params=params))
    deleted = engine.submit(EngineRequest(text, task="pt8", params=params))
    next(iter(replaced)), next(iter(deleted))  # both are decoding with their snapshots
    registry.put_path("prefix16", adapter_dirs["prefix1"])
    registry.delete("pt8")
    assert list(replaced.result(timeout=60).token_ids) == reference.greedy("prefix16", text, 40)
    assert list(deleted.result(timeout=60).token_ids) == reference.greedy("pt8", text, 40)
    after = engine.submit(EngineRequest(text, task="prefix16", params=SamplingParams(max_new_tokens=8,
                                                                                     ignore_eos=True)))
    assert list(after.result(timeout=60).token_ids) == reference.greedy("prefix1", text, 8)  # the new version


def test_seeded_sampling_does_not_depend_on_the_batch(make_engine):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.submit(EngineRequest("sample me", task="pt8", params=params)).result(timeout=30).token_ids
    others = [engine.submit(EngineRequest(f"noise {i}", task=t, params=GREEDY8)) for i, t in enumerate(["prefix16",
                                                                                                        None, "pt64"])]
    crowded = engine.submit(EngineRequest("sample me", task="pt8", params=params)).result(timeout=30).token_ids
    for h in others:
        h.result(timeout=30)
    assert alone == crowded
    unseeded = {engine.submit(EngineRequest("sample me", task="pt8", params=SamplingParams(
        max_new_tokens=12, temperature=1.5, ignore_eos=True))).result(timeout=30).token_ids for _ in range(4)}
    assert len(unseeded) > 1  # sampling really samples


def test_stop_strings_end_the_text_before_the_stop(make_engine):
    engine = make_engine()
    free = engine.submit(EngineRequest("stop test", params=SamplingParams(max_new_tokens=30,
                                                                          ignore_eos=True))).result(timeout=30)
    stop = free.text[5:8]
    assert len(stop) == 3
    stopped = engine.submit(EngineRequest("stop test", params=SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                                             stop=(stop,))))
    result = stopped.result(timeout=30)
    assert result.finish_reason == "stop"
    assert result.text == free.text[:free.text.find(stop)]
    assert len(result.token_ids) < 30


def test_eos_ends_a_request_unless_ignored(base_model, registry):
    engine = Engine(base_model, registry, EngineConfig())
    engine.start()
    try:
        first = engine.submit(EngineRequest("eos test", params=SamplingParams(max_new_tokens=6,
                                                                              ignore_eos=True))).result(30)
        # Declare the 3rd generated token the end of sequence: the request must stop there.
        engine.scheduler.eos_ids = frozenset({first.token_ids[2]})
        ended = engine.submit(EngineRequest("eos test", params=SamplingParams(max_new_tokens=6))).result(30)
        assert ended.finish_reason == "eos" and ended.token_ids == first.token_ids[:3]
        ignored = engine.submit(EngineRequest("eos test", params=SamplingParams(max_new_tokens=6,
                                                                                ignore_eos=True))).result(30)
        assert ignored.finish_reason == "length" and ignored.token_ids == first.token_ids
    finally:
        engine.shutdown(5)


def test_a_failing_request_gets_its_own_error_and_the_rest_go_on(make_engine, reference):
    engine = make_engine()
    poisoned = engine.submit(EngineRequest("poison", params=SamplingParams(max_new_tokens=50, ignore_eos=True)))
    real_run = engine.runner.run

    def run(batch, prefixes=()):  # fault injection: the model fails whenever the poisoned request is in the batch
        if any(seq.id == poisoned.id for seq, _ in batch):
            raise RuntimeError("injected failure")
        return real_run(batch, prefixes)

    engine.runner.run = run
    healthy = [engine.submit(EngineRequest("healthy request", task=t, params=GREEDY8)) for t in ("pt8", "prefix16",
                                                                                                 None)]
    with pytest.raises(RequestFailed, match="injected failure"):
        poisoned.result(timeout=30)
    for h, task in zip(healthy, ("pt8", "prefix16", None), strict=True):
        assert list(h.result(timeout=30).token_ids) == reference.greedy(task, "healthy request", 8)
    assert engine.submit(EngineRequest("after", params=GREEDY8)).result(timeout=30).usage.completion_tokens == 8


def test_context_limits(make_engine):
    engine = make_engine(max_context=64)
    with pytest.raises(RequestTooLong) as err:
        engine.submit(EngineRequest("word " * 100, params=GREEDY8))
    assert err.value.limit == 63 and err.value.actual >= 100
    with pytest.raises(RequestTooLong):
        engine.submit(EngineRequest("word " * 10, task="pt64", params=GREEDY8))  # 64 virtual tokens fill the context
    # generation is clamped at the context's end rather than refused
    text = "the quick brown fox " * 4
    n_text = len(engine.tokenizer(text)["input_ids"])
    assert n_text < 60
    result = engine.submit(EngineRequest(text, params=SamplingParams(max_new_tokens=100, ignore_eos=True))).result(30)
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens + result.usage.completion_tokens == 64


def test_queue_limit(make_engine):
    engine = make_engine(max_running=1, max_tokens_per_step=8, max_queue=2)
    handles = []
    with pytest.raises(QueueFull):
        for _ in range(50):
            handles.append(engine.submit(EngineRequest("queued", params=SamplingParams(max_new_tokens=200,
                                                                                       ignore_eos=True))))
    for h in handles:
        h.cancel()


def test_a_burst_of_max_running_plus_max_queue_is_all_accepted(base_model, registry):
    # The loop is not started yet, so nothing has moved into the running batch: the admission count
    # alone must leave room for max_running + max_queue requests, and refuse the next one.
    engine = Engine(base_model, registry, EngineConfig(max_running=2, max_tokens_per_step=8, max_queue=3))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    try:
        handles = [engine.submit(EngineRequest(f"burst {i}", params=params)) for i in range(5)]
        with pytest.raises(QueueFull):
            engine.submit(EngineRequest("one too many", params=params))
        engine.start()
        assert [h.result(30).finish_reason for h in handles] == ["length"] * 5
        # Finished requests leave: the same burst fits again.
        again = [engine.submit(EngineRequest(f"again {i}", params=params)) for i in range(5)]
        assert all(h.result(30).usage.completion_tokens == 3 for h in again)
    finally:
        engine.shutdown(timeout_s=5)


def test_unsupported_models_are_refused(tmp_path):
    from transformers import T5Config

    from server.engine.errors import ModelNotSupported

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ModelNotSupported, match="encoder-decoder"):
        load_base_model(tmp_path)


@pytest.mark.parametrize("model_type", ["falcon", "bloom"])
def test_models_without_pluggable_attention_are_refused_clearly(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.demo.tiny_models import build_tokenizer
    from server.engine.errors import ModelNotSupported

    config = AutoConfig.for_model(model_type, vocab_size=600, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    build_tokenizer(tmp_path)
    with pytest.raises(ModelNotSupported, match=f"\\({model_type}\\).*(cannot be served|pluggable attention)"):
        load_base_model(tmp_path)


def test_model_is_frozen_in_eval_mode(base_model):
    assert not base_model.model.training
    assert not any(p.requires_grad for p in base_model.model.parameters())
    assert base_model.dtype == torch.float32 and base_model.device.type == "cpu"


def test_a_failure_while_finishing_neither_hangs_the_request_nor_leaks_its_place(base_model, registry, monkeypatch):
    engine = Engine(base_model, registry, EngineConfig(max_running=1, max_tokens_per_step=8, max_queue=1))
    real_release, calls = engine.scheduler.kv.free, []

    def release_failing_once(seq):
        calls.append(seq.id)
        if len(calls) == 1:
            raise RuntimeError("freeing the pages failed")
        real_release(seq)

    monkeypatch.setattr(engine.scheduler.kv, "free", release_failing_once)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        assert engine.submit(EngineRequest("first",
                                           params=params)).result(30).finish_reason == "length"  # heard its end
        # Its place in the queue is free again: max_running + max_queue fit, as before.
        handles = [engine.submit(EngineRequest(f"then {i}", params=params)) for i in range(2)]
        assert all(h.result(30).usage.completion_tokens == 2 for h in handles)
    finally:
        engine.shutdown(timeout_s=5)
