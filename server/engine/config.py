"""The engine's settings, each checked here. No torch: the service validates its settings by building one."""

from __future__ import annotations

from dataclasses import dataclass, fields

from server.engine.errors import InvalidConfig, check_int
from server.engine.scheduler import SchedulerConfig


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_running: int = 64  # requests decoding together
    max_tokens_per_step: int = 512  # tokens in one forward pass (decodes + prefill chunks)
    max_context: int | None = None  # positions per request, virtual tokens included; None: the model's
    max_queue: int = 1024  # requests waiting beyond the max_running running ones before new ones get QueueFull
    kv_cache_bytes: int | None = None  # the KV page pool (requests and task prefixes); None: a share of the device
    kv_cache_memory_fraction: float = 0.9  # on CUDA, of the memory free after loading, when kv_cache_bytes is None
    prompt_cache_bytes: int = 512 * 2**20  # of the KV pool, what task prefixes no request uses may keep (LRU)
    # torch intra-op threads of the engine thread (None: torch's default). Once the engine starts,
    # every other thread of the process runs torch on one thread; see server/engine/threads.py.
    threads: int | None = None

    def __post_init__(self) -> None:
        SchedulerConfig(self.max_running, self.max_tokens_per_step)  # its checks, written once there
        for name in ("max_queue", "prompt_cache_bytes"):
            check_int(name, getattr(self, name), low=1)
        check_int("kv_cache_bytes", self.kv_cache_bytes, low=1, optional=True)
        fraction = self.kv_cache_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise InvalidConfig("kv_cache_memory_fraction", "a number in (0, 1]", fraction)
        check_int("threads", self.threads, low=1, optional=True)
        check_int("max_context", self.max_context, low=2, optional=True)


# What a None default means, for the settings whose default depends on the model or the machine.
_NONE_MEANS = {
    "max_context": "the model's own limit",
    "threads": "torch's default, one per core",
    "kv_cache_bytes": "a share of the device: from --kv-cache-memory-fraction of the GPU memory free after "
                      "loading, or a quarter of the RAM available at start on the CPU (a cap; it grows as needed)",
}


def describe_default(name: str) -> str:
    """A field's default as `serve --help` shows it: the number, or what decides it."""
    default = {f.name: f.default for f in fields(EngineConfig)}[name]
    if default is None:
        return _NONE_MEANS[name]
    if name.endswith("_bytes") and isinstance(default, int):
        return f"{default} ({default / 2**20:g} MiB)"
    return str(default)
