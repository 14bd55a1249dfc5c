"""`python -m benchmarks.run --workload NAME`: the KV-memory workloads of issue 12, each run on its own.

    python -m benchmarks.run --workload mixed-lengths
    python -m benchmarks.run --workload shared-prefix
    python -m benchmarks.run --workload many-tasks
    python -m benchmarks.run --workload mixed-lengths --requests 16 --max-new-tokens 8,128   # a quick look

Each prints a table with promptswap's ratios, the memory figures the engine reports (`Engine.stats()`)
and the issue's targets, met or not, and writes `<out>/<workload>.json` and `<out>/<workload>.png`.
Every request has a task (`--no-task-fraction 0`), all arrive at once (`--arrival burst`) and ignore
EOS, so lengths are exact. `--concurrency` (one value, 64) is the engine's max_running and the
transformers baseline's batch size; each workload has its own systems (`--systems` is the standard
workload's). Defaults per workload; any option given on the command line wins:

mixed-lengths  64 requests over 16 tasks (8-64 virtual tokens, texts of 32-128 tokens); 4 of them
    (`--long-requests`, picked by the seed) ask for 1,024 new tokens, the others for 32
    (`--max-new-tokens SHORT,LONG`). The engine's kv_cache_bytes is the budget in which the old rule
    (before pages: admit while running x longest max_total_len x bytes per position <= kv_cache_bytes)
    admits 16 at once (`--old-rule-running`), from the workload's own token counts. Against
    static-no-prompts: transformers' static batches of the same texts and lengths, no task.
    Targets: >= 3x its tokens/s; all the requests running at once (`peak_running`).
shared-prefix  64 requests of one task, a soft prompt of 64 virtual tokens (`--virtual-tokens 64`),
    64 new tokens each. The KV pages in use at the fullest moment of the run (the most requests
    running, then the most pages: `Engine.stats()` polled every few milliseconds) against a copy of
    every position per request (64 x (virtual + text + new) positions: what the slots of old stored).
    Targets: the prefix held once (kv_pages_shared == ceil(64 / 16) = 4 pages) while all 64 run, and
    fewer bytes than the copies. Against grouped-by-task: transformers' batch of the task's requests,
    which copies the soft prompt into every row.
many-tasks  256 requests over 1,000 tasks, 64 new tokens each, prompt_cache_bytes holding the idle
    prefixes of about 100 tasks (`--cached-tasks`). Tasks are covered evenly, so each request asks for
    a task no other asks for (256 of the 1,000; all are random, so which does not matter) and every
    prefix is computed: the prompt cache's worst case. Against the same requests (same texts and
    lengths) over 16 tasks, with the same engine settings. Target: >= 0.8x its tokens/s; the
    prompt-cache hits and misses of both.
shared-system-prompt  64 requests over 16 tasks (`--no-task-fraction 0`), every text an instruction of
    800 tokens (`--instruction-tokens`, the same for all) followed by the request's own 32-128 tokens,
    64 new tokens each. promptswap with automatic prefix caching against the same engine with
    `prefix_caching=False`. The instruction's pages are computed once per task (its keys and values
    depend on the task's prefix) and read by the task's other requests. Targets: p50 TTFT >= 4x
    better, tokens/s >= 2x; the cache's queried and hit tokens.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from benchmarks import baselines, report
from benchmarks import promptswap_engine as pe
from benchmarks.hf_generate import HFGenerator
from benchmarks.metrics import RequestResult, agreement, ratios, to_dict
from benchmarks.threads import in_worker
from benchmarks.throughput import timed, warm_hf, warmup_workload
from benchmarks.workload import (
    Request,
    Workload,
    WorkloadSpec,
    embedding_std,
    make_workload,
    plain_vocab,
    random_text,
)
from server.engine.pages import PAGE_SIZE, pages_for

_COMMON = {"no_task_fraction": 0.0, "arrival": "burst", "concurrency": [64], "virtual_tokens": (8, 64),
           "text_len": (32, 128)}
# run.py's options, per workload.
DEFAULTS = {
    "mixed-lengths": _COMMON | {"requests": 64, "tasks": 16, "max_new_tokens": (32, 1024), "long_requests": 4,
                                "old_rule_running": 16},
    "shared-prefix": _COMMON | {"requests": 64, "tasks": 1, "virtual_tokens": (64, 64), "max_new_tokens": (64, 64)},
    "many-tasks": _COMMON | {"requests": 256, "tasks": 1000, "max_new_tokens": (64, 64), "cached_tasks": 100},
    "shared-system-prompt": _COMMON | {"requests": 64, "tasks": 16, "max_new_tokens": (64, 64),
                                       "instruction_tokens": 800},
}
WORKLOADS = tuple(DEFAULTS)
FEW_TASKS = 16  # many-tasks' comparison
POLL_S = 0.005  # how often Engine.stats() is read during a run (a decode step takes far longer)


# -- serving and measuring -----------------------------------------------------------------------


class FullestMoment:
    """Reads `Engine.stats()` from a thread of its own while a run lasts and keeps the fullest moment:
    the most requests running, then the most KV pages in use. The stats at the end count too."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.fullest = engine.stats()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="benchmark-stats", daemon=True)

    def _see(self, stats) -> None:
        if (stats.running, stats.kv_pages_used) > (self.fullest.running, self.fullest.kv_pages_used):
            self.fullest = stats

    def _poll(self) -> None:
        while not self._done.wait(POLL_S):
            self._see(self.engine.stats())

    def __enter__(self) -> FullestMoment:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._see(self.engine.stats())


