"""Every per-request KV page verb, in one place (vLLM's KVCacheManager, nano-vllm's BlockManager). No torch.

The scheduler decides who runs and who gives way; this module decides what pages that takes: what the prefix
cache holds for a request, whether it can be admitted now, admitting it (its cached leading pages, its task
prefix, its first text pages), growing it, registering the pages it filled for the requests after it, and
freeing everything it holds. A scoring request's choice pages and the shared task prefixes go through here
too. The pool itself (pages.py) only counts pages; the runner (torch) stores what they hold.

Prefix caching: a request's full pages are named by a hash chain over its task prefix's content key and its
tokens (`prefix_key`, pages.chain_digests); a request is admitted with every leading full page already
computed for them, and computes the rest (at least its last token: its logits pick what follows).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from server.engine.pages import PAGE_SIZE, PagePool, PoolStats, SharedPrefix, chain_digests, pages_for
from server.engine.sequence import Sequence


def prefix_key(seq: Sequence) -> Hashable | None:
    """What a task prefix's pages are shared under: the prompt weights' content, not the version, so a
    change of metadata alone recomputes nothing. Soft prompts of every kind give the same keys for the
    same embeddings; a prefix table means something else."""
    prompt = seq.prompt
    if prompt is None:
        return None
    meaning = "prefix" if prompt.kind == "prefix" else "embeddings"
    return (meaning, prompt.sha256, tuple(prompt.embeddings.shape))


@dataclass(frozen=True, slots=True)
class StoragePlan:
    """What the runner's storage must do before a step: hold pages below `extent`, zero the `fresh` ones (they
    may hold what their last owner left); `idle`: nothing runs, give back what no page uses."""

    extent: int
    fresh: list[int]
    idle: bool = False


class KVManager:
    def __init__(self, kv_pages: int, prefix_cache_pages: int, prefix_caching: bool) -> None:
        self.pool = PagePool(kv_pages, prefix_cache_pages)
        self.total = kv_pages
        self.prefix_caching = prefix_caching
        # Pages kept free for running requests to grow into before another is admitted (about 1%).
        self.reserve = max(1, kv_pages // 100)
        self.cache_queries = 0  # text tokens looked up in the prefix cache at admission
        self.cache_hits = 0  # of those, the tokens found computed already

    def forget_history(self) -> None:
        """Counts from zero and no idle cached page: after the compiled step's warm-up, whose texts are nobody's."""
        self.cache_queries = self.cache_hits = 0
        self.pool.evict_idle_cached()

    # -- what the prefix cache holds for a request ------------------------------------------------

    def reads_cache(self, seq: Sequence) -> bool:
        """Prefix caching is on, and `seq` may skip positions (not when it scores its prompt tokens: it needs
        every position's logits)."""
        return self.prefix_caching and not seq.params.prompt_logprobs

    def cached_pages(self, seq: Sequence) -> list[int]:
        """The leading pages of `seq`'s tokens that are cached (not yet shared with it). At least its last token
        is left to compute: its logits pick what follows."""
        if not self.reads_cache(seq):
            return []
        usable = (seq.num_tokens - 1) // PAGE_SIZE
        if not usable:
            return []
        return self.pool.cached_pages(chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, usable)[:usable])

    def pages_in_flight(self, running: Iterable[Sequence]) -> set[bytes]:
        """The digests of the full pages running requests are computing and have not yet cached."""
        out: set[bytes] = set()
        for seq in running:
            full = seq.num_tokens // PAGE_SIZE
            if full > seq.pages_registered:
                out.update(chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, full)[seq.pages_registered:])
        return out

    def next_page_in_flight(self, seq: Sequence, cached: int, in_flight: set[bytes]) -> bool:
        """Whether the first page `seq` would compute (after its `cached` ones) is one a running request is
        computing now: it had better wait and read it."""
        if not in_flight or not self.reads_cache(seq) or cached >= (seq.num_tokens - 1) // PAGE_SIZE:
            return False
        return chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, cached + 1)[cached] in in_flight

    # -- admission ---------------------------------------------------------------------------------

    def fits_alone(self, seq: Sequence) -> bool:
        """Whether `seq` could ever finish: with no one else running, all its pages fit the pool."""
        return seq.pages_needed() <= self.total

    def can_admit(self, seq: Sequence, cached: list[int], others_running: bool) -> bool:
        """Whether the pages `seq` needs now (its text's, less the cached ones, its task prefix unless shared,
        its choices') fit, with a reserve for the running requests to grow into."""
        key = prefix_key(seq)
        need = (pages_for(seq.num_tokens) - len(cached) + self.pool.share_cost(cached)
                + (self.pool.prefix_cost(key, seq.num_virtual) if key is not None else 0))
        if seq.scoring is not None:  # its choices' pages too: else it would preempt itself at its choices' step
            need += seq.scoring.pages_needed()
        reserve = self.reserve if others_running else 0  # alone it needs no room to spare: it fits alone
        return need + reserve <= self.pool.available()

    def computes_prefix(self, seq: Sequence) -> bool:
        """Whether admitting `seq` now starts a soft prompt's prefix (computed in the step's own pass)."""
        key = prefix_key(seq)
        return (key is not None and seq.prompt is not None and seq.prompt.kind != "prefix"
                and key not in self.pool.prefixes)

    def admit(self, seq: Sequence, cached: list[int], n: int) -> SharedPrefix | None:
        """Give `seq` its cached leading pages (computed already), its task prefix and the pages for its first
        `n` tokens to compute; return its prefix when that is still to be computed (checked by `can_admit`)."""
        assert not seq.pages and seq.num_cached == 0, "a waiting request holds no pages"
        if self.reads_cache(seq):
            self.cache_queries += seq.num_tokens
            self.cache_hits += len(cached) * PAGE_SIZE
        if not seq.preemptions:  # what its usage reports: its text's tokens it did not compute
            seq.cached_tokens = min(len(cached) * PAGE_SIZE, len(seq.prompt_ids))
        self.pool.share(cached)  # before anything is allocated: that could evict them
        seq.pages.extend(cached)
        seq.pages_registered = len(cached)
        seq.num_cached = len(cached) * PAGE_SIZE
        new_prefix = None
        key = prefix_key(seq)
        if key is not None:
            entry = self.pool.acquire_prefix(key, seq.num_virtual, seq.prompt)
            assert entry is not None, "admission counted the prefix's pages"
            seq.prefix = entry
            new_prefix = None if entry.ready else entry
        pages = self.pool.allocate(pages_for(seq.num_cached + n) - len(seq.pages))
        assert pages is not None, "admission counted the text's pages"
        seq.pages.extend(pages)
        return new_prefix

    # -- running -----------------------------------------------------------------------------------

    def grow(self, seq: Sequence, n: int) -> bool:
        """The pages for `n` more tokens of `seq`; False (nothing taken) when the pool is short."""
        pages = self.pool.allocate(max(pages_for(seq.num_cached + n) - len(seq.pages), 0))
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def grow_choices(self, seq: Sequence) -> bool:
        """A scoring request's choice pages (each choice its own, after the text's); False when short."""
        assert seq.scoring is not None
        pages = self.pool.allocate(seq.scoring.pages_needed())
        if pages is None:
            return False
        seq.scoring.take_pages(pages)
        return True

    def register_full_pages(self, seq: Sequence) -> None:
        """Cache the pages `seq` filled: every one of its positions there is computed, and none is written again."""
        full = seq.num_cached // PAGE_SIZE
        if not self.prefix_caching or full <= seq.pages_registered:
            return
        digests = chain_digests(prefix_key(seq), seq.all_ids, seq.page_digests, full)
        for j in range(seq.pages_registered, full):
            self.pool.register(seq.pages[j], digests[j])
        seq.pages_registered = full

    def free(self, seq: Sequence) -> None:
        """Everything `seq` holds goes back: its pages (cached ones stay cached), its choices', its prefix."""
        self.pool.release(seq.pages)
        if seq.scoring is not None:
            seq.scoring.release(self.pool)
        if seq.prefix is not None:
            self.pool.release_prefix(seq.prefix)
            seq.prefix = None

    def forget_prefix(self, entry: SharedPrefix) -> None:
        """A prefix could not be computed: hand it to no one else (its users fail on their own)."""
        self.pool.forget(entry)

    # -- the runner's storage -------------------------------------------------------------------------

    def storage_plan(self) -> StoragePlan:
        """What the storage needs for the step about to run."""
        return StoragePlan(self.pool.high_water, self.pool.take_fresh())

    def idle_storage_plan(self) -> StoragePlan:
        """Nothing runs: the storage may give back what lies beyond the pages still held (cached ones)."""
        return StoragePlan(self.pool.used_extent(), [], idle=True)

    def stats(self) -> PoolStats:
        return self.pool.stats()
