"""Per-request key/value memory: one slot per running request, shared by all layers.

Layout: keys and values are `[layers, slots, kv_heads, capacity, head_dim]`. A running request
owns one slot; position `i` of the request (virtual tokens included) lives at index `i` of the
slot, so a step only *writes* its new tokens (a scatter) and attention reads slot views
in place: nothing is re-padded or copied per decode step.

Slots are kept compact (running requests occupy 0..n-1) so that the batched decode attention
reads one contiguous view `[:n]`; when a request leaves, the last slot moves into its place
(one request's KV copied once, on leave). The buffers grow when more requests (slots double) or
a longer one (length grows to the need) arrive, and are released when nothing runs, so memory
returns to zero when idle. The engine sizes them once per step for everyone joining it.
"""

from __future__ import annotations

import torch


class SlotKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, budget_bytes: int | None = None, max_slots: int | None = None) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots  # slots never usefully exceed the running-request limit
        self.keys: torch.Tensor | None = None  # [layers, slots, kv_heads, capacity, head_dim]
        self.values: torch.Tensor | None = None

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

    def fits(self, slots: int, length: int) -> bool:
        """Whether `slots` requests of `length` positions fit the byte budget."""
        return self.budget_bytes is None or slots * length * self.bytes_per_position <= self.budget_bytes

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
        if not self.fits(new_slots, new_len):  # growth must not push past the budget: fall back to the exact need
            new_slots, new_len = max(slots, self.slots), max(length, self.capacity)
        shape = (self.num_layers, new_slots, self.kv_heads, new_len, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys is not None:
            s, c = self.slots, self.capacity
            keys[:, :s, :, :c] = self.keys
            values[:, :s, :, :c] = self.values
        self.keys, self.values = keys, values

    def release(self) -> None:
        """Give all memory back (called when no request runs)."""
        self.keys = self.values = None

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_idx: torch.Tensor,
              pos_idx: torch.Tensor) -> None:
        """Scatter new tokens: key/value `[kv_heads, T, head_dim]`, slot_idx/pos_idx `[T]`."""
        # Advanced indices on dims 0 and 2 (split by a slice) put T first: target is [T, kv_heads, hd].
        self.keys[layer][slot_idx, :, pos_idx] = key.transpose(0, 1).to(self.dtype)
        self.values[layer][slot_idx, :, pos_idx] = value.transpose(0, 1).to(self.dtype)

    def load_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy a task's prefix `[layers, kv_heads, n, head_dim]` into positions 0..n-1 of a slot."""
        n = keys.shape[2]
        self.keys[:, slot, :, :n] = keys
        self.values[:, slot, :, :n] = values

    def move(self, src: int, dst: int, length: int) -> None:
        """Move one request's first `length` positions from slot `src` to slot `dst`."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def layer_view(self, layer: int, slots: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots 0..slots-1, positions 0..length-1: views, no copy."""
        return self.keys[layer, :slots, :, :length], self.values[layer, :slots, :, :length]

    def slot_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer, slot, :, :length], self.values[layer, slot, :, :length]