def serve(base, workload: Workload, max_running: int, max_tokens_per_step: int,
          **settings) -> tuple[list[RequestResult], dict]:
    """`workload` on a fresh engine (warmed first, cold prompt cache); its results and what the engine
    reported: at the fullest moment of the run and at its end (counters since the engine started)."""
    engine = pe.start_engine(base, pe.make_registry(base, workload), max_running, max_tokens_per_step, **settings)
    try:
        pe.run_engine(engine, warmup_workload(workload))
        with FullestMoment(engine) as watch:
            results = pe.run_engine(engine, workload)
        end = engine.stats()
        return results, {"fullest": asdict(watch.fullest), "end": asdict(end), "page_bytes": engine.page_bytes,
                         "kv_budget_bytes": end.kv_budget_bytes, "max_running": max_running, "settings": settings}
    finally:
        engine.shutdown(timeout_s=5.0)


@dataclass
class Systems:
    """One workload's systems, measured one after another for one table."""

    args: argparse.Namespace  # run.py's options
    base: object  # the engine's model (server.model.model_loader.BaseModel)
    model_path: str
    log: Callable[[str], None]
    results: dict[str, list[RequestResult]] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    engine: dict[str, dict] = field(default_factory=dict)  # serve()'s report, per engine system

    @property
    def concurrency(self) -> int:
        return self.args.concurrency[0]

    def promptswap(self, name: str, workload: Workload, **settings) -> dict:
        def run() -> list[RequestResult]:
            results, self.engine[name] = serve(self.base, workload, self.concurrency, self.args.max_tokens_per_step,
                                               **settings)
            return results

        self.results[name], self.summaries[name] = timed(self.log, name, run)
        return self.engine[name]

    def transformers(self, name: str, workload: Workload, policy: Callable) -> None:
        """A baseline of benchmarks/baselines.py, in a thread of its own like in the standard workload."""
        from benchmarks.run import load_hf

        hf = HFGenerator(*load_hf(self.model_path, self.args.device, self.args.dtype))
        in_worker(warm_hf, hf, workload)
        self.results[name], self.summaries[name] = timed(
            self.log, name, partial(in_worker, policy, hf, workload, self.concurrency))

    def tokens_per_s(self) -> dict[str, float]:
        return {name: s["tokens_per_s"] for name, s in self.summaries.items()}


@dataclass
class Outcome:
    """What a workload adds to the table: its figures, its targets and its plot's second panel."""

    title: str
    ours: str
    spec: WorkloadSpec
    workload: Workload
    figures: dict
    targets: dict[str, dict]
    panel: tuple[str, dict[str, float]]
    extra: dict = field(default_factory=dict)  # more of the workload's own description, for the JSON


def target(what: str, measured: float, goal: float, met: bool) -> dict:
    return {"what": what, "measured": measured, "target": goal, "met": bool(met)}


def position_bytes(base) -> int:
    """Bytes one position's keys and values cost over all layers, in the engine's dtype."""
    from server.engine.kv import PagedKV

    g = base.geometry
    return PagedKV.position_bytes(g.num_layers, g.num_kv_heads, g.head_dim, base.dtype)


