"""Task prefixes as per-layer keys and values, computed once per prompt version, kept on the device.

Raw prompts stay on the CPU in the registry; what a request needs on the device is the KV its
virtual tokens produce. Entries are keyed by the prompt snapshot's `(task, version)`, so a
replaced prompt never serves a stale prefix, and a request keeps the version it started with.
Least recently used entries leave first when the byte budget is exceeded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

# keys, values: [layers, kv_heads, n, head_dim]
PrefixKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class PromptCacheStats:
    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int


class PromptCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[object, PrefixKV] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # stats are read from HTTP threads while the loop writes

    def get_or_compute(self, key: object, compute: Callable[[], PrefixKV]) -> PrefixKV:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = compute()
        size = _nbytes(entry)
        with self._lock:
            if size <= self.budget_bytes:  # a prefix larger than the whole budget is used, not kept
                self._entries[key] = entry
                self._bytes += size
                while self._bytes > self.budget_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= _nbytes(old)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(len(self._entries), self._bytes, self.budget_bytes, self.hits, self.misses)


def _nbytes(entry: PrefixKV) -> int:
    return sum(t.numel() * t.element_size() for t in entry)
