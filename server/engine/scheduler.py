"""Which requests run in the next step, what KV pages they hold, and what their results do to them.
Plain Python, no torch.

`schedule()`, every step, in this order: each running request that decodes gets its one token;
running requests still prefilling continue with a chunk; then waiting requests are admitted while a
running place, KV pages (see `pages`) and the step's token budget allow: first come, first served, except
that a request with more pages in the prefix cache may go first, and one whose next page a running
request is computing waits to read it (`_next_to_admit`, bounded so that nobody waits forever).
A long prompt is thus prefilled in chunks beside the decodes and never stalls them for more than one
step's budget.

Memory follows use: a request gets the pages its tokens of this step fill, no more. Admission counts
the pages a request needs now (its task prefix unless it is shared already, its text) plus a small
reserve for the running ones to grow. When a running request cannot grow because the pool ran out,
the newest running request is preempted: its pages go back and it waits at the front of the queue to
be recomputed (pages.py, Sequence). Every request fits alone (`fits_alone` is checked at
submission), so the pool can never deadlock.

Prefix caching (pages.py): a request is admitted with every leading full page already computed for its
task prefix and tokens (its own first pages then are shared ones), and computes only the rest; after
each step, the pages it filled are registered for the requests after it. A preempted request finds its
own pages again this way, when nobody needed them meanwhile.

`postprocess()`, after the step ran, takes one `StepResult` per request: each request's cache
advances by the tokens computed, the sampled tokens are appended, and requests that hit a stop, the
end of sequence or their length (or scored every choice) finish.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial

from server.engine.errors import EngineError, InvalidConfig, check_int
from server.engine.pages import PAGE_SIZE, PagePool, SharedPrefix, chain_digests, pages_for
from server.engine.results import TokenLogprob
from server.engine.sequence import Sequence, Status

# How far down the queue admission looks for cached requests (beyond it, first come, first served).
CACHE_AWARE_WINDOW = 128

Batch = list[tuple[Sequence, int]]  # (request, tokens computed for it in this step)


@dataclass(slots=True)
class StepResult:
    """What one step did for one request (logits.py fills it from the step's logits rows)."""

    seq: Sequence
    n: int  # tokens computed for it
    token: int | None = None  # the token it picked, if it reached its next one
    logprob: TokenLogprob | None = None  # that token's, when asked
    scored: bool = False  # a scoring request scored its last choice
    error: EngineError | None = None  # reading its rows failed: it ends with this error, the others go on


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int = 64
    max_tokens_per_step: int = 512
    kv_pages: int = 1 << 16  # pages in the KV pool (PAGE_SIZE positions each, all layers counted)
    prefix_cache_pages: int = 1 << 12  # pages idle task prefixes may keep
    prefix_caching: bool = True  # reuse the full pages other requests computed for the same prefix and tokens

    def __post_init__(self) -> None:
        for name in ("max_running", "max_tokens_per_step", "kv_pages"):
            check_int(name, getattr(self, name), low=1)
        check_int("prefix_cache_pages", self.prefix_cache_pages, low=0)
        if not isinstance(self.prefix_caching, bool):
            raise InvalidConfig("prefix_caching", "a boolean", self.prefix_caching)
        if self.max_tokens_per_step < self.max_running:
            raise InvalidConfig("max_tokens_per_step", f"an integer >= max_running ({self.max_running}) so that "
                                "every running request can decode in each step", self.max_tokens_per_step)


@dataclass(slots=True)
class ScheduledStep:
    batch: Batch = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # newly running this step
    new_prefixes: list[SharedPrefix] = field(default_factory=list)  # to compute before the step runs
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.batch)


