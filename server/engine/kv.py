"""The KV pool's storage: every page's keys and values, for every layer, in two tensors.

Layout: `[layers, pages, PAGE_SIZE, kv_heads, head_dim]`, position-major inside a page, so a page is
one contiguous block per layer and gathering a request's pages is a copy of whole blocks. Which page
holds what is decided in `pages.py` (no torch); this module only stores and reads.

On the CPU the storage is reserved whole but committed as it is used: `torch.empty` of that size is
an anonymous memory map, so the operating system gives it RAM page by page as pages are first written
(`ensure` zeroes each page once, just before its first use). An idle server, a test or one of
several replicas on a machine thus holds only what it uses, and growing never copies. When the
pages in use fit a quarter of what was touched and nothing runs, `shrink` moves them to a fresh
storage and the rest goes back to the system. On CUDA the whole pool is allocated at the first use:
the budget there was sized from the device's free memory.
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
        self.keys: torch.Tensor | None = None  # [layers, total_pages, PAGE_SIZE, kv_heads, head_dim]
        self.values: torch.Tensor | None = None
        self._touched = 0  # pages 0.._touched-1 were zeroed (committed); the rest is only reserved
        # Reused gather outputs, keys' and values': a fresh big tensor each time would fault its memory in.
        self._scratch: dict[str, torch.Tensor] = {}

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
        """Pages usable now: zeroed once, so holding memory (on the CPU, only these are committed)."""
        return self._touched

    @property
    def nbytes(self) -> int:
        return self.capacity * self.page_bytes

    # -- sizing --------------------------------------------------------------------------------

    def ensure(self, pages: int) -> None:
        """Make pages 0..pages-1 usable, keeping what is stored."""
        if pages <= self._touched:
            return
        if self.keys is None or self.values is None:
            shape = (self.num_layers, self.total_pages, PAGE_SIZE, self.kv_heads, self.head_dim)
            self.keys = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.values = torch.empty(shape, dtype=self.dtype, device=self.device)
        # Zeroed before the first use: a masked row gets weight 0, and 0 x NaN (torch.empty's garbage) is
        # NaN. A page handed out again is cleared then (`clear`). On CUDA everything at once.
        end = pages if self.grow else self.total_pages
        self.keys[:, self._touched:end] = 0
        self.values[:, self._touched:end] = 0
        self._touched = end

    def shrink(self, extent: int) -> None:
        """Nothing runs and pages from `extent` on are unused: give their memory back when they are most."""
        if not self.grow or self.keys is None or self.values is None or 4 * extent > self._touched:
            return
        old_keys, old_values = self.keys, self.values
        self.keys = self.values = None
        self._touched = 0
        self._scratch.clear()
        if extent:
            self.ensure(extent)
            assert self.keys is not None and self.values is not None
            self.keys[:, :extent] = old_keys[:, :extent]
            self.values[:, :extent] = old_values[:, :extent]

    def clear(self, pages: torch.Tensor) -> None:
        """Zero `pages` in every layer."""
        assert self.keys is not None and self.values is not None, "clear before ensure"
        self.keys[:, pages] = 0
        self.values[:, pages] = 0

    # -- reads and writes ----------------------------------------------------------------------

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Store new tokens: key/value `[kv_heads, T, head_dim]` at rows `[T]` (page * PAGE_SIZE + offset)."""
        assert self.keys is not None and self.values is not None, "write before ensure"
        flat = (-1, self.kv_heads, self.head_dim)
        self.keys[layer].view(flat)[rows] = key.transpose(0, 1).to(self.dtype)
        self.values[layer].view(flat)[rows] = value.transpose(0, 1).to(self.dtype)

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pages` (any shape `[..., P]`), as `[..., kv_heads, P * PAGE_SIZE, head_dim]`.
        The result is only valid until the next gather (it lives in a reused buffer)."""
        assert self.keys is not None and self.values is not None, "gather before ensure"
        *lead, count = pages.shape
        shape = (*lead, count * PAGE_SIZE, self.kv_heads, self.head_dim)
        flat = pages.reshape(-1)
        keys = self._gather_into("keys", self.keys[layer], flat).view(shape).transpose(-3, -2)
        values = self._gather_into("values", self.values[layer], flat).view(shape).transpose(-3, -2)
        return keys, values

    def _gather_into(self, name: str, source: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        numel = pages.numel() * source[0].numel()
        buffer = self._scratch.get(name)
        if buffer is None or buffer.numel() < numel:
            grown = max(numel, 2 * buffer.numel()) if buffer is not None else numel
            buffer = self._scratch[name] = torch.empty(grown, dtype=self.dtype, device=self.device)
        out = buffer[:numel].view(pages.numel(), *source.shape[1:])
        return torch.index_select(source, 0, pages, out=out)
