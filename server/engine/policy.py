"""Which waiting request is admitted next (SGLang's SchedulePolicy). No torch.

Of the first CACHE_AWARE_WINDOW waiting, the one with the most pages in the prefix cache goes first, the
earliest on a tie (SGLang's longest-prefix-match order): requests sharing a long instruction with one
computed already get their first token without waiting behind others' whole prefills. The first in line is
overtaken at most `max_overtaken` times, then goes next: nobody waits forever. A request whose next page a
running request is computing now waits to read it rather than compute it twice. With nothing cached this is
first come, first served; with caching off, always.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as TypingSequence

from server.engine.kv_manager import KVManager
from server.engine.sequence import Sequence

CACHE_AWARE_WINDOW = 128  # how far down the queue admission looks for cached requests


class AdmissionPolicy:
    def __init__(self, kv: KVManager, max_overtaken: int) -> None:
        self.kv = kv
        self.max_overtaken = max_overtaken
        self._counts: dict[int, int] = {}  # this step's look at each waiting request's cached pages

    def new_step(self) -> None:
        """Forget the cached-page counts of the last step (evictions only lower them within one)."""
        self._counts.clear()

    def next(self, waiting: deque[Sequence], running: TypingSequence[Sequence]) -> tuple[Sequence, list[int]] | None:
        """The request to admit next and its cached leading pages; None when each one looked at would compute a
        page a running request is computing now."""
        head = waiting[0]
        if not self.kv.prefix_caching:
            return head, []
        in_flight = self.kv.pages_in_flight(running)
        window = (head,) if head.overtaken >= self.max_overtaken else itertools.islice(waiting, CACHE_AWARE_WINDOW)
        best, best_count = None, -1
        for seq in window:
            count = self._counts.get(seq.id)
            if count is None:
                count = self._counts[seq.id] = len(self.kv.cached_pages(seq))
            if count > best_count and not self.kv.next_page_in_flight(seq, count, in_flight):
                best, best_count = seq, count
        if best is None:
            return None
        return best, self.kv.cached_pages(best)  # looked up again: this step's evictions may have taken some

    @staticmethod
    def take(waiting: deque[Sequence], seq: Sequence) -> None:
        """`seq` leaves the queue to run; the first in line counts it if it was overtaken."""
        head = waiting.popleft()
        if head is not seq:
            waiting.remove(seq)
            waiting.appendleft(head)
            head.overtaken += 1
