"""promptswap's engine in this process, replaying the workload's arrivals through its public API.

Each request is submitted at its arrival time and read through `handle.stream()`, so its time to
first token is when the engine handed over its first token, as a streaming client would see it.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.clients import replay
from benchmarks.metrics import RequestResult
from benchmarks.workload import Request, Workload


def load_base(model_path: str, device: str | None, dtype: str | None):
    from server.model.model_loader import load_base_model

    return load_base_model(model_path, device=device, dtype=dtype)


def make_registry(base, workload: Workload):
    """A registry holding the workload's tasks, uploaded as PEFT safetensors bytes like a user would."""
    from prompt_store import PromptRegistry, RegistryLimits

    longest = max((t.num_virtual for t in workload.tasks.values()), default=1)
    # Stored in the model's dtype, as the service does.
    limits = RegistryLimits(max_virtual_tokens=max(256, longest))
    registry = PromptRegistry(base.geometry, dtype=base.dtype, limits=limits)
    for task in workload.tasks.values():
        registry.put(task.name, task.to_safetensors(), kind=task.kind)
    return registry


def start_engine(base, registry, max_running: int, max_tokens_per_step: int, **settings):
    """A started engine; `settings` are more EngineConfig fields (kv_cache_bytes, prompt_cache_bytes, ...)."""
    from benchmarks.threads import engine_threads
    from server.engine.config import EngineConfig
    from server.engine.loop import Engine

    config = EngineConfig(max_running=max_running, max_tokens_per_step=max_tokens_per_step, threads=engine_threads(),
                          **settings)
    engine = Engine(base, registry, config)
    engine.start()
    return engine


def run_engine(engine, workload: Workload) -> list[RequestResult]:
    """Serve the workload with an already started engine; returns one result per request."""
    from server.engine.admission import EngineRequest
    from server.engine.results import Completion
    from server.engine.sequence import SamplingParams

    async def send(r: Request, t0: float) -> tuple[float, float, list[int]]:
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0, ignore_eos=True)
        handle = engine.submit(EngineRequest(r.text, task=r.task, params=params))
        first = None
        completion = None
        async for item in handle.stream():
            if first is None and item.token_ids:
                first = time.perf_counter() - t0
            if isinstance(item, Completion):
                completion = item
        done = time.perf_counter() - t0
        return (first if first is not None else done), done, list(completion.token_ids)

    return asyncio.run(replay(workload, send))
