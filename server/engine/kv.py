"""The KV pool's storage: every page's keys and values, for every layer.

Layout: `[layers, pages, PAGE_SIZE, kv_heads, head_dim]` per device (one such pair of tensors, keys'
and values', for the layers on each device: a model split over devices keeps each layer's keys and
values beside its weights), position-major inside a page, so a page is
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

from collections.abc import Sequence

import torch

from server.engine.pages import PAGE_SIZE


class PagedKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | None = None, devices: Sequence[torch.device] | None = None,
                 total_pages: int, grow: bool | None = None) -> None:
        """`devices`: each layer's device (a model split over devices); else every layer on `device`."""
        if devices is None:
            assert device is not None, "give device or devices"
            devices = [device] * num_layers
        assert len(devices) == num_layers, f"{len(devices)} layer devices for {num_layers} layers"
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.devices = list(devices)
        self.device = self.devices[0]
        self.total_pages = total_pages
        self.grow = all(d.type != "cuda" for d in self.devices) if grow is None else grow
        self._layers_on: dict[torch.device, list[int]] = {}
        for layer, dev in enumerate(self.devices):
            self._layers_on.setdefault(dev, []).append(layer)
        # Per device: [layers on it, total_pages, PAGE_SIZE, kv_heads, head_dim]; and each layer's view.
        self._keys: dict[torch.device, torch.Tensor] = {}
        self._values: dict[torch.device, torch.Tensor] = {}
        self._layer_keys: list[torch.Tensor] = []
        self._layer_values: list[torch.Tensor] = []
        self._flat: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # flat_layers()
        self._touched = 0  # pages 0.._touched-1 were zeroed (committed); the rest is only reserved
        # Reused gather outputs, keys' and values' per device: a fresh big tensor each time would fault its
        # memory in.
        self._scratch: dict[tuple[str, torch.device], torch.Tensor] = {}

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

    @property
    def allocated(self) -> bool:
        return bool(self._keys)

    def storage(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per device, each `[layers on it, total_pages, PAGE_SIZE, kv_heads, head_dim]`."""
        return [(self._keys[d], self._values[d]) for d in self._keys]

    # -- sizing --------------------------------------------------------------------------------

    def ensure(self, pages: int) -> None:
        """Make pages 0..pages-1 usable, keeping what is stored."""
        if pages <= self._touched:
            return
        if not self._keys:
            for dev, layers in self._layers_on.items():
                shape = (len(layers), self.total_pages, PAGE_SIZE, self.kv_heads, self.head_dim)
                self._keys[dev] = torch.empty(shape, dtype=self.dtype, device=dev)
                self._values[dev] = torch.empty(shape, dtype=self.dtype, device=dev)
            slot = {layer: (dev, i) for dev, layers in self._layers_on.items() for i, layer in enumerate(layers)}
            self._layer_keys = [self._keys[slot[layer][0]][slot[layer][1]] for layer in range(self.num_layers)]
            self._layer_values = [self._values[slot[layer][0]][slot[layer][1]] for layer in range(self.num_layers)]
        # Zeroed before the first use: a masked row gets weight 0, and 0 x NaN (torch.empty's garbage) is
        # NaN. A page handed out again is cleared then (`clear`). On CUDA everything at once.
        end = pages if self.grow else self.total_pages
        for keys, values in self.storage():
            keys[:, self._touched:end] = 0
            values[:, self._touched:end] = 0
        self._touched = end

    def shrink(self, extent: int) -> None:
        """Nothing runs and pages from `extent` on are unused: give their memory back when they are most."""
        if not self.grow or not self._keys or 4 * extent > self._touched:
            return
        old = {dev: (self._keys[dev], self._values[dev]) for dev in self._keys}
        self._release()
        if extent:
            self.ensure(extent)
            for dev, (keys, values) in old.items():
                self._keys[dev][:, :extent] = keys[:, :extent]
                self._values[dev][:, :extent] = values[:, :extent]

    def _release(self) -> None:
        self._keys, self._values = {}, {}
        self._layer_keys, self._layer_values = [], []
        self._flat = None
        self._touched = 0
        self._scratch.clear()

    def clear(self, pages: torch.Tensor) -> None:
        """Zero `pages` in every layer."""
        assert self._keys, "clear before ensure"
        for dev in self._keys:
            on = pages.to(dev)
            self._keys[dev][:, on] = 0
            self._values[dev][:, on] = 0

    # -- reads and writes ----------------------------------------------------------------------

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Store new tokens: key/value `[kv_heads, T, head_dim]` at rows `[T]` (page * PAGE_SIZE + offset)."""
        assert self._keys, "write before ensure"
        keys, values = self.flat_layers()
        write_rows(keys[layer], values[layer], rows.to(keys[layer].device), key, value)

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pages` (any shape `[..., P]`), as `[..., kv_heads, P * PAGE_SIZE, head_dim]`,
        on the layer's device. The result is only valid until the next gather (it lives in a reused buffer)."""
        assert self._keys, "gather before ensure"
        *lead, count = pages.shape
        shape = (*lead, count * PAGE_SIZE, self.kv_heads, self.head_dim)
        keys_store, values_store = self._layer_keys[layer], self._layer_values[layer]
        flat = pages.reshape(-1).to(keys_store.device)
        keys = self._gather_into("keys", keys_store, flat).view(shape).transpose(-3, -2)
        values = self._gather_into("values", values_store, flat).view(shape).transpose(-3, -2)
        return keys, values

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole storage, keys' and values', `[pages, PAGE_SIZE, kv_heads, head_dim]`: read in place."""
        assert self._keys, "read before ensure"
        return self._layer_keys[layer], self._layer_values[layer]

    def flat_layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values as rows `[pages * PAGE_SIZE, kv_heads, head_dim]`: views, one per layer, that
        a compiled graph takes as inputs and writes in place (a view of the whole storage, written, is copied whole)."""
        assert self._keys, "read before ensure"
        if self._flat is None:
            flat = (-1, self.kv_heads, self.head_dim)
            self._flat = ([k.view(flat) for k in self._layer_keys], [v.view(flat) for v in self._layer_values])
        return self._flat

    def _gather_into(self, name: str, source: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        numel = pages.numel() * source[0].numel()
        buffer = self._scratch.get((name, source.device))
        if buffer is None or buffer.numel() < numel:
            grown = max(numel, 2 * buffer.numel()) if buffer is not None else numel
            buffer = self._scratch[(name, source.device)] = torch.empty(grown, dtype=self.dtype, device=source.device)
        out = buffer[:numel].view(pages.numel(), *source.shape[1:])
        return torch.index_select(source, 0, pages, out=out)


def write_rows(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> None:
    """The write rule of the pool: new tokens' key/value `[kv_heads, T, head_dim]` into a layer's flat rows
    `[pages * PAGE_SIZE, kv_heads, head_dim]` at `rows` `[T]` (page * PAGE_SIZE + offset). Eager (`PagedKV.write`)
    and traced into the compiled one-row graph (attention.attend_one)."""
    keys[rows] = key.transpose(0, 1).to(keys.device, keys.dtype)
    values[rows] = value.transpose(0, 1).to(values.device, values.dtype)
