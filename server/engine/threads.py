"""Who runs torch's CPU threads: the engine thread, alone.

libgomp (torch's OpenMP on Linux) gives every thread that runs a parallel op its own pool of
worker threads and keeps it until that thread exits. Once a process holds more pool threads than
cores, the workers stop spinning between parallel regions, so each of the thousand small ops of a
step pays a wake-up. Measured on 2 cores with a one-off script (SmolLM2-135M shape, a 64-request decode step in a
worker thread, alternating fresh processes): 221-258 ms when no other thread had run torch with
2 threads, 268-345 ms when the main thread had (it had loaded the model). So on CPU the engine
thread takes the intra-op threads and every other thread (startup, HTTP handlers, uploads) runs
torch inline on one thread, which costs them little: their tensors are small.
"""

from __future__ import annotations

import torch

# torch's default, read at import: callers below lower the process-wide setting.
DEFAULT_THREADS = torch.get_num_threads()


def single_threaded_here() -> None:
    """This thread, and threads started after this call, run torch ops inline (no OpenMP pool).

    Call it in the main thread before any torch work (model loading included) when another thread
    is to do the heavy lifting: a pool made earlier in this thread lives as long as the thread."""
    torch.set_num_threads(1)


def intra_op_threads(threads: int | None = None) -> int:
    """What `take_threads(threads)` gives: `threads`, or torch's default."""
    return threads or DEFAULT_THREADS


def take_threads(threads: int | None = None) -> int:
    """Give the calling thread `threads` intra-op threads (default: torch's); returns the count."""
    torch.set_num_threads(intra_op_threads(threads))
    # torch applies the process-wide count to a thread lazily, at its first parallel op; reading the
    # count does it now, so a later single_threaded_here() elsewhere cannot lower this thread's.
    return torch.get_num_threads()