def max_total_len(workload: Workload, r: Request) -> int:
    """The positions a request may hold by its end: virtual + text + new tokens (as Sequence counts them)."""
    task = workload.task_of(r)
    return (task.num_virtual if task is not None else 0) + r.num_text_tokens + r.max_new_tokens


# -- the workloads -------------------------------------------------------------------------------


def mixed_lengths(s: Systems, spec: WorkloadSpec, make: Callable[[WorkloadSpec], Workload]) -> Outcome:
    short, long = spec.max_new_tokens
    plain = make(replace(spec, max_new_tokens=(short, short)))
    if not 0 <= s.args.long_requests <= len(plain.requests):
        raise ValueError(f"--long-requests must be between 0 and {len(plain.requests)}")
    longs = sorted(random.Random(spec.seed + 2).sample(range(len(plain.requests)), s.args.long_requests))
    workload = Workload(plain.tasks, tuple(replace(r, max_new_tokens=long) if r.id in longs else r
                                           for r in plain.requests))
    bpp = position_bytes(s.base)
    longest = max(max_total_len(workload, r) for r in workload.requests)
    budget = s.args.old_rule_running * longest * bpp
    engine = s.promptswap("promptswap", workload, kv_cache_bytes=budget)
    s.transformers("static-no-prompts", workload, baselines.run_static_no_prompts)
    n = len(workload.requests)
    ratio = ratios(s.summaries, "promptswap")["static-no-prompts"]["tokens_per_s"]
    peak = engine["end"]["peak_running"]
    figures = {
        "bytes_per_position": bpp, "longest_max_total_len": longest, "kv_cache_bytes": budget,
        "old_rule_running": budget // (longest * bpp), "peak_running": peak,
        "preemptions": engine["end"]["preemptions"], "kv_pages_total": engine["end"]["kv_pages_total"],
        "kv_pages_used_fullest": engine["fullest"]["kv_pages_used"],
    }  # fmt: skip
    return Outcome(
        title=f"{n} requests over {len(workload.tasks)} tasks, {len(longs)} of {long} new tokens and "
              f"{n - len(longs)} of {short}, KV budget of {figures['old_rule_running']} under the old rule",
        ours="promptswap", spec=spec, workload=workload, figures=figures,
        targets={
            "tokens_per_s_ratio": target(">= 3x static-no-prompts tokens/s", ratio, 3.0, ratio >= 3.0),
            "all_running": target(f"all {n} requests running at once", peak, n, peak == n),
        },
        panel=("requests running at once", {"promptswap (peak)": peak, "old rule": figures["old_rule_running"]}),
        extra={"long_request_ids": longs},
    )  # fmt: skip


def shared_prefix(s: Systems, spec: WorkloadSpec, make: Callable[[WorkloadSpec], Workload]) -> Outcome:
    workload = make(spec)
    engine = s.promptswap("promptswap", workload)
    s.transformers("grouped-by-task", workload, baselines.run_grouped_by_task)
    n = len(workload.requests)
    bpp = position_bytes(s.base)
    fullest = engine["fullest"]
    in_use = fullest["kv_pages_used"] * engine["page_bytes"]
    copies = sum(max_total_len(workload, r) for r in workload.requests) * bpp
    tasks = {r.task for r in workload.requests} - {None}
    prefix_pages = sum(pages_for(workload.tasks[t].num_virtual) for t in tasks)
    figures = {
        "bytes_per_position": bpp, "page_bytes": engine["page_bytes"], "running_fullest": fullest["running"],
        "peak_running": engine["end"]["peak_running"], "kv_pages_used_fullest": fullest["kv_pages_used"],
        "kv_pages_shared_fullest": fullest["kv_pages_shared"], "prefix_pages_expected": prefix_pages,
        "kv_bytes_in_use_fullest": in_use, "per_request_copy_bytes": copies, "in_use_over_copies": in_use / copies,
        "preemptions": engine["end"]["preemptions"],
        "agreement_promptswap_vs_grouped": agreement(s.results["promptswap"], s.results["grouped-by-task"]),
    }  # fmt: skip
    virtual = sorted({workload.tasks[t].num_virtual for t in tasks})
    return Outcome(
        title=f"{n} requests of {len(tasks)} task(s) with {'/'.join(map(str, virtual))} virtual tokens",
        ours="promptswap", spec=spec, workload=workload, figures=figures,
        targets={
            "prefix_held_once": target(f"kv_pages_shared == {prefix_pages} (the prefix's pages, once)",
                                       fullest["kv_pages_shared"], prefix_pages,
                                       fullest["kv_pages_shared"] == prefix_pages),
            "all_running": target(f"all {n} requests running at the fullest moment", fullest["running"], n,
                                  fullest["running"] == n),
            "below_copies": target("KV bytes in use / a copy per request < 1", in_use / copies, 1.0, in_use < copies),
        },
        panel=("KV MiB, fullest moment", {"promptswap (pages in use)": in_use / 2**20,
                                          "a copy per request": copies / 2**20}),
    )  # fmt: skip


