"""KV pages without torch: requests hold what they use, task prefixes are shared, a full pool preempts."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from server.engine.kv_manager import prefix_key
from server.engine.pages import PAGE_SIZE, PagePool, pages_for
from server.engine.results import TokenDelta
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.scoring import ChoiceScoring
from server.engine.sequence import SamplingParams, Sequence, Status
from tests.engine.steps import sampled


def task_prompt(sha: str, n: int, kind: str = "prompt"):
    """What the scheduler reads of a prompt snapshot: its kind, content hash and shape."""
    return SimpleNamespace(kind=kind, sha256=sha, embeddings=SimpleNamespace(shape=(n, 32)))


def request(prompt_len: int, max_new: int = 4, prompt=None, **params) -> Sequence:
    num_virtual = prompt.embeddings.shape[0] if prompt is not None else 0
    return Sequence(prompt_ids=list(range(1, prompt_len + 1)), params=SamplingParams(max_new_tokens=max_new, **params),
                    prompt=prompt, num_virtual=num_virtual)


def step(sched: Scheduler, token: int = 7):
    """Pretend the runner computed the step and sampled `token` for each request that samples."""
    scheduled = sched.schedule()
    for entry in scheduled.new_prefixes:  # the engine computes a new prefix before the step runs
        entry.ready = True
    sampling = [s for s, n in scheduled.batch if s.samples_after(n)]
    sched.postprocess(sampled(scheduled.batch, [token] * len(sampling)))
    return scheduled


def check_pool(sched: Scheduler) -> None:
    """Every page is free, idle in the prefix cache, or held: by one task prefix, or by running requests (by
    several only when it is a cached page), its count of holders right."""
    pool = sched.kv.pool
    holders = Counter(p for s in sched.running for p in s.pages)
    prefix_pages = [p for e in pool.prefixes.values() for p in e.pages]
    assert len(prefix_pages) == len(set(prefix_pages)) and not set(prefix_pages) & set(holders), "a page held twice"
    for page, count in holders.items():
        assert pool.holders(page) == count and (count == 1 or pool.is_cached(page))
    assert len(holders) + len(prefix_pages) + pool.idle_cached + pool.free == pool.total
    for s in sched.waiting:
        assert not s.pages and s.prefix is None and s.num_cached == 0


def test_a_request_holds_the_pages_it_fills_not_its_maximum():
    sched = Scheduler(SchedulerConfig(kv_pages=100))
    r = request(20, max_new=1000)
    sched.add(r)
    step(sched)
    assert len(r.pages) == pages_for(20)  # not pages_for(1020)
    for _ in range(PAGE_SIZE * 2 - 20 + 1):
        step(sched)
    assert len(r.pages) == pages_for(r.num_cached + 1) == 3
    assert sched.fits_alone(r) and not sched.fits_alone(request(20, max_new=100 * PAGE_SIZE))


def test_requests_of_one_task_share_its_prefix_pages_once():
    sched = Scheduler(SchedulerConfig(kv_pages=100))
    prompt = task_prompt("aaa", n=40)
    same_weights_new_version = task_prompt("aaa", n=40)
    seqs = [request(5, prompt=prompt) for _ in range(3)] + [request(5, prompt=same_weights_new_version)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert len(first.new_prefixes) == 1  # computed once for all four
    entry = first.new_prefixes[0]
    assert all(s.prefix is entry for s in seqs) and entry.users == 4
    assert sched.kv.pool.stats().pages_shared == pages_for(40) == len(entry.pages)
    assert sched.kv.pool.stats().pages_used == pages_for(40) + 4 * pages_for(5)
    assert prefix_key(seqs[0]) != prefix_key(request(5, prompt=task_prompt("aaa", n=40, kind="prefix")))


def test_idle_prefixes_stay_cached_within_their_cap_least_recently_used_first():
    pool = PagePool(total_pages=20, idle_prefix_pages=4)
    a = pool.acquire_prefix("a", 2 * PAGE_SIZE, None)
    b = pool.acquire_prefix("b", 2 * PAGE_SIZE, None)
    c = pool.acquire_prefix("c", PAGE_SIZE, None)
    for e in (a, b, c):
        e.ready = True
    pool.release_prefix(a)
    pool.release_prefix(b)
    assert set(pool.prefixes) == {"a", "b", "c"}  # 4 idle pages: within the cap
    pool.release_prefix(c)  # 5 idle pages: the least recently used (a) goes
    assert set(pool.prefixes) == {"b", "c"}
    assert pool.acquire_prefix("b", 2 * PAGE_SIZE, None) is b and pool.hits == 1  # reused, not recomputed
    # The pool takes idle prefix pages back when it runs short, never those in use (b).
    assert pool.allocate(pool.free + 1) is not None
    assert set(pool.prefixes) == {"b"} and pool.available() == 0
    assert pool.allocate(1) is None


def test_a_prefix_replaced_while_running_keeps_its_pages_for_the_running_request():
    sched = Scheduler(SchedulerConfig(kv_pages=100))
    old = request(3, max_new=50, prompt=task_prompt("old", 20))
    sched.add(old)
    step(sched)
    old_pages = list(old.prefix.pages)
    new = request(3, max_new=50, prompt=task_prompt("new", 20))  # the task was uploaded again
    sched.add(new)
    step(sched)
    assert old.prefix.pages == old_pages and new.prefix is not old.prefix
    assert not set(new.prefix.pages) & set(old_pages)
    check_pool(sched)


def test_admission_counts_pages_needed_now_plus_a_reserve():
    # The same text four times: with prefix caching the others would wait to read the first one's pages.
    sched = Scheduler(SchedulerConfig(kv_pages=9, max_running=8, prefix_caching=False))
    seqs = [request(3 * PAGE_SIZE, max_new=5 * PAGE_SIZE) for _ in range(4)]  # 3 pages now each; 8 by the end
    for s in seqs:
        sched.add(s)
    assert all(sched.fits_alone(s) for s in seqs)
    # 3 + 3 fit (the old rule, which counted each request's maximum, admitted one); a third needs
    # 3 more + the 1-page reserve > the 3 left
    assert sched.schedule().admitted == seqs[:2]


@pytest.mark.parametrize("caching", [False, True])
def test_a_full_pool_preempts_the_newest_and_it_resumes_by_recomputing(caching):
    """Without prefix caching a resumed request recomputes all it had; with it, what is still cached is read."""
    sched = Scheduler(SchedulerConfig(kv_pages=6, max_running=4, prefix_caching=caching))
    old, new = request(PAGE_SIZE, max_new=3 * PAGE_SIZE), request(PAGE_SIZE, max_new=3 * PAGE_SIZE)
    sched.add(old)
    sched.add(new)
    preempted = []
    read_on_resume = 0
    tokens = iter(range(100, 10_000))
    while sched.has_work():
        scheduled = sched.schedule()
        preempted += scheduled.preempted
        for s, n in scheduled.batch:
            if s in preempted and s in scheduled.admitted:  # resumed: it recomputes what it had (or is not cached)
                assert n == s.num_uncached and (s.num_cached == 0 if not caching else s.num_cached % PAGE_SIZE == 0)
                read_on_resume = max(read_on_resume, s.num_cached)
        check_pool(sched)
        sampling = [s for s, n in scheduled.batch if s.samples_after(n)]
        sched.postprocess(sampled(scheduled.batch, [next(tokens) for _ in sampling]))
    assert preempted and set(preempted) == {new}  # never the oldest
    assert sched.preemptions == len(preempted) == new.preemptions
    for s in (old, new):
        assert s.finish_reason == "length" and len(s.output_ids) == 3 * PAGE_SIZE
        streamed = [t for item in s.output if isinstance(item, TokenDelta) for t in item.token_ids]
        assert streamed == s.output_ids  # nothing sent twice
    pool = sched.kv.pool
    assert pool.free + pool.idle_cached == pool.total and (pool.idle_cached > 0) == caching
    assert (read_on_resume > PAGE_SIZE) == caching  # with caching, a resumed request read pages of its own answer


@pytest.mark.parametrize("seed", range(6))
def test_random_load_on_a_small_pool_never_deadlocks_or_leaks(seed):
    rng = random.Random(seed)
    pool_pages = rng.randint(8, 24)
    sched = Scheduler(SchedulerConfig(kv_pages=pool_pages, max_running=rng.randint(1, 8),
                                      max_tokens_per_step=rng.choice([8, 32, 64]),
                                      prefix_cache_pages=rng.randint(0, 6)))
    prompts = [task_prompt(f"t{i}", rng.randint(1, 40)) for i in range(4)] + [None]
    seqs = []
    for _ in range(rng.randint(5, 20)):
        s = request(rng.randint(1, 50), max_new=rng.randint(1, 60), prompt=rng.choice(prompts))
        if sched.fits_alone(s):  # the engine refuses the others at submission
            seqs.append(s)
            sched.add(s)
    for _ in range(20_000):
        if not sched.has_work():
            break
        step(sched)
        check_pool(sched)
    assert not sched.has_work(), "the pool deadlocked"
    assert all(s.status is Status.FINISHED and len(s.output_ids) == s.params.max_new_tokens for s in seqs)
    stats = sched.kv.pool.stats()
    # Left held: idle task prefixes within their cap, and full pages the prefix cache keeps (nobody holds them).
    assert stats.pages_used - stats.pages_cached_idle == stats.pages_shared <= max(sched.config.prefix_cache_pages, 0)
    assert stats.pages_cached == stats.pages_cached_idle


def test_a_new_soft_prompts_virtual_tokens_count_in_the_step_budget():
    sched = Scheduler(SchedulerConfig(kv_pages=100, max_running=8, max_tokens_per_step=64))
    running = request(3, max_new=50)
    sched.add(running)
    step(sched)  # now decoding
    soft = request(5, prompt=task_prompt("soft", 40))
    later = request(10, prompt=task_prompt("later", 30))  # more virtual tokens than the step has left
    for s in (soft, later):
        sched.add(s)
    scheduled = sched.schedule()
    computed = sum(e.positions for e in scheduled.new_prefixes)
    assert sum(n for _, n in scheduled.batch) + computed == 1 + 5 + 40 <= 64
    assert scheduled.admitted == [soft] and later.status is Status.WAITING  # it goes in the next step
    assert sched.schedule().admitted == [later]
    huge = request(3, prompt=task_prompt("huge", 70))  # no step could hold it beside the decodes: it goes over
    sched.add(huge)
    assert huge in sched.schedule().admitted
    prefix_table = request(100, prompt=task_prompt("table", 40, kind="prefix"))  # written, not computed: free
    sched2 = Scheduler(SchedulerConfig(kv_pages=100, max_running=8, max_tokens_per_step=64))
    sched2.add(prefix_table)
    assert sched2.schedule().batch == [(prefix_table, 64)]


def test_a_scoring_request_is_admitted_only_when_its_choices_pages_fit_too():
    """Its text alone would fit, but not with its choices' pages: it waits, rather than being admitted and
    preempting itself at its choices' step, again every step."""
    sched = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=64, kv_pages=12, prefix_cache_pages=0))
    older = request(60, max_new=40)
    sched.add(older)
    for _ in range(3):
        step(sched)
    scoring = request(10)
    scoring.scoring = ChoiceScoring((("a long choice", tuple(range(2, 2 + 8 * PAGE_SIZE))),))  # 8 pages of choices
    sched.add(scoring)
    for _ in range(5):
        scheduled = sched.schedule()
        assert scoring not in [s for s, _ in scheduled.batch] and scoring.status is Status.WAITING
        sampling = [s for s, n in scheduled.batch if s.samples_after(n)]
        sched.postprocess(sampled(scheduled.batch, [7] * len(sampling)))
    assert sched.preemptions == 0
    sched.end(older, lambda: None)
    assert scoring in [s for s, _ in sched.schedule().batch]  # room now: text and choices fit
    check_pool(sched)



def test_idle_cached_pages_stay_until_the_pool_needs_them():
    """Free pages go first; idle cached pages only when none is left, least recently used first (a chain's tail
    before its head); a cached page someone reads is never taken."""
    pool = PagePool(total_pages=6, idle_prefix_pages=0)
    held = pool.allocate(3)
    assert held == [1, 2, 3]
    for page, digest in ((1, b"a"), (2, b"b"), (3, b"c")):
        pool.register(page, digest)
    pool.release(held)  # released tail first: 3 is the oldest idle page, 1 the newest
    pool.share([1])  # a new request reads the head
    assert pool.idle_cached == 2 and pool.available() == 5
    assert pool.allocate(3) == [4, 5, 6]  # the free ones first: the cache keeps all three
    assert pool.cached_pages([b"a", b"b", b"c"]) == [1, 2, 3]
    assert pool.allocate(1) == [3]  # none free: the oldest idle cached page, the chain's tail
    assert pool.cached_pages([b"a", b"b", b"c"]) == [1, 2]
    assert pool.allocate(2) is None  # page 1 is read: never taken
