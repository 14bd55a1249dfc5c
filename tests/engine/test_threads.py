"""The engine thread keeps its torch threads when the rest of the process goes single-threaded."""

import threading

import torch

from server.engine import threads as cpu_threads


def test_a_thread_that_took_threads_keeps_them_when_others_drop_to_one():
    before = torch.get_num_threads()
    took, later = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def engine_like():
        seen["took"] = cpu_threads.take_threads(2)
        took.set()
        later.wait()
        seen["after"] = torch.get_num_threads()  # what its parallel ops will use

    worker = threading.Thread(target=engine_like)
    worker.start()
    took.wait()
    try:
        cpu_threads.single_threaded_here()
        fresh: dict[str, int] = {}
        other = threading.Thread(target=lambda: fresh.setdefault("n", torch.get_num_threads()))
        other.start()
        other.join()
        later.set()
        worker.join()
        assert seen == {"took": 2, "after": 2}
        assert torch.get_num_threads() == 1
        assert fresh["n"] == 1  # threads started afterwards run torch inline too
    finally:
        torch.set_num_threads(before)


def test_take_threads_defaults_to_torchs_own_count():
    got: dict[str, int] = {}
    worker = threading.Thread(target=lambda: got.setdefault("n", cpu_threads.take_threads()))
    worker.start()
    worker.join()
    assert got["n"] == cpu_threads.DEFAULT_THREADS >= 1
