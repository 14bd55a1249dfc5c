"""What the served systems' clients share: the workload replayed at its arrival times, and a free port.

Each system says how one request is sent (`Send`); `replay` sends every request at its arrival time,
concurrently, and keeps what each saw, relative to the start of the run.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from benchmarks.metrics import RequestResult
from benchmarks.workload import Request, Workload

# (request, t0) -> (first token time, end time, token ids), both times relative to t0 (perf_counter)
Send = Callable[[Request, float], Awaitable[tuple[float, float, list[int]]]]


async def replay(workload: Workload, send: Send) -> list[RequestResult]:
    """Every request of `workload` sent at its arrival time; one result each, in id order."""
    t0 = time.perf_counter()

    async def one(r: Request) -> RequestResult:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
        first, done, ids = await send(r, t0)
        return RequestResult(r.id, r.task, r.arrival_s, first, done, tuple(ids))

    results = await asyncio.gather(*(one(r) for r in workload.requests))
    return sorted(results, key=lambda r: r.id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
