"""Throughput mode: every selected system serves the same workload at each concurrency.

Concurrency `c` is the most requests a system holds at once: promptswap's max_running, and the
batch size of the transformers baselines (one-at-a-time is 1 by construction, so it is measured
once and reused for every `c`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from benchmarks import baselines
from benchmarks.hf_generate import HFGenerator
from benchmarks.llama_cpp import SYSTEMS as LLAMA_CPP_SYSTEMS
from benchmarks.metrics import RequestResult, agreement, ratios, summarize
from benchmarks.threads import in_worker
from benchmarks.workload import Workload

OURS = "promptswap"
LLAMA_CPP = tuple(LLAMA_CPP_SYSTEMS)  # another process, another engine (benchmarks/llama_cpp.py)
# Order matters only for the table: ours first, then the ceilings, then what users do today.
SYSTEMS = (
    "promptswap",
    "promptswap-eager",  # --no-compile: the same engine without its compiled step (server/engine/compiled.py)
    "promptswap-http",
    "promptswap-no-prompts",
    *LLAMA_CPP,
    "static-no-prompts",
    "grouped-by-task",
    "one-at-a-time",
)
# Measured once and reused for every concurrency: it serves one request at a time by definition.
CONCURRENCY_ONE = {"one-at-a-time"}
# A system that sees no tasks is compared on the same texts, not the same prompts.
NO_PROMPTS = {"promptswap-no-prompts", "static-no-prompts", *LLAMA_CPP}


@dataclass
class Bench:
    """What the systems share: the workload, the transformers generator, the engine's base model."""

    workload: Workload
    hf: HFGenerator | None
    load_base: Callable[[], object]  # lazy: only engine systems need the second model copy
    max_tokens_per_step: int
    http: Callable | None = None  # (workload, concurrency) -> results; None: no HTTP service here
    llama_cpp: Callable | None = None  # (system, workload, concurrency) -> results; None: no GGUF to serve
    log: Callable[[str], None] = print
    _base: object = None

    @property
    def base(self):
        if self._base is None:
            self._base = self.load_base()
        return self._base


def run_system(bench: Bench, name: str, concurrency: int) -> list[RequestResult]:
    wl = bench.workload
    if name == "one-at-a-time":
        return baselines.run_one_at_a_time(bench.hf, wl)
    if name == "grouped-by-task":
        return baselines.run_grouped_by_task(bench.hf, wl, concurrency)
    if name == "static-no-prompts":
        return baselines.run_static_no_prompts(bench.hf, wl, concurrency)
    if name in ("promptswap", "promptswap-eager", "promptswap-no-prompts"):
        return _run_engine(bench, wl.without_tasks() if name == "promptswap-no-prompts" else wl, concurrency,
                           compile=name != "promptswap-eager")
    if name in LLAMA_CPP:
        if bench.llama_cpp is None:
            raise RuntimeError("llama.cpp serves the demo's GGUF file: use --model smollm2-135m-instruct")
        return bench.llama_cpp(name, wl.without_tasks(), concurrency)
    if name == "promptswap-http":
        if bench.http is None:
            raise RuntimeError("the HTTP service (server.api.app) is not available in this checkout")
        return bench.http(wl, concurrency)
    raise ValueError(f"unknown system {name!r}; expected one of {SYSTEMS}")


def _run_engine(bench: Bench, workload: Workload, concurrency: int, compile: bool = True) -> list[RequestResult]:
    from benchmarks import promptswap_engine as pe

    # A fresh engine per run: its prompt cache starts cold, so computing each task's prefix once
    # is part of what is measured. Its compiled step is made at its start (outside the measurement).
    engine = pe.start_engine(bench.base, pe.make_registry(bench.base, workload), concurrency,
                             bench.max_tokens_per_step, compile=compile)
    try:
        pe.run_engine(engine, warmup_workload(workload))  # first-call costs out of the measurement
        return pe.run_engine(engine, workload)
    finally:
        engine.shutdown(timeout_s=5.0)