def prefix_key(seq: Sequence) -> Hashable | None:
    """What a task prefix's pages are shared under: the prompt weights' content, not the version, so a
    change of metadata alone recomputes nothing. Soft prompts of every kind give the same keys for the
    same embeddings; a prefix table means something else."""
    prompt = seq.prompt
    if prompt is None:
        return None
    meaning = "prefix" if prompt.kind == "prefix" else "embeddings"
    return (meaning, prompt.sha256, tuple(prompt.embeddings.shape))


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.pool = PagePool(config.kv_pages, config.prefix_cache_pages)
        # Pages kept free for running requests to grow into before another is admitted (about 1%).
        self.reserve = max(1, config.kv_pages // 100)
        self.eos_ids = eos_ids  # a generated token in here ends its request (unless it ignores EOS)
        self.waiting: deque[Sequence] = deque()
        self.held: list[Sequence] = []  # samples waiting for their first sample's text (Sequence.after)
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.preemptions = 0
        self.peak_running = 0
        self.cache_queries = 0  # text tokens looked up in the prefix cache at admission
        self.cache_hits = 0  # of those, the tokens found computed already

    def fits_alone(self, seq: Sequence) -> bool:
        """Whether `seq` could ever finish: with no one else running, all its pages fit the pool."""
        return seq.pages_needed() <= self.config.kv_pages

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        (self.held if seq.after is not None else self.waiting).append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    def _release_held(self) -> None:
        """Samples whose first sample computed the text go first in line: they read its pages, computing only
        the text's last page (each its own, from there on: copy-on-write at the first page they differ)."""
        ready = [seq for seq in self.held if seq.after is not None and seq.after.text_computed]
        for seq in reversed(ready):
            self.held.remove(seq)
            seq.after = None  # holds the first sample no longer
            self.waiting.appendleft(seq)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._release_held()
        budget = self.config.max_tokens_per_step
        for decoding in (True, False):  # decodes first: they are cheap and latency-bound
            for seq in list(self.running):
                if seq.status is Status.RUNNING and seq.scoring is not None and seq.scoring.due:
                    if decoding:
                        continue  # with the prefills
                    n = seq.scoring.tokens
                    if self._waits_for_room(n, budget, step) or not self._grow_choices(seq, step):
                        continue
                    step.batch.append((seq, n))
                    budget -= n
                    continue
                if seq.status is not Status.RUNNING or seq.in_prefill == decoding:
                    continue  # preempted meanwhile, or not this pass's kind
                n = 1 if decoding else min(seq.num_uncached, budget)
                if n <= 0 or not self._grow(seq, n, step):
                    continue
                step.batch.append((seq, n))
                budget -= n
        budget = self.config.max_tokens_per_step - sum(n for _, n in step.batch)
        cached_counts: dict[int, int] = {}  # this step's look at the waiting requests' cached pages
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            chosen = self._next_to_admit(cached_counts)
            if chosen is None:
                break  # the next pages are being computed: reading them beats computing them twice
            seq, key, cached = chosen
            if not self._can_admit(seq, key, cached):
                break  # wait for memory rather than let smaller requests overtake it
            # A soft prompt first used now has its virtual tokens computed in this step's pass: they count.
            prefix_tokens = seq.num_virtual if self._computes_prefix(seq, key) else 0
            if self._waits_for_room(prefix_tokens, budget - 1, step):
                break  # a later step has room for the prefix and at least one text token
            self._start_from_cache(seq, cached)  # before anything is allocated: that could evict them
            n = min(seq.num_uncached, max(1, budget - prefix_tokens))
            budget -= prefix_tokens
            if key is not None:
                entry = self.pool.acquire_prefix(key, seq.num_virtual, seq.prompt)
                assert entry is not None, "admission counted the prefix's pages"
                seq.prefix = entry
                if not entry.ready and entry not in step.new_prefixes:
                    step.new_prefixes.append(entry)
            pages = self.pool.allocate(pages_for(seq.num_cached + n) - len(seq.pages))
            assert pages is not None, "admission counted the text's pages"
            seq.pages.extend(pages)
            self._take_waiting(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            step.batch.append((seq, n))
            budget -= n
        self.peak_running = max(self.peak_running, len(self.running))
        return step

    def _next_to_admit(self, cached_counts: dict[int, int]) -> tuple[Sequence, Hashable | None, list[int]] | None:
        """The waiting request to admit next, with its prefix key and cached leading pages; None when each one
        looked at would compute a page a running request is computing now (it waits and reads that page).

        Of the first CACHE_AWARE_WINDOW waiting, the one with the most pages in the prefix cache goes first,
        the earliest on a tie (SGLang's longest-prefix-match order): requests sharing a long instruction with
        one computed already get their first token without waiting behind others' whole prefills. The first
        in line is overtaken at most max_running times, then goes next: nobody waits forever. With nothing
        cached this is first come, first served; with caching off, always. `cached_counts` keeps each request's
        count for the rest of the step (evictions only lower it; the chosen one's pages are looked up again)."""
        head = self.waiting[0]
        if not self.config.prefix_caching:
            return head, prefix_key(head), []
        in_flight = self._pages_in_flight()
        window = (head,) if head.overtaken >= self.config.max_running else itertools.islice(
            self.waiting, CACHE_AWARE_WINDOW)
        best, best_count = None, -1
        for seq in window:
            key = prefix_key(seq)
            count = cached_counts.get(seq.id)
            if count is None:
                count = cached_counts[seq.id] = len(self._cached_pages(seq, key))
            if count > best_count and not self._next_page_in_flight(seq, key, count, in_flight):
                best, best_count = seq, count
        if best is None:
            return None
        key = prefix_key(best)
        return best, key, self._cached_pages(best, key)

    def _pages_in_flight(self) -> set[bytes]:
        """The digests of the full pages running requests are computing and have not yet cached."""
        out: set[bytes] = set()
        for seq in self.running:
            full = seq.num_tokens // PAGE_SIZE
            if full > seq.pages_registered:
                out.update(chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, full)[seq.pages_registered:])
        return out

    def _next_page_in_flight(self, seq: Sequence, key: Hashable | None, cached: int, in_flight: set[bytes]) -> bool:
        """Whether the first page `seq` would compute (after its `cached` ones) is one a running request is
        computing now."""
        if not in_flight or not self._reads_cache(seq) or cached >= (seq.num_tokens - 1) // PAGE_SIZE:
            return False
        return chain_digests(key, seq.all_ids, seq.page_digests, cached + 1)[cached] in in_flight

    def _take_waiting(self, seq: Sequence) -> None:
        """`seq` leaves the queue to run; the first in line counts it if it was overtaken."""
        head = self.waiting.popleft()
        if head is not seq:
            self.waiting.remove(seq)
            self.waiting.appendleft(head)
            head.overtaken += 1

    def _waits_for_room(self, n: int, budget: int, step: ScheduledStep) -> bool:
        """Whether `n` tokens that must go in one step (a new task prefix, the choices' step) wait for a later
        step: when they are over this step's budget and a later one could hold them beside one token of
        every running request. Only what no step could hold goes over the budget."""
        room = self.config.max_tokens_per_step - len(self.running)
        return n > budget and bool(step.batch) and n < room

    def _computes_prefix(self, seq: Sequence, key: Hashable | None) -> bool:
        """Whether admitting `seq` now starts a soft prompt's prefix, computed in this step's pass."""
        return (key is not None and seq.prompt is not None and seq.prompt.kind != "prefix"
                and key not in self.pool.prefixes)

    def _reads_cache(self, seq: Sequence) -> bool:
        """Prefix caching is on, and `seq` may skip positions (not when it scores its prompt tokens: it needs
        every position's logits)."""
        return self.config.prefix_caching and not seq.params.prompt_logprobs

    def _cached_pages(self, seq: Sequence, key: Hashable | None) -> list[int]:
        """The leading pages of `seq`'s tokens that are cached (not yet shared with it). At least its last token
        is left to compute: its logits pick what follows. A request scoring its prompt tokens computes them all."""
        if not self._reads_cache(seq):
            return []
        usable = (seq.num_tokens - 1) // PAGE_SIZE
        if not usable:
            return []
        return self.pool.cached_pages(chain_digests(key, seq.all_ids, seq.page_digests, usable)[:usable])

    def _start_from_cache(self, seq: Sequence, cached: list[int]) -> None:
        """Admit `seq` with its cached leading pages as its own first pages, computed already."""
        assert not seq.pages and seq.num_cached == 0, "a waiting request holds no pages"
        if self._reads_cache(seq):
            self.cache_queries += seq.num_tokens
            self.cache_hits += len(cached) * PAGE_SIZE
        self.pool.share(cached)
        seq.pages.extend(cached)
        seq.pages_registered = len(cached)
        seq.num_cached = len(cached) * PAGE_SIZE

    def _register_full_pages(self, seq: Sequence) -> None:
        """Cache the pages `seq` filled: every one of its positions there is computed, and none is written again."""
        full = seq.num_cached // PAGE_SIZE
        if not self.config.prefix_caching or full <= seq.pages_registered:
            return
        digests = chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, full)
        for j in range(seq.pages_registered, full):
            self.pool.register(seq.pages[j], digests[j])
        seq.pages_registered = full

    def _can_admit(self, seq: Sequence, key: Hashable | None, cached: list[int]) -> bool:
        need = (pages_for(seq.num_tokens) - len(cached) + self.pool.share_cost(cached)
                + (self.pool.prefix_cost(key, seq.num_virtual) if key is not None else 0))
        if seq.scoring is not None:  # its choices' pages too: else it would preempt itself at its choices' step
            need += seq.scoring.pages_needed()
        reserve = self.reserve if self.running else 0  # alone it needs no room to spare: it fits alone
        return need + reserve <= self.pool.available()

    def _grow(self, seq: Sequence, n: int, step: ScheduledStep) -> bool:
        """Give `seq` the pages for `n` more tokens. False if it had to give way (see `_allocate`)."""
        pages = self._allocate(seq, pages_for(seq.num_cached + n) - len(seq.pages), step)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def _grow_choices(self, seq: Sequence, step: ScheduledStep) -> bool:
        """Give a scoring request the pages of its choices' tokens (each choice its own, after the text's).
        False if it had to give way (see `_allocate`)."""
        assert seq.scoring is not None
        pages = self._allocate(seq, seq.scoring.pages_needed(), step)
        if pages is None:
            return False
        seq.scoring.take_pages(pages)
        return True

    def _allocate(self, seq: Sequence, n: int, step: ScheduledStep) -> list[int] | None:
        """`n` pages for `seq`, preempting the newest running requests while the pool is short; None if `seq`
        itself was the newest and had to give way."""
        while True:
            pages = self.pool.allocate(max(n, 0))
            if pages is not None:
                return pages
            victim = self.running[-1]
            self.preempt(victim, step)
            if victim is seq:
                return None

    def preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Take `seq`'s pages back and queue it first in line, to be recomputed when memory allows."""
        self.running.remove(seq)
        self._release_pages(seq)
        seq.num_cached = seq.pages_registered = 0
        if seq.scoring is not None:
            seq.scoring.restart()  # it computes its text again, then its choices
        seq.preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
        step.preempted.append(seq)
        step.batch[:] = [(s, n) for s, n in step.batch if s is not seq]
        if seq in step.admitted:
            step.admitted.remove(seq)

    def _release_pages(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        if seq.scoring is not None:
            seq.scoring.release(self.pool)
        if seq.prefix is not None:
            self.pool.release_prefix(seq.prefix)
            seq.prefix = None

    def forget_prefix(self, entry: SharedPrefix) -> None:
        """A prefix could not be computed: hand it to no one else (its users fail on their own)."""
        self.pool.forget(entry)

    def postprocess(self, results: list[StepResult],
                    release: Callable[[Sequence], None] = lambda seq: None) -> list[Sequence]:
        """The step ran: advance caches, append each picked token, finish the requests that are done and
        return them. A finished request's pages are given back, and `release` called, before its caller
        hears the result, so a caller that sees it done never sees its memory still held."""
        for r in results:
            if r.error is None and not r.seq.computes_choices(r.n):  # the choices' tokens are not its own
                r.seq.num_cached += r.n
                self._register_full_pages(r.seq)
        finished = []
        for r in results:
            seq = r.seq
            if r.error is not None:
                self.end(seq, release, partial(seq.fail, r.error))
                finished.append(seq)
            elif r.scored:
                self.end(seq, release, seq.finish_scoring)
                finished.append(seq)
            elif r.token is not None:
                reason = seq.append(r.token, self.eos_ids, r.logprob)
                if reason is not None:
                    self.end(seq, release, partial(seq.finish, reason))
                    finished.append(seq)
        return finished

    def end(self, seq: Sequence, release: Callable[[Sequence], None], announce: Callable[[], None]) -> None:
        """End `seq` in this order, whatever fails: its pages back, `release` (its place), then `announce`
        (its caller hears the result), so a caller that sees it done never sees its memory still held."""
        try:
            self.finish(seq)
        finally:
            try:
                release(seq)
            finally:
                announce()

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it (if any) and give its pages back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.held:
            self.held.remove(seq)
        seq.status = Status.FINISHED
        self._release_pages(seq)
