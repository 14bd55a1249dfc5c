"""The engine's settings, each checked here. No torch: the service validates its settings by building one.

Each field is declared once, here: its metadata's "help" is its `promptswap serve --help` text, and for a
None default "unset" says what decides the value ("here", when given, what it comes to on this machine).
server/config.py makes one setting (a flag and a PROMPTSWAP_* variable) of every field, so a new field is
served with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from server.engine.errors import InvalidConfig, check_int
from server.engine.scheduler import SchedulerConfig
from server.machine.threads import usable_cpus


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_running: int = field(default=64, metadata={"help": "Most requests decoding at once (engine)."})
    max_tokens_per_step: int = field(default=512, metadata={
        "help": "Most tokens in one forward pass, >= max-running; long prompts prefill in chunks (engine)."})
    max_context: int | None = field(default=None, metadata={
        "help": "Most positions per request, virtual tokens included (engine).",
        "unset": "the model's own limit"})
    max_queue: int = field(default=1024, metadata={
        "help": "Most requests waiting beyond the max-running running ones; more get 503 (engine)."})
    kv_cache_bytes: int | None = field(default=None, metadata={
        "help": "Byte budget of the KV page pool: requests' keys and values and task prefixes (engine).",
        "unset": "a share of the device: from --kv-cache-memory-fraction of the GPU memory free after loading, "
                 "or a quarter of the RAM available at start on the CPU (a cap; it grows as needed)"})
    kv_cache_memory_fraction: float = field(default=0.9, metadata={
        "help": "Without --kv-cache-bytes on CUDA: the share of the GPU memory free after loading the model that "
                "the KV cache may use (engine)."})
    prompt_cache_bytes: int = field(default=512 * 2**20, metadata={
        "help": "How much of the KV pool task prefixes no request uses may keep (least recently used out)."})
    prefix_caching: bool = field(default=True, metadata={
        "help": "Automatic prefix caching: a request reads the full KV pages earlier requests computed for the same "
                "task prefix and leading tokens instead of computing them (for every task kind); idle cached pages "
                "stay until the pool needs them (engine)."})
    format_cache_bytes: int = field(default=16 * 2**20, metadata={
        "help": "Bytes of compiled response formats kept (each distinct schema or pattern's grammar and whether it "
                "passed its probe; least recently used out). Matchers live only as long as their request."})
    format_compile_timeout_s: float = field(default=10.0, metadata={
        "help": "Longest a response format may take to compile and pass its probe (a 422 naming response_format "
                "past it; the format is refused from then on)."})
    compile: bool = field(default=True, metadata={
        "help": "Capture the model's forward pass with torch.compile at start (kernels cached on disk, reused by a "
                "restart); where it cannot run (no C++ compiler, a model spread over devices) the engine serves "
                "eagerly and logs why. On the CPU, one-token steps get a graph reading plain copies of the Linear "
                "weights (faster at one request; the start log says the memory it adds) (engine)."})
    compile_cache_dir: str | None = field(default=None, metadata={
        "help": "Where compiled kernels are kept across restarts (engine).",
        "unset": "$TORCHINDUCTOR_CACHE_DIR, else ~/.cache/promptswap/compile"})
    # Once the engine starts, every other thread of the process runs torch on one thread; see
    # server/machine/threads.py.
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads of the engine's model work (torch intra-op); other threads use one.",
        "unset": "the CPU cores this process may use: its CPU affinity, within its cgroup's CPU quota",
        "here": usable_cpus})

    def __post_init__(self) -> None:
        # Its checks, written once there.
        SchedulerConfig(self.max_running, self.max_tokens_per_step, prefix_caching=self.prefix_caching)
        for name in ("max_queue", "prompt_cache_bytes", "format_cache_bytes"):
            check_int(name, getattr(self, name), low=1)
        check_int("kv_cache_bytes", self.kv_cache_bytes, low=1, optional=True)
        fraction = self.kv_cache_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise InvalidConfig("kv_cache_memory_fraction", "a number in (0, 1]", fraction)
        timeout = self.format_compile_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise InvalidConfig("format_compile_timeout_s", "a number of seconds in (0, 600]", timeout)
        check_int("threads", self.threads, low=1, optional=True)
        check_int("max_context", self.max_context, low=2, optional=True)


def describe_default(name: str) -> str:
    """A field's default as `serve --help` shows it: the number, or what decides it (its "unset" metadata)."""
    setting = {f.name: f for f in fields(EngineConfig)}[name]
    default = setting.default
    if default is None:
        here = setting.metadata.get("here")
        return str(setting.metadata["unset"]) + (f" ({here()} here)" if here is not None else "")
    if name.endswith("_bytes") and isinstance(default, int):
        return f"{default} ({default / 2**20:g} MiB)"
    return str(default)
