"""The heart of promptswap: in any mixed batch, each request gets exactly its single-request PEFT tokens."""

from __future__ import annotations

import random

import pytest

from server.engine.admission import EngineRequest
from server.engine.sequence import SamplingParams
from tests.engine.conftest import ADAPTERS, random_text

TASKS = [*ADAPTERS, None]


def run_mixed(engine, requests, max_new_tokens, stagger_at: int):
    """Submit requests[:stagger_at], wait until each has a token, then submit the rest while they decode."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    handles = [engine.submit(EngineRequest(text, task=task, params=params)) for task, text in requests[:stagger_at]]
    for handle in handles:
        next(iter(handle))  # its first token exists: it is decoding now
    handles += [engine.submit(EngineRequest(text, task=task, params=params)) for task, text in requests[stagger_at:]]
    return [list(h.result(timeout=120).token_ids) for h in handles]


@pytest.mark.parametrize("seed", range(4))
def test_mixed_batches_match_single_request_peft(make_engine, reference, seed):
    rng = random.Random(seed)
    batch_size = [32, rng.randint(1, 32), rng.randint(2, 12), 1][seed]
    requests = []
    for _ in range(batch_size):
        n_words = rng.choice([1, 2, rng.randint(3, 30), rng.randint(60, 150)])
        requests.append((rng.choice(TASKS), random_text(rng, n_words)))
    # Small steps and few slots force chunked prefill, queueing, and slots reused after leaving.
    engine = make_engine(max_running=rng.choice([4, 8, 32]), max_tokens_per_step=rng.choice([32, 64, 512]))
    max_new = rng.randint(4, 8)
    got = run_mixed(engine, requests, max_new, stagger_at=max(1, batch_size // 2))
    for (task, text), tokens in zip(requests, got, strict=True):
        assert tokens == reference.greedy(task, text, max_new), f"task={task} text={text[:40]!r}"


def test_every_adapter_alone_matches_peft(make_engine, reference):
    engine = make_engine()
    text = "Translate English to French: cheese =>"
    for task in TASKS:
        handle = engine.submit(EngineRequest(text, task=task, params=SamplingParams(max_new_tokens=12,
                                                                                    ignore_eos=True)))
        assert list(handle.result(timeout=60).token_ids) == reference.greedy(task, text, 12), task


def test_prompts_change_the_output(make_engine):
    """Guard against a vacuous fidelity test: the adapters really steer the tiny model."""
    engine = make_engine()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = {task: engine.submit(EngineRequest("the quick brown fox", task=task, params=params)).result(60).token_ids
            for task in TASKS}
    assert len(set(outs.values())) >= len(TASKS) - 1


def test_same_workload_twice_gives_the_same_tokens(make_engine):
    rng = random.Random(7)
    requests = [(rng.choice(TASKS), random_text(rng, rng.randint(1, 40))) for _ in range(12)]
    first = run_mixed(make_engine(max_running=5), requests, 6, stagger_at=6)
    second = run_mixed(make_engine(max_running=12), requests, 6, stagger_at=3)
    assert first == second
