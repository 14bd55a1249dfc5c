"""The engine's settings, each checked here. No torch: the service validates its settings by building one."""

from __future__ import annotations

from dataclasses import dataclass, fields

from server.engine.errors import check_int
from server.engine.scheduler import SchedulerConfig


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_running: int = 64  # requests decoding together
    max_tokens_per_step: int = 512  # tokens in one forward pass (decodes + prefill chunks)
    max_context: int | None = None  # positions per request, virtual tokens included; None: the model's
    max_queue: int = 1024  # requests waiting beyond the max_running running ones before new ones get QueueFull
    kv_cache_bytes: int = 2 * 2**30  # KV memory of running requests
    prompt_cache_bytes: int = 512 * 2**20  # device memory for precomputed task prefixes
    # torch intra-op threads of the engine thread (None: torch's default). Once the engine starts,
    # every other thread of the process runs torch on one thread; see server/engine/threads.py.
    threads: int | None = None

    def __post_init__(self) -> None:
        SchedulerConfig(self.max_running, self.max_tokens_per_step)  # its checks, written once there
        for name in ("max_queue", "kv_cache_bytes", "prompt_cache_bytes"):
            check_int(name, getattr(self, name), low=1)
        check_int("threads", self.threads, low=1, optional=True)
        check_int("max_context", self.max_context, low=2, optional=True)


# What a None default means, for the settings whose default depends on the model or the machine.
_NONE_MEANS = {"max_context": "the model's own limit", "threads": "torch's default, one per core"}


def describe_default(name: str) -> str:
    """A field's default as `serve --help` shows it: the number, or what decides it."""
    default = {f.name: f.default for f in fields(EngineConfig)}[name]
    if default is None:
        return _NONE_MEANS[name]
    if name.endswith("_bytes") and isinstance(default, int):
        return f"{default} ({default / 2**20:g} MiB)"
    return str(default)
