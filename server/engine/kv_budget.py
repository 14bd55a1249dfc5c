"""The one rule for how much KV memory running requests take, written once. No torch here.

Every running request holds one KV slot, and every slot spans as many positions as the longest
running request may reach (virtual tokens + text + max_new_tokens), so the memory in use is
`slots x longest`. The scheduler admits by it, the runner sizes the slots by it, and the KV store
keeps its growth within it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.engine.errors import check_int
from server.engine.sequence import Sequence


def slot_shape(seqs: Iterable[Sequence]) -> tuple[int, int]:
    """(slots, positions per slot) that `seqs` need together."""
    lengths = [s.max_total_len for s in seqs]
    return len(lengths), max(lengths, default=0)


@dataclass(frozen=True, slots=True)
class SlotBudget:
    positions: int  # slot positions the KV memory holds (each position counts all layers)

    def __post_init__(self) -> None:
        check_int("kv_budget_positions", self.positions, low=1)

    def fits(self, slots: int, length: int) -> bool:
        return slots * length <= self.positions

    def admits(self, seqs: Iterable[Sequence]) -> bool:
        """Whether `seqs` can all run at once."""
        return self.fits(*slot_shape(seqs))
