"""The KV manager alone (no model, no torch): every per-request page verb, and the admission policy beside it."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from types import SimpleNamespace

from server.engine.kv_manager import KVManager, prefix_key
from server.engine.pages import PAGE_SIZE, pages_for
from server.engine.policy import AdmissionPolicy
from server.engine.scoring import ChoiceScoring
from server.engine.sequence import SamplingParams, Sequence


def task_prompt(sha: str, n: int, kind: str = "prompt"):
    return SimpleNamespace(kind=kind, sha256=sha, embeddings=SimpleNamespace(shape=(n, 32)))


def request(ids: list[int], prompt=None, **params) -> Sequence:
    return Sequence(prompt_ids=ids, params=SamplingParams(max_new_tokens=4, **params), prompt=prompt,
                    num_virtual=prompt.embeddings.shape[0] if prompt is not None else 0)


def computed(kv: KVManager, seq: Sequence, n: int) -> None:
    """As if the step computed `n` tokens of `seq`: its cache advances and its full pages are registered."""
    seq.num_cached += n
    kv.register_full_pages(seq)


TEXT = list(range(100, 150))  # three full pages and two tokens


def test_admit_grow_register_free_and_the_cache_after_it():
    kv = KVManager(kv_pages=20, prefix_cache_pages=4, prefix_caching=True)
    first = request(TEXT)
    assert kv.cached_pages(first) == [] and kv.can_admit(first, [], others_running=False)
    assert kv.admit(first, [], n=len(TEXT)) is None  # no task: no prefix to compute
    assert len(first.pages) == pages_for(len(TEXT)) and kv.pool.free == 20 - 4
    computed(kv, first, len(TEXT))
    assert first.pages_registered == 3  # the full pages, not the partial fourth
    assert kv.grow(first, 1) and len(first.pages) == 4  # the 51st position still fits the fourth page
    kv.free(first)
    assert first.pages == [] and kv.pool.idle_cached == 3 and kv.pool.free == 17

    second = request([*TEXT[:48], 7, 8, 9])
    cached = kv.cached_pages(second)
    assert len(cached) == 3  # its first three pages are the first request's
    assert kv.admit(second, cached, n=3) is None
    assert second.num_cached == 48 and second.pages[:3] == cached
    assert (kv.cache_queries, kv.cache_hits) == (len(TEXT) + 51, 48)  # both looked up; the second found 48


def test_the_last_token_is_always_computed_and_prompt_logprobs_read_nothing():
    kv = KVManager(kv_pages=20, prefix_cache_pages=4, prefix_caching=True)
    first = request(TEXT[:48])
    kv.admit(first, [], n=48)
    computed(kv, first, 48)
    kv.free(first)
    assert len(kv.cached_pages(request(TEXT[:48]))) == 2  # the third page holds its last token: computed again
    assert kv.cached_pages(request(TEXT[:48], logprobs=1, prompt_logprobs=True)) == []


def test_task_prefixes_are_shared_and_a_new_soft_prompt_is_computed_once():
    kv = KVManager(kv_pages=40, prefix_cache_pages=8, prefix_caching=True)
    prompt = task_prompt("abc", n=20)
    a, b = request([1, 2, 3], prompt=prompt), request([4, 5], prompt=prompt)
    assert kv.computes_prefix(a)
    entry = kv.admit(a, [], n=3)
    assert entry is not None and len(entry.pages) == pages_for(20)
    entry.ready = True
    assert not kv.computes_prefix(b) and kv.admit(b, [], n=2) is None  # shared, and ready
    assert a.prefix is b.prefix is entry and entry.users == 2
    assert prefix_key(a) != prefix_key(request([1], prompt=task_prompt("abc", n=20, kind="prefix")))
    kv.free(a)
    kv.free(b)
    assert entry.users == 0 and kv.pool.stats().pages_shared == pages_for(20)  # idle, kept for the next one


def test_can_admit_counts_text_prefix_choices_and_the_reserve():
    kv = KVManager(kv_pages=10, prefix_cache_pages=0, prefix_caching=True)
    long = request(list(range(1, 10 * PAGE_SIZE + 1)))  # 10 pages: the whole pool
    assert kv.can_admit(long, [], others_running=False)
    assert not kv.can_admit(long, [], others_running=True)  # beside others it must leave the reserve (1 page)
    scoring = request([1, 2, 3])
    scoring.scoring = ChoiceScoring((("yes", (5,)), ("no", (6,))))
    assert kv.can_admit(scoring, [], others_running=False)
    assert not kv.fits_alone(long)  # with its 4 new tokens it needs an 11th page
    assert kv.fits_alone(request(list(range(1, 9 * PAGE_SIZE))))


def test_growth_fails_cleanly_when_the_pool_is_short():
    kv = KVManager(kv_pages=2, prefix_cache_pages=0, prefix_caching=False)
    seq = request(list(range(1, 2 * PAGE_SIZE + 1)))
    kv.admit(seq, [], n=2 * PAGE_SIZE)
    seq.num_cached = 2 * PAGE_SIZE
    assert not kv.grow(seq, 1) and len(seq.pages) == 2  # nothing taken
    kv.free(seq)
    assert kv.pool.free == 2


def test_the_storage_plan_covers_every_page_handed_out_and_idle_gives_back():
    kv = KVManager(kv_pages=10, prefix_cache_pages=0, prefix_caching=False)
    seq = request(list(range(1, 3 * PAGE_SIZE)))
    kv.admit(seq, [], n=3 * PAGE_SIZE - 1)
    plan = kv.storage_plan()
    assert plan.extent == max(seq.pages) + 1 and sorted(plan.fresh) == sorted(seq.pages) and not plan.idle
    assert kv.storage_plan().fresh == []  # handed out once, cleared once
    kv.free(seq)
    assert kv.idle_storage_plan().extent == 0 and kv.idle_storage_plan().idle


def test_the_policy_prefers_cached_pages_within_its_window_and_bounds_overtaking():
    kv = KVManager(kv_pages=100, prefix_cache_pages=0, prefix_caching=True)
    done = request(TEXT)
    kv.admit(done, [], n=len(TEXT))
    computed(kv, done, len(TEXT))
    kv.free(done)
    cold, warm = request(list(range(300, 350))), request([*TEXT[:48], 1, 2])
    waiting = deque([cold, warm])
    policy = AdmissionPolicy(kv, max_overtaken=1)
    policy.new_step()
    seq, cached = policy.next(waiting, running=[])
    assert seq is warm and len(cached) == 3
    policy.take(waiting, warm)
    assert list(waiting) == [cold] and cold.overtaken == 1
    waiting.append(request([*TEXT[:48], 3, 4]))
    policy.new_step()
    assert policy.next(waiting, running=[])[0] is cold  # overtaken once already: it goes next


def test_neither_the_kv_manager_nor_the_scheduler_loads_torch():
    code = ("import sys, server.engine.kv_manager, server.engine.policy, server.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
