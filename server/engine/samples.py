"""n samples of one request's text, as one object: what the engine hands back for a request, its capacity
rule, its usage and its regrouping at the edge.

The first sample computes the text; the others wait (`Sequence.after`, the scheduler's `held`) until it has,
then go first in line and read its full pages from the prefix cache, computing only the text's last page and
their own tokens. The handles come in sample order; a caller that submits several requests gets one group each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Sequence as TypingSequence
from typing import TypeVar, overload

from server.engine.errors import InvalidParameter
from server.engine.handle import RequestHandle
from server.engine.results import Usage
from server.engine.sequence import MAX_SAMPLES

T = TypeVar("T")


class SampleGroup(TypingSequence[RequestHandle]):
    """The handles of one request's samples, in sample order (sample i is handle i)."""

    def __init__(self, handles: Iterable[RequestHandle]) -> None:
        self.handles = tuple(handles)

    @overload
    def __getitem__(self, i: int) -> RequestHandle: ...
    @overload
    def __getitem__(self, i: slice) -> TypingSequence[RequestHandle]: ...
    def __getitem__(self, i: int | slice) -> RequestHandle | TypingSequence[RequestHandle]:
        return self.handles[i]

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[RequestHandle]:
        return iter(self.handles)

    # -- the rules, written once -------------------------------------------------------------------

    @staticmethod
    def check_n(n: object) -> int:
        """A request's n: an integer in [1, MAX_SAMPLES]."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
            raise InvalidParameter("n", f"an integer in [1, {MAX_SAMPLES}]", n)
        return n

    @staticmethod
    def check_fits(samples: int, capacity: int, *, entries: int = 1) -> None:
        """Samples submitted together (one request's n, or a batch's entries' together) must all be able to be in
        flight at once: more than the engine could ever hold is a 422 naming n, not a 503 no retry can pass.
        A batch of `entries` single requests is the batch's own limit's to refuse."""
        if samples > max(entries, capacity):
            over = "a request's entries" if entries > 1 else "one request"
            raise InvalidParameter("n", f"at most {capacity} samples over {over} (--max-running + --max-queue)",
                                   samples)

    @staticmethod
    def usage(completions: TypingSequence[Usage]) -> Usage:
        """One text's samples' usage: its prompt and virtual tokens once (they share its pages), every sample's
        generated tokens."""
        first = completions[0]
        return Usage(first.prompt_tokens, first.virtual_tokens, sum(u.completion_tokens for u in completions),
                     first.cached_tokens)


def flatten(groups: Iterable[SampleGroup]) -> list[RequestHandle]:
    """Every group's handles, request-major and sample-minor."""
    return [handle for group in groups for handle in group]


def owners(groups: Iterable[SampleGroup]) -> list[int]:
    """The request (its index among `groups`) each handle of `flatten(groups)` belongs to."""
    return [i for i, group in enumerate(groups) for _ in group]


def regroup(items: TypingSequence[T], groups: Iterable[SampleGroup]) -> list[list[T]]:
    """Items in `flatten(groups)`'s order (results, say) as one list per request."""
    out, start = [], 0
    for group in groups:
        out.append(list(items[start:start + len(group)]))
        start += len(group)
    return out
