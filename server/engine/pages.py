"""Which KV pages are free, which a request holds, and which task prefixes are shared. No torch here.

KV memory is one pool of fixed-size pages (PAGE_SIZE positions each, every layer's keys and values).
A request holds the pages its text and generated tokens fill, taken one at a time as it grows and all
given back when it ends. A task's prefix (its virtual tokens' keys and values) lives in pages of its
own, shared read-only by every running request of that task and keyed by the prompt weights' content:
a new upload with the same weights reuses them, new weights get new pages, and pages a request reads
never change under it.

A prefix nobody uses stays cached (least recently used first out) while the idle prefixes fit their
cap (--prompt-cache-bytes); the pool takes idle prefix pages back whenever it runs short. The runner
(torch) stores the pages' contents; this module only decides who holds which page.

Automatic prefix caching: a request's full pages (PAGE_SIZE text or generated tokens each) are named
by a hash chain (`chain_digests`): each page's digest covers the one before it, so it names the task
prefix (its content key, or none) and every token up to the page's end. A page whose keys and values
are all computed is registered under its digest; a later request whose leading pages have the same
digests reads them instead of computing them. A page has a reference count: it is shared read-only
while several requests hold it, and nobody writes a full page again. A registered page nobody holds
stays cached until the pool needs it (least recently used first out).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.errors import check_int

PAGE_SIZE = 16  # positions per page: small enough to waste little, large enough to copy in blocks


def pages_for(positions: int) -> int:
    return -(-positions // PAGE_SIZE)


def chain_digests(root: Hashable, token_ids: Sequence[int], digests: list[bytes], pages: int) -> list[bytes]:
    """Extend `digests` (those of the first pages, computed before) to the first `pages` full pages of
    `token_ids`: each is blake2b over the previous digest (or `root`'s repr) and the page's token ids."""
    while len(digests) < pages:
        j = len(digests)
        h = hashlib.blake2b(digests[-1] if digests else repr(root).encode(), digest_size=16)
        h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids[j * PAGE_SIZE:(j + 1) * PAGE_SIZE]))
        digests.append(h.digest())
    return digests


def row_list(pages: list[int], first: int, n: int) -> list[int]:
    """KV rows (page * PAGE_SIZE + offset) of positions first..first+n-1 counted from the start of `pages`."""
    return [pages[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(first, first + n)]


@dataclass(eq=False, slots=True)
class SharedPrefix:
    """One task prefix in the pool: `positions` virtual tokens in `pages`, read by `users` requests."""

    key: Hashable
    positions: int
    pages: list[int]
    users: int = 0
    ready: bool = False  # its keys and values are computed (the runner does it before the first read)
    source: Any = field(default=None, repr=False)  # the prompt snapshot to compute it from, until ready


@dataclass(frozen=True, slots=True)
class PoolStats:
    pages_total: int
    pages_used: int  # held by requests or by prefixes (idle cached prefixes and idle cached pages included)
    pages_shared: int  # held by task prefixes
    prefix_entries: int
    prefix_hits: int
    prefix_misses: int
    pages_cached: int  # full pages registered for prefix caching (held or idle)
    pages_cached_idle: int  # of those, the ones no request holds (the pool takes them back when short)


NULL_PAGE = 0  # never handed out and always zero: what a padded read points at


class PagePool:
    """Pages 1..total are handed out; page 0 is the null page (the storage holds total + 1)."""

    def __init__(self, total_pages: int, idle_prefix_pages: int) -> None:
        check_int("kv_pages", total_pages, low=1)
        self.total = total_pages
        self.idle_prefix_cap = idle_prefix_pages
        self._free = list(range(1, total_pages + 1))  # a min-heap: low pages first, so the used range stays short
        self._refs = [0] * (total_pages + 1)  # holders of each page (requests sharing a cached page, or one owner)
        # Prefix caching: full pages by digest, and back; the registered pages nobody holds, oldest first.
        self._cached: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        self._idle_cached: OrderedDict[int, None] = OrderedDict()
        # Handed out since the runner last cleared them: a page may hold what its last owner left (even
        # NaN after an overflow), and masked rows read it with weight 0, where 0 x NaN is NaN.
        self.fresh: list[int] = []
        self.high_water = 0  # one past the highest page ever handed out since the last shrink
        self.prefixes: dict[Hashable, SharedPrefix] = {}
        self._idle: OrderedDict[Hashable, SharedPrefix] = OrderedDict()  # users == 0, oldest first
        self._idle_pages = 0
        self._shared_pages = 0  # held by prefixes, counted as they come and go (stats() runs on other threads)
        self.hits = 0
        self.misses = 0

    # -- plain pages ---------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return len(self._free)

    def available(self) -> int:
        """Pages a request could get now: the free ones, idle cached pages and those of idle cached prefixes."""
        return len(self._free) + len(self._idle_cached) + self._idle_pages

    def allocate(self, n: int) -> list[int] | None:
        """`n` pages, evicting idle cached pages, then idle prefixes, if needed; None (and nothing taken) if
        they are not there."""
        if n > self.available():
            return None
        while len(self._free) < n:
            if self._idle_cached:
                self._evict_cached(next(iter(self._idle_cached)))
            else:
                self._evict_oldest_idle()
        pages = [heapq.heappop(self._free) for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        self.fresh.extend(pages)
        if pages:
            self.high_water = max(self.high_water, max(pages) + 1)
        return pages

    def release(self, pages: list[int]) -> None:
        """One holder fewer for each page: a page nobody holds is free again, or idle if it is cached. Released
        last page first: a chain's tail is evicted before its head, which the most requests can read."""
        for p in reversed(pages):
            assert self._refs[p] > 0, f"page {p} released twice"
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            if p in self._digest_of:
                self._idle_cached[p] = None  # the newest idle: evicted last
            else:
                heapq.heappush(self._free, p)
        pages.clear()

    # -- prefix caching ------------------------------------------------------------------------

    def cached_pages(self, digests: Sequence[bytes]) -> list[int]:
        """The registered pages of the leading `digests`, up to the first that is not cached."""
        pages = []
        for digest in digests:
            page = self._cached.get(digest)
            if page is None:
                break
            pages.append(page)
        return pages

    def share_cost(self, pages: Sequence[int]) -> int:
        """Pages that `share(pages)` takes out of `available()`: the idle ones stop being evictable."""
        return sum(1 for p in pages if self._refs[p] == 0)

    def share(self, pages: Sequence[int]) -> None:
        """One holder more for each cached page."""
        for p in pages:
            assert p in self._digest_of, f"page {p} is not cached"
            if self._refs[p] == 0:
                del self._idle_cached[p]
            self._refs[p] += 1

    def register(self, page: int, digest: bytes) -> None:
        """Cache a held page whose keys and values are all computed under `digest`, unless another page was
        registered under it first: that one stays, and this one stays its holder's alone."""
        assert self._refs[page] > 0, f"page {page} is not held"
        if self._cached.setdefault(digest, page) == page:
            self._digest_of[page] = digest

    def holders(self, page: int) -> int:
        return self._refs[page]

    def is_cached(self, page: int) -> bool:
        return page in self._digest_of

    @property
    def idle_cached(self) -> int:
        """Cached pages nobody holds."""
        return len(self._idle_cached)

    def evict_idle_cached(self) -> None:
        """Evict every cached page nobody holds."""
        while self._idle_cached:
            self._evict_cached(next(iter(self._idle_cached)))

    def _evict_cached(self, page: int) -> None:
        del self._idle_cached[page]
        del self._cached[self._digest_of.pop(page)]
        heapq.heappush(self._free, page)

    def take_fresh(self) -> list[int]:
        """The pages handed out since the last call (some may be free again: clearing those is harmless)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def used_extent(self) -> int:
        """One past the highest page in use now (the runner may shrink its storage to this)."""
        top = self.high_water
        # A cached page nobody holds keeps what it holds. The null page is never in use: nothing held gives 0.
        while top and not self._refs[top - 1] and (top - 1) not in self._digest_of:
            top -= 1
        self.high_water = top
        return top

    # -- shared task prefixes ------------------------------------------------------------------

    def prefix_cost(self, key: Hashable, positions: int) -> int:
        """Pages that `acquire_prefix(key, positions)` takes out of `available()`."""
        entry = self.prefixes.get(key)
        if entry is None:
            return pages_for(positions)
        return len(entry.pages) if entry.users == 0 else 0  # an idle entry stops being evictable

    def acquire_prefix(self, key: Hashable, positions: int, source: Any) -> SharedPrefix | None:
        """The shared prefix for `key`, one more user counted; a new entry (not ready) when absent.
        None when the pages for a new one are not available."""
        entry = self.prefixes.get(key)
        if entry is None:
            pages = self.allocate(pages_for(positions))
            if pages is None:
                return None
            self.misses += 1
            entry = SharedPrefix(key, positions, pages, source=source)
            self.prefixes[key] = entry
            self._shared_pages += len(pages)
        else:
            self.hits += 1
            if entry.users == 0:
                del self._idle[key]
                self._idle_pages -= len(entry.pages)
        entry.users += 1
        return entry

    def release_prefix(self, entry: SharedPrefix) -> None:
        """One user fewer; an unused prefix is kept for the next request while idle ones fit their cap."""
        assert entry.users > 0, "prefix released more often than acquired"
        entry.users -= 1
        if entry.users:
            return
        if not entry.ready or self.prefixes.get(entry.key) is not entry:  # never computed, or forgotten
            self._drop(entry)
            return
        self._idle[entry.key] = entry
        self._idle_pages += len(entry.pages)
        while self._idle_pages > self.idle_prefix_cap:
            self._evict_oldest_idle()

    def forget(self, entry: SharedPrefix) -> None:
        """Stop handing `entry` out (its computation failed); its pages go back when its last user leaves."""
        if self.prefixes.get(entry.key) is entry:
            del self.prefixes[entry.key]
        if entry.users == 0 and entry.key in self._idle and self._idle[entry.key] is entry:
            del self._idle[entry.key]
            self._idle_pages -= len(entry.pages)
            self._shared_pages -= len(entry.pages)
            self.release(entry.pages)

    def _evict_oldest_idle(self) -> None:
        _, entry = self._idle.popitem(last=False)
        self._idle_pages -= len(entry.pages)
        self._drop(entry)

    def _drop(self, entry: SharedPrefix) -> None:
        if self.prefixes.get(entry.key) is entry:
            del self.prefixes[entry.key]
        entry.source = None
        self._shared_pages -= len(entry.pages)
        self.release(entry.pages)

    def stats(self) -> PoolStats:
        return PoolStats(self.total, self.total - len(self._free), self._shared_pages, len(self.prefixes),
                         self.hits, self.misses, len(self._digest_of), len(self._idle_cached))
