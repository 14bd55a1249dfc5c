"""TTFT mode: time to first token of one request alone, against the task's num_virtual_tokens.

promptswap runs a soft prompt through the model once (its first use) and then serves it as a
precomputed KV prefix, so a request computes only its own text. The transformers baseline feeds
`cat(prompt, embed(ids))` every time, so it recomputes the virtual tokens per request.
Reported: the median over `repeats` warm requests, and promptswap's first (cold) use.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.hf_generate import HFGenerator
from benchmarks.threads import in_worker
from benchmarks.workload import Request, Task, Workload

VIRTUAL_TOKENS = (1, 16, 64, 256)


def make_tasks(sizes, hidden: int, embed_std: float, seed: int) -> dict[str, Task]:
    gen = torch.Generator().manual_seed(seed)
    return {f"ttft-{n}": Task(f"ttft-{n}", "prompt", torch.randn(n, hidden, generator=gen) * embed_std)
            for n in sizes}


def baseline_ttft(hf: HFGenerator, task: Task, text: str, repeats: int) -> float:
    hf.generate(task, [text], [1])  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = hf.generate(task, [text], [1])
        times.append(out.first_token_s - start)
    return statistics.median(times)


def engine_ttft(engine, task: Task, text: str, repeats: int) -> tuple[float, float]:
    """(first use, median of warm uses): the first one includes computing the task's prefix."""
    first = _one(engine, task.name, text)
    return first, statistics.median(_one(engine, task.name, text) for _ in range(repeats))


def _one(engine, task: str, text: str) -> float:
    from server.engine.admission import EngineRequest
    from server.engine.sequence import SamplingParams

    start = time.perf_counter()
    handle = engine.submit(EngineRequest(text, task=task, params=SamplingParams(max_new_tokens=1, ignore_eos=True)))
    for item in handle:  # blocking iteration; the first item carries the first token
        if item.token_ids:
            return time.perf_counter() - start
    raise RuntimeError("the engine finished without a token")


def _baseline_rows(hf: HFGenerator, rows: list[dict], tasks: dict[str, Task], text: str, repeats: int) -> None:
    hf.generate(None, [text], [1])
    for row, task in zip(rows, tasks.values(), strict=True):
        row["ttft_s"]["one-at-a-time"] = baseline_ttft(hf, task, text, repeats)


def measure(hf: HFGenerator | None, load_base, text: str, sizes, embed_std: float, repeats: int, seed: int,
            systems: set[str]) -> list[dict]:
    tasks = make_tasks(sizes, hf.geometry.hidden_size if hf else load_base().geometry.hidden_size, embed_std, seed)
    rows = [{"num_virtual": n, "ttft_s": {}} for n in sizes]
    if hf is not None and "one-at-a-time" in systems:
        in_worker(_baseline_rows, hf, rows, tasks, text, repeats)
    if "promptswap" in systems:
        from benchmarks import promptswap_engine as pe

        base = load_base()
        wl = Workload(tasks, (Request(0, None, text, 0, 1, 0.0),))
        engine = pe.start_engine(base, pe.make_registry(base, wl), max_running=1, max_tokens_per_step=4096)
        try:
            _one(engine, None, text)  # warm the model, not the prompt cache
            for row, task in zip(rows, tasks.values(), strict=True):
                first, warm = engine_ttft(engine, task, text, repeats)
                row["ttft_s"]["promptswap"] = warm
                row["ttft_s"]["promptswap-first-use"] = first
        finally:
            engine.shutdown(timeout_s=5.0)
    return rows


def growth(rows: list[dict]) -> dict[str, float]:
    """TTFT at the largest num_virtual_tokens over TTFT at the smallest, per system."""
    lo, hi = rows[0]["ttft_s"], rows[-1]["ttft_s"]
    return {name: hi[name] / lo[name] for name in lo if name in hi and lo[name] > 0}
