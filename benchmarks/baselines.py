"""What users do today with transformers alone, replayed against the workload's arrival times.

Each baseline is a batching policy over `HFGenerator`: it waits for requests to arrive, picks a
batch from those waiting, runs `generate` to the end, and repeats. A request's latency is its
batch's end (static batching returns everything at once); its time to first token is when the
batch's first logits existed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from benchmarks.hf_generate import HFGenerator
from benchmarks.metrics import RequestResult
from benchmarks.workload import Request, Workload

Policy = Callable[[list[Request]], list[Request]]


def one_at_a_time(waiting: list[Request]) -> list[Request]:
    """The oldest request alone: a PEFT user's loop."""
    return waiting[:1]


def grouped_by_task(batch_size: int) -> Policy:
    """The oldest request's task, with up to `batch_size` waiting requests of that same task.

    A PeftModel holds one adapter at a time, so a batch cannot mix tasks: the best a user gets.
    """

    def pick(waiting: list[Request]) -> list[Request]:
        task = waiting[0].task
        return [r for r in waiting if r.task == task][:batch_size]

    return pick


def static_batches(batch_size: int) -> Policy:
    """Up to `batch_size` waiting requests, whatever their task (used for the no-task ceiling)."""

    def pick(waiting: list[Request]) -> list[Request]:
        return waiting[:batch_size]

    return pick


def serve(gen: HFGenerator, workload: Workload, policy: Policy) -> list[RequestResult]:
    """Replay the workload's arrivals; a batch holds one task (the policy must guarantee it)."""
    pending = sorted(workload.requests, key=lambda r: (r.arrival_s, r.id))
    waiting: list[Request] = []
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    while pending or waiting:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            waiting.append(pending.pop(0))
        if not waiting:
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        batch = policy(waiting)
        tasks = {r.task for r in batch}
        if len(tasks) != 1:
            raise AssertionError(f"a baseline batch must hold one task, got {sorted(map(str, tasks))}")
        out = gen.generate(
            workload.task_of(batch[0]), [r.text for r in batch], [r.max_new_tokens for r in batch]
        )
        for r, ids in zip(batch, out.token_ids, strict=True):
            waiting.remove(r)
            results.append(
                RequestResult(r.id, r.task, r.arrival_s, out.first_token_s - t0, out.done_s - t0, tuple(ids))
            )
    return sorted(results, key=lambda r: r.id)


def run_one_at_a_time(gen: HFGenerator, workload: Workload) -> list[RequestResult]:
    return serve(gen, workload, one_at_a_time)


def run_grouped_by_task(gen: HFGenerator, workload: Workload, batch_size: int) -> list[RequestResult]:
    return serve(gen, workload, grouped_by_task(batch_size))


def run_static_no_prompts(gen: HFGenerator, workload: Workload, batch_size: int) -> list[RequestResult]:
    return serve(gen, workload.without_tasks(), static_batches(batch_size))
