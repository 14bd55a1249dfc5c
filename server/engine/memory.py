"""How much memory the KV cache may use when --kv-cache-bytes does not say: a share of the device.

On CUDA it is `kv_cache_memory_fraction` (0.9) of the memory free once the model is loaded. On the CPU
it is a quarter of the RAM available at start, as a cap: the cache grows as requests need it, so tests
and several replicas on one machine reserve nothing up front.
"""

from __future__ import annotations

import os

import torch

CPU_SHARE = 0.25  # of the RAM available at start: the model's activations and the process need the rest


def default_kv_budget(device: torch.device, fraction: float) -> tuple[int, str]:
    """(bytes, how they were chosen) for the KV cache on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction), f"{fraction:g} of the {_gib(free)} free on {device} after loading the model"
    available = _available_ram()
    return int(available * CPU_SHARE), f"a quarter of the {_gib(available)} of RAM available at start, as a cap"


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping); free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"
