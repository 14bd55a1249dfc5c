"""How much memory the KV cache may use when --kv-cache-bytes does not say: a share of the device.

On CUDA it comes from `kv_cache_memory_fraction` (0.9) of the memory free once the model is loaded.
On the CPU it is a quarter of the RAM available at start (within a container's limit, rounded down), as a cap: the
cache grows as requests need it, so tests and several replicas on one machine reserve nothing up front.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

CPU_SHARE = 0.25  # of the RAM available at start: the model's activations and the process need the rest


def default_kv_budget(devices: Sequence[torch.device] | torch.device, fraction: float) -> tuple[int, str]:
    """(bytes, how they were chosen) for the KV pool, whose layers live on `devices` (one per layer).

    Task prefixes live in the same pool (pages.py), so nothing is set apart for them. On CUDA the pool
    is allocated whole at its first use (server/engine/kv.py); the rest of the free memory is left to
    the model's activations. A model split over devices holds each page's layers on their layers'
    devices: the pool is as large as its most crowded device allows.
    """
    if isinstance(devices, torch.device):
        devices = [devices]
    layers_on = Counter(devices)
    best: tuple[int, str] | None = None
    for device, layers in layers_on.items():
        budget, why = _one_device_budget(device, fraction)
        whole = budget * len(devices) // layers  # this device holds layers/len(devices) of every page
        if len(layers_on) > 1:
            why = f"{why}, holding {layers} of {len(devices)} layers"
        if best is None or whole < best[0]:
            best = (whole, why)
    assert best is not None, "a model has layers"
    return best


def _one_device_budget(device: torch.device, fraction: float) -> tuple[int, str]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction), f"{fraction:g} of the {_gib(free)} free on {device} after loading the model"
    available = _available_ram()
    return (_steady(int(available * CPU_SHARE)),
            f"a quarter of the {_gib(available)} of RAM available at start, rounded down, as a cap")


def _steady(budget: int) -> int:
    """`budget` rounded down to a step of 1/16 to 1/8 of itself (5.1 to 5.49 GiB: 5 GiB): the RAM
    available moves a little from one start to the next, and the pool's size is part of the compiled one-row
    graph (server/engine/compiled.py), which a restart then finds on disk instead of compiling it again."""
    step = 1 << max(budget.bit_length() - 4, 0)
    return budget // step * step


def _available_ram() -> int:
    """What this process can still use: MemAvailable (free pages elsewhere), and inside a container no more
    than its cgroup's limit leaves (MemAvailable is the whole machine's)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(available, _cgroup_headroom())


def _cgroup_headroom() -> int:
    """memory.max - memory.current of this process's cgroup (v2); unlimited where there is none."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return 1 << 62
    return 1 << 62 if limit == "max" else max(int(limit) - used, 0)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"