def many_tasks(s: Systems, spec: WorkloadSpec, make: Callable[[WorkloadSpec], Workload]) -> Outcome:
    many, few = make(spec), make(replace(spec, num_tasks=FEW_TASKS))
    # The task count is the only difference: the same seeded texts and lengths.
    assert [(r.text, r.max_new_tokens) for r in many.requests] == [(r.text, r.max_new_tokens) for r in few.requests]
    page_bytes = PAGE_SIZE * position_bytes(s.base)
    mean_pages = sum(pages_for(t.num_virtual) for t in many.tasks.values()) / len(many.tasks)
    cache = max(1, round(s.args.cached_tasks * mean_pages * page_bytes))
    ours, theirs = f"promptswap, {len(many.tasks)} tasks", f"promptswap, {len(few.tasks)} tasks"
    for name, workload in ((ours, many), (theirs, few)):
        s.promptswap(name, workload, prompt_cache_bytes=cache)
    ratio = ratios(s.summaries, ours)[theirs]["tokens_per_s"]
    figures = {"prompt_cache_bytes": cache, "cached_tasks": s.args.cached_tasks}
    for name in (ours, theirs):
        end = s.engine[name]["end"]
        figures[name] = {"tasks_asked": len({r.task for r in s.results[name]}),
                         "prompt_cache_hits": end["prompt_cache_hits"],
                         "prompt_cache_misses": end["prompt_cache_misses"],
                         "preemptions": end["preemptions"], "peak_running": end["peak_running"]}  # fmt: skip
    return Outcome(
        title=f"{len(many.requests)} requests over {len(many.tasks)} tasks against {len(few.tasks)}, "
              f"idle prefixes of ~{s.args.cached_tasks} tasks cached",
        ours=ours, spec=spec, workload=many, figures=figures,
        targets={"tokens_per_s_ratio": target(f">= 0.8x the tokens/s over {len(few.tasks)} tasks", ratio, 0.8,
                                              ratio >= 0.8)},
        panel=("task prefixes computed (prompt-cache misses)",
               {name: figures[name]["prompt_cache_misses"] for name in (ours, theirs)}),
        extra={"compare_tasks": len(few.tasks)},
    )  # fmt: skip


def shared_system_prompt(s: Systems, spec: WorkloadSpec, make: Callable[[WorkloadSpec], Workload]) -> Outcome:
    own = make(spec)
    tokenizer = s.base.tokenizer
    instruction, instruction_tokens = random_text(tokenizer, plain_vocab(tokenizer), s.args.instruction_tokens,
                                                  random.Random(spec.seed + 3))
    requests = []
    for r in own.requests:
        text = f"{instruction}\n{r.text}"
        requests.append(replace(r, text=text, num_text_tokens=len(tokenizer(text)["input_ids"])))
    workload = Workload(own.tasks, tuple(requests))
    ours, theirs = "promptswap", "promptswap, no prefix caching"
    cached = s.promptswap(ours, workload)
    s.promptswap(theirs, workload, prefix_caching=False)
    ttft = s.summaries[theirs]["p50_ttft_s"] / s.summaries[ours]["p50_ttft_s"]
    speed = s.summaries[ours]["tokens_per_s"] / s.summaries[theirs]["tokens_per_s"]
    end = cached["end"]
    figures = {
        "instruction_tokens": instruction_tokens, "tasks": len({r.task for r in workload.requests}),
        "prefix_cache_queries": end["prefix_cache_queries"], "prefix_cache_hits": end["prefix_cache_hits"],
        "hit_rate": end["prefix_cache_hits"] / max(1, end["prefix_cache_queries"]),
        "p50_ttft_better": ttft, "tokens_per_s_better": speed, "preemptions": end["preemptions"],
        "agreement_cached_vs_not": agreement(s.results[ours], s.results[theirs]),
        "p50_ttft_better_bound": _median_prefill_bound(workload, instruction_tokens),
    }  # fmt: skip
    return Outcome(
        title=f"{len(requests)} requests over {figures['tasks']} tasks sharing a {instruction_tokens}-token "
              "instruction, each with its own text",
        ours=ours, spec=spec, workload=workload, figures=figures,
        targets={  # issue 30's: the first issue's 4x TTFT proved out of reach (the bound above, ~3.5x here)
            "ttft": target(">= 90% of the bound on p50 TTFT better with prefix caching", ttft,
                           0.9 * figures["p50_ttft_better_bound"], ttft >= 0.9 * figures["p50_ttft_better_bound"]),
            "tokens_per_s": target(">= 2.5x tokens/s with prefix caching", speed, 2.5, speed >= 2.5),
        },
        panel=("p50 TTFT s", {name: s.summaries[name]["p50_ttft_s"] for name in (ours, theirs)}),
        extra={"instruction_tokens": instruction_tokens},
    )  # fmt: skip


