"""Torch's CPU threads in a benchmark run: every system computes in a thread of its own.

promptswap's engine owns the process's one OpenMP pool while it runs (server/machine/threads.py says
why: a second pool slows every step). To keep the comparison fair, the main thread runs torch on
one thread and each transformers baseline runs in a fresh thread holding the same number of
threads as the engine; that thread's pool ends with it, before the next system starts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from server.machine import threads as cpu_threads

T = TypeVar("T")

_threads: int | None = None  # --threads; None: torch's default


def configure(threads: int | None) -> None:
    """Call first thing in main, before any model loads."""
    global _threads
    _threads = threads
    cpu_threads.single_threaded_here()


def engine_threads() -> int | None:
    return _threads


def in_worker(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a fresh thread with the benchmark's torch threads; re-raises its error."""
    out: dict = {}

    def work() -> None:
        cpu_threads.take_threads(_threads)
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            out["error"] = exc

    worker = threading.Thread(target=work, name="benchmark-system")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
