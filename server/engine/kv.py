"""The KV pool's storage: every page's keys and values, for every layer, in two tensors.

Layout: `[layers, pages, PAGE_SIZE, kv_heads, head_dim]`, position-major inside a page, so a page is
one contiguous block per layer and gathering a request's pages is a copy of whole blocks. Which page
holds what is decided in `pages.py` (no torch); this module only stores and reads.

On the CPU the storage grows (doubling, within the pool's page count) as pages are handed out and
shrinks when the pages in use fit a quarter of it, so an idle server, a test or one of several
replicas on a machine holds only what it uses. On CUDA the whole pool is allocated at the first
use: the budget there was sized from the device's free memory, and a growth copy would need the
old and the new storage at once.
"""

from __future__ import annotations

import torch

from server.engine.pages import PAGE_SIZE


class PagedKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, total_pages: int, grow: bool | None = None) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.total_pages = total_pages
        self.grow = device.type != "cuda" if grow is None else grow
        self.keys: torch.Tensor | None = None  # [layers, capacity, PAGE_SIZE, kv_heads, head_dim]
        self.values: torch.Tensor | None = None

    @staticmethod
    def position_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one position costs over all layers (keys and values)."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes_per_position(self) -> int:
        return self.position_bytes(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    @property
    def page_bytes(self) -> int:
        return PAGE_SIZE * self.bytes_per_position

    @property
    def capacity(self) -> int:
        """Pages the storage holds now."""
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.page_bytes

    # -- sizing --------------------------------------------------------------------------------

    def ensure(self, pages: int) -> None:
        """Make pages 0..pages-1 addressable, keeping what is stored."""
        if pages <= self.capacity:
            return
        target = self.total_pages if not self.grow else min(self.total_pages, max(pages, 2 * self.capacity))
        self._resize(max(target, pages))

    def shrink(self, extent: int) -> None:
        """Pages from `extent` on are unused: give the storage back where it is mostly empty."""
        if not self.grow or self.capacity == 0:
            return
        if extent == 0:
            self.keys = self.values = None
        elif 4 * extent <= self.capacity:
            self._resize(2 * extent)

    def _resize(self, pages: int) -> None:
        shape = (self.num_layers, pages, PAGE_SIZE, self.kv_heads, self.head_dim)
        # Zero-filled once: masked rows get weight 0, and 0 x NaN (garbage of torch.empty) would be NaN.
        # A page reused later holds old finite values, which weight 0 also hides.
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys is not None and self.values is not None:
            kept = min(self.capacity, pages)
            keys[:, :kept] = self.keys[:, :kept]
            values[:, :kept] = self.values[:, :kept]
        self.keys, self.values = keys, values

    # -- reads and writes ----------------------------------------------------------------------

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Store new tokens: key/value `[kv_heads, T, head_dim]` at rows `[T]` (page * PAGE_SIZE + offset)."""
        assert self.keys is not None and self.values is not None, "write before ensure"
        flat = (-1, self.kv_heads, self.head_dim)
        self.keys[layer].view(flat)[rows] = key.transpose(0, 1).to(self.dtype)
        self.values[layer].view(flat)[rows] = value.transpose(0, 1).to(self.dtype)

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pages` (any shape `[..., P]`), as `[..., kv_heads, P * PAGE_SIZE, head_dim]`."""
        assert self.keys is not None and self.values is not None, "gather before ensure"
        *lead, count = pages.shape
        shape = (*lead, count * PAGE_SIZE, self.kv_heads, self.head_dim)
        flat = pages.reshape(-1)
        keys = self.keys[layer].index_select(0, flat).view(shape).transpose(-3, -2)
        values = self.values[layer].index_select(0, flat).view(shape).transpose(-3, -2)
        return keys, values
