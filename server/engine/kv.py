"""Per-request key/value memory: one slot per running request, shared by all layers.

Layout: keys and values are `[layers, slots, kv_heads, capacity, head_dim]`. A running request
owns one slot; position `i` of the request (virtual tokens included) lives at index `i` of the
slot, so a step only *writes* its new tokens (a scatter) and attention reads slot views
in place: nothing is re-padded or copied per decode step.

Slots are kept compact (running requests hold 0..n-1) so that the batched decode attention
reads one contiguous view `[:n]`; when a request leaves, the last slot moves into its place
(one request's KV copied once, on leave). The buffers grow when more requests (slots double) or
a longer one (length grows to the need) arrive, within the `SlotBudget`, and are released when
nothing runs, so memory returns to zero when idle.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import torch

from server.engine.kv_budget import SlotBudget, slot_shape
from server.engine.sequence import Sequence


class SlotKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, budget_bytes: int | None = None, max_slots: int | None = None) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        # The byte budget counted in positions: the unit the scheduler admits by.
        self.budget = None if budget_bytes is None else SlotBudget(max(1, budget_bytes // self.bytes_per_position))
        self.max_slots = max_slots  # slots never usefully exceed the running-request limit
        self.keys: torch.Tensor | None = None  # [layers, slots, kv_heads, capacity, head_dim]
        self.values: torch.Tensor | None = None
        self.holders: list[Sequence] = []  # slot i is held by holders[i]; compact

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position of one request costs over all layers (keys and values)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize

    @property
    def slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def _fits(self, slots: int, length: int) -> bool:
        return self.budget is None or self.budget.fits(slots, length)

    # -- sizing --------------------------------------------------------------------------------

    def ensure(self, slots: int, length: int) -> None:
        """Make room for `slots` requests of up to `length` positions, keeping what is stored."""
        if slots <= self.slots and length <= self.capacity:
            return
        # Each regrowth zero-fills and copies every layer's buffer, so grow by doubling.
        new_slots = max(slots, 2 * self.slots) if slots > self.slots else self.slots
        if self.max_slots is not None:
            new_slots = max(slots, min(new_slots, self.max_slots))
        # Length grows to the need (rounded up), not doubled: every running request's slot spans it,
        # so a doubled length would multiply the memory (and the page-faulting) by the slot count.
        new_len = max(length, self.capacity)
        new_len = -(-new_len // 16) * 16  # aligned rows
        if not self._fits(new_slots, new_len):
            # Growth (or an earlier rounding) must not push past the budget: take the exact need. It
            # covers every request that holds a slot, so nothing stored beyond it is in use.
            new_slots, new_len = slots, length
        shape = (self.num_layers, new_slots, self.kv_heads, new_len, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys is not None and self.values is not None:
            s, c = min(self.slots, new_slots), min(self.capacity, new_len)
            keys[:, :s, :, :c] = self.keys[:, :s, :, :c]
            values[:, :s, :, :c] = self.values[:, :s, :, :c]
        self.keys, self.values = keys, values

    def reserve(self, joining: list[Sequence], upcoming: Collection[Sequence] = ()) -> None:
        """Size the slots once for everyone joining this step and the requests queued behind them (up
        to the slot limit): each regrowth zero-fills and copies every layer's buffer."""
        if not joining:
            return
        room = self.max_slots if self.max_slots is not None else len(self.holders) + len(joining) + len(upcoming)
        queued = list(itertools.islice(upcoming, max(0, room - len(self.holders) - len(joining))))
        slots, longest = slot_shape(self.holders + joining + queued)
        if not self._fits(slots, longest):  # the queue may not all fit: size for this step alone
            slots, longest = slot_shape(self.holders + joining)
        self.ensure(slots, longest)

    # -- slots ---------------------------------------------------------------------------------

    def assign(self, seq: Sequence) -> int:
        """Give `seq` the next free slot (growing the buffers if needed) and return it."""
        self.ensure(*slot_shape([*self.holders, seq]))
        seq.slot = len(self.holders)
        self.holders.append(seq)
        return seq.slot

    def free(self, seq: Sequence) -> None:
        """Free `seq`'s slot at once; the last slot moves into the hole so slots stay compact."""
        if seq.slot is None:
            return
        hole, last = seq.slot, len(self.holders) - 1
        if hole != last:
            mover = self.holders[last]
            self._move(last, hole, mover.num_virtual + mover.num_cached)
            mover.slot = hole
            self.holders[hole] = mover
        self.holders.pop()
        seq.slot = None
        if not self.holders:
            self.keys = self.values = None  # nothing runs: give all memory back

    # -- reads and writes ----------------------------------------------------------------------

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_idx: torch.Tensor,
              pos_idx: torch.Tensor) -> None:
        """Scatter new tokens: key/value `[kv_heads, T, head_dim]`, slot_idx/pos_idx `[T]`."""
        assert self.keys is not None and self.values is not None, "write before ensure"
        # Advanced indices on dims 0 and 2 (split by a slice) put T first: target is [T, kv_heads, hd].
        self.keys[layer][slot_idx, :, pos_idx] = key.transpose(0, 1).to(self.dtype)
        self.values[layer][slot_idx, :, pos_idx] = value.transpose(0, 1).to(self.dtype)

    def load_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy a task's prefix `[layers, kv_heads, n, head_dim]` into positions 0..n-1 of a slot."""
        assert self.keys is not None and self.values is not None, "load_prefix before ensure"
        n = keys.shape[2]
        self.keys[:, slot, :, :n] = keys
        self.values[:, slot, :, :n] = values

    def _move(self, src: int, dst: int, length: int) -> None:
        assert self.keys is not None and self.values is not None
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def layer_view(self, layer: int, slots: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots 0..slots-1, positions 0..length-1: views, no copy."""
        assert self.keys is not None and self.values is not None
        return self.keys[layer, :slots, :, :length], self.values[layer, :slots, :, :length]

    def slot_all_layers(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one slot's first `length` positions, every layer: `[layers, kv_heads, length, hd]`."""
        assert self.keys is not None and self.values is not None
        return self.keys[:, slot, :, :length], self.values[:, slot, :, :length]

    def slot_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        return self.keys[layer, slot, :, :length], self.values[layer, slot, :, :length]