def warmup_workload(workload: Workload, n: int = 2) -> Workload:
    """A couple of the workload's texts with no task and two new tokens: warms kernels, not caches (the texts
    begin differently, so no page of theirs is one a measured request could read from the prefix cache)."""
    reqs = tuple(replace(r, task=None, text=f"warm-up {r.text}", max_new_tokens=2, arrival_s=0.0)
                 for r in workload.requests[:n])
    return Workload({}, reqs)


def warm_hf(hf: HFGenerator, workload: Workload) -> None:
    """One call down each input path (padded batch, soft prompt, prefix cache): first-call costs out."""
    texts = [r.text for r in workload.requests[:2]]
    hf.generate(None, texts, [2] * len(texts))
    for kind in ("prompt", "prefix"):
        task = next((t for t in workload.tasks.values() if t.kind == kind), None)
        if task is not None:
            hf.generate(task, texts, [2] * len(texts))


def measure(bench: Bench, systems: list[str], concurrencies: list[int]) -> dict:
    """Run everything; returns {concurrency: {"summaries", "ratios", "agreement"}} plus raw results."""
    if bench.hf is not None:
        in_worker(warm_hf, bench.hf, bench.workload)
    by_c: dict[int, dict] = {}
    once: dict[str, tuple[list[RequestResult], dict]] = {}  # systems whose concurrency is always 1
    raw: dict[int, dict[str, list[RequestResult]]] = {}
    for c in concurrencies:
        results: dict[str, list[RequestResult]] = {}
        summaries: dict[str, dict] = {}
        for name in systems:
            if name in once:
                results[name], summaries[name] = once[name]
                continue
            run = partial(run_system, bench, name, c)
            # The engine computes in its own thread; the transformers baselines get one like it.
            results[name], summaries[name] = timed(bench.log, f"[c={c}] {name}",
                                                   run if name.startswith(OURS) else partial(in_worker, run))
            if name in CONCURRENCY_ONE:
                once[name] = (results[name], summaries[name])
        by_c[c] = {
            "summaries": summaries,
            "ratios": ratios(summaries, OURS) if OURS in summaries else {},
            "agreement": _agreement(results),
        }
        raw[c] = results
    return {"by_concurrency": by_c, "raw": raw}


def timed(log: Callable[[str], None], label: str, run: Callable[[], list[RequestResult]]
          ) -> tuple[list[RequestResult], dict]:
    """`run()`'s results and their summary, with the CPU cores the process kept busy meanwhile."""
    log(f"{label} ...")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    results = run()
    wall = time.perf_counter() - start
    s = summarize(results)
    # CPU seconds per wall second over all threads: well under the core count while a system
    # computes means other processes took the cores (its figures are then too low).
    s["cpu_cores_used"] = (_cpu_seconds() - cpu_start) / wall
    log(f"{label}: {s['tokens_per_s']:.1f} tok/s in {wall:.1f} s, {s['cpu_cores_used']:.2f} cores busy")
    return results, s


def _cpu_seconds() -> float:
    """This process's CPU time and that of its children that ended (a system served by a server process of
    its own, llama.cpp's, ends it before its results return)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _agreement(results: dict[str, list[RequestResult]]) -> dict[str, float]:
    """Each system's greedy tokens against the matching reference: one-at-a-time for tasked systems,
    transformers' static batch for the no-prompt ones (same model, same inputs, so should be equal), and
    llama.cpp's against promptswap's on the same texts (another engine's kernels: a rate, not a check)."""
    out = {}
    for name, res in results.items():
        refs = ["static-no-prompts" if name in NO_PROMPTS else "one-at-a-time"]
        if name in LLAMA_CPP:
            refs.append("promptswap-no-prompts")
        for ref in refs:
            if ref in results and ref != name:
                out[f"{name} vs {ref}"] = agreement(res, results[ref])
    return out