def _median_prefill_bound(workload: Workload, instruction_tokens: int) -> float:
    """The most prefix caching can better p50 TTFT here while a prefill token costs the same: text tokens
    computed before the median request's first token without caching (the first half, in arrival order),
    over the fewest with it in any order (the instructions of as few tasks as hold half the requests, each
    computed once per task since its keys and values depend on the task's prefix, plus the half's smallest
    texts of their own)."""
    half = (len(workload.requests) + 1) // 2
    per_task: dict[str | None, int] = {}
    for r in workload.requests:
        per_task[r.task] = per_task.get(r.task, 0) + 1
    tasks_needed, covered = 0, 0
    for count in sorted(per_task.values(), reverse=True):
        if covered >= half:
            break
        tasks_needed, covered = tasks_needed + 1, covered + count
    own = sorted(r.num_text_tokens - instruction_tokens for r in workload.requests)
    best = tasks_needed * instruction_tokens + sum(own[:half])
    return sum(r.num_text_tokens for r in workload.requests[:half]) / best


RUNS = {"mixed-lengths": mixed_lengths, "shared-prefix": shared_prefix, "many-tasks": many_tasks,
        "shared-system-prompt": shared_system_prompt}


def run(args, model_path: str, log: Callable[[str], None]) -> dict:
    """Run `args.workload`: print its table, figures and targets, draw its plot; returns the JSON payload."""
    from benchmarks.run import _describe, spec_from

    start = time.perf_counter()
    base = pe.load_base(model_path, args.device, args.dtype)
    std = embedding_std(base.model)
    systems = Systems(args, base, model_path, log)
    out = RUNS[args.workload](systems, spec_from(args),
                              lambda spec: make_workload(spec, base.geometry, std, base.tokenizer))
    ratio_table = ratios(systems.summaries, out.ours)
    print(f"\n== {args.workload}: {out.title} ==")
    print(report.table(systems.summaries, ratio_table, out.ours))
    for key, value in out.figures.items():
        print(f"  {key}: {_show(value)}")
    for t in out.targets.values():
        print(f"  target {t['what']}: {'met' if t['met'] else 'NOT MET'} ({_show(t['measured'])})")
    plot = args.out / f"{args.workload}.png"
    report.plot_bars(plot, {"generated tokens / s": systems.tokens_per_s(), out.panel[0]: out.panel[1]},
                     f"{Path(model_path).name}, {args.workload}: {out.title}")
    print(f"wrote {plot}")
    return {
        "workload": args.workload,
        "spec": asdict(out.spec) | out.extra,
        "description": _describe(out.workload),
        "settings": {"max_running": systems.concurrency, "max_tokens_per_step": args.max_tokens_per_step,
                     "page_size": PAGE_SIZE, "stats_poll_s": POLL_S},
        "summaries": systems.summaries,
        "ratios": ratio_table,
        "engine": systems.engine,
        "figures": out.figures,
        "targets": out.targets,
        "requests": {name: [to_dict(r) for r in res] for name, res in systems.results.items()},
        "total_s": time.perf_counter() - start,
    }


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    return str(value)
