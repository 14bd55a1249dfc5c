"""The engine thread keeps its torch threads when the rest of the process goes single-threaded; by default
it takes the cores this process may use (affinity, within the cgroup CPU quota), read from fake cgroup files."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from server.machine import threads as cpu_threads


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


def test_take_threads_defaults_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 1)
    got: dict[str, int] = {}
    worker = threading.Thread(target=lambda: got.setdefault("n", cpu_threads.take_threads()))
    worker.start()
    worker.join()
    assert got["n"] == 1 and cpu_threads.intra_op_threads(3) == 3


def fake_cgroups(tmp_path, self_cgroup: str, files: dict[str, str]):
    """A cgroup mount under tmp_path (file path -> content) and a /proc/self/cgroup naming this process's."""
    for name, content in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(content)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "self").write_text(self_cgroup)
    return {"cgroup_root": tmp_path / "fs", "self_cgroup": tmp_path / "self"}


@pytest.mark.parametrize(("self_cgroup", "files", "affinity", "expected"), [
    # cgroup v2: the container's own cgroup at the root of the mount (a cgroup namespace)
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 16, 2),
    ("0::/\n", {"cpu.max": "max 100000\n"}, 16, 16),  # no quota: the affinity
    ("0::/\n", {"cpu.max": "250000 100000\n"}, 16, 2),  # 2.5 CPUs: rounded down
    ("0::/\n", {"cpu.max": "50000 100000\n"}, 16, 1),  # half a CPU: at least one
    ("0::/\n", {"cpu.max": "800000 100000\n"}, 3, 3),  # the affinity is the tighter
    # a systemd service's quota, in its own cgroup or one above it; the tightest binds
    ("0::/system.slice/app.service\n", {"system.slice/app.service/cpu.max": "300000 100000"}, 16, 3),
    ("0::/system.slice/app.service\n", {"system.slice/cpu.max": "400000 100000",
                                         "system.slice/app.service/cpu.max": "max 100000"}, 16, 4),
    ("0::/a/b\n", {"a/cpu.max": "100000 100000", "a/b/cpu.max": "500000 100000"}, 16, 1),
    ("0::/host/path/not/mounted\n", {"cpu.max": "300000 100000"}, 16, 3),  # the mount's own cgroup still binds
    # cgroup v1, cpu alone or with cpuacct
    ("4:memory:/x\n3:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
                                          "cpu,cpuacct/cpu.cfs_period_us": "50000\n"}, 16, 3),
    ("1:cpu:/docker/abc\n", {"cpu/docker/abc/cpu.cfs_quota_us": "200000", "cpu/docker/abc/cpu.cfs_period_us":
                             "100000"}, 16, 2),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8, 8),  # no quota
    ("", {}, 6, 6),  # no cgroup files at all (another OS)
    ("0::/\n", {"cpu.max": "garbage"}, 5, 5),  # unreadable: no quota
])
def test_usable_cpus_is_the_affinity_within_the_cgroup_quota(tmp_path, monkeypatch, self_cgroup, files, affinity,
                                                             expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads.usable_cpus(**fake_cgroups(tmp_path, self_cgroup, files)) == expected


@pytest.mark.parametrize(("value", "expected"), [("2", 2), ("64", 8), ("not a number", 8)])
def test_usable_cpus_keeps_within_omp_num_threads(tmp_path, monkeypatch, value, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads.usable_cpus(**fake_cgroups(tmp_path, "", {})) == expected


def test_usable_cpus_counts_the_cpus_where_there_is_no_affinity_call(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads.usable_cpus(**fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})) == 4
    assert cpu_threads.usable_cpus(**fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "max 100000"})) == 12


def test_usable_cpus_reads_this_machine():
    assert 1 <= cpu_threads.usable_cpus() <= (os.cpu_count() or 1)


def test_threads_for_gives_the_threads_back():
    before = torch.get_num_threads()
    with cpu_threads.threads_for(1) as taken:
        assert taken == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow  # a fresh interpreter
def test_the_interop_pool_is_sized_once_before_torch_works():
    # A fresh process: torch allows it once per process, and this one's pool may have started already.
    code = ("import torch; from server.machine.threads import limit_interop_threads as limit; "
            "assert limit(1) and torch.get_num_interop_threads() == 1; assert not limit(2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_engine_gives_up_a_core_per_core_other_processes_take():
    from server.machine.threads import AdaptiveThreads

    adaptive = AdaptiveThreads(limit=8, watch=FakeWatch([]))
    assert [adaptive.target(others) for others in (0.0, 0.4, 0.6, 1.4, 1.6, 3.2, 7.9, 20)] == [8, 8, 7, 7, 6, 5, 1, 1]
    assert AdaptiveThreads(limit=2, watch=FakeWatch([])).target(2.0) == 1


class FakeWatch:
    def __init__(self, readings):
        self.readings = list(readings)

    def others_busy(self):
        return self.readings.pop(0) if self.readings else None


def test_it_changes_the_count_only_when_the_load_does_and_at_most_once_a_period(monkeypatch):
    from server.machine import threads

    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    adaptive = threads.AdaptiveThreads(limit=2, watch=FakeWatch([2.0, 1.9, 0.1, None]), every_s=1.0,
                                       first_look_s=1.0)
    assert adaptive.adjust() is None  # not yet a period
    clock[0] += 1.0
    assert adaptive.adjust() == 1  # both cores busy with others: one thread
    assert adaptive.adjust() is None  # within the period: not looked at
    clock[0] += 1.0
    assert adaptive.adjust() is None  # still busy: unchanged
    clock[0] += 1.0
    assert adaptive.adjust() == 2  # quiet again
    clock[0] += 1.0
    assert adaptive.adjust() is None  # unreadable: as it was


def test_the_core_watch_reads_other_processes_from_the_kernels_counters(tmp_path, monkeypatch):
    from server.machine import threads

    clock = [50.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    (tmp_path / "self").mkdir()
    allowed = sorted(os.sched_getaffinity(0))

    def write(busy_ticks: int, own_ticks: int) -> None:
        lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]  # the machine's total: not read
        lines += [f"cpu{c} {busy_ticks if c in allowed else 10**6} 0 0 1000 7 0 0 0 0 0" for c in range(512)]
        (tmp_path / "stat").write_text("\n".join(lines) + "\n")
        # a process name with spaces and parentheses, as /proc/self/stat may show it
        (tmp_path / "self" / "stat").write_text(f"1 (a (b) c) S {' '.join(['0'] * 10)} {own_ticks} 0 0\n")

    write(0, 0)
    watch = threads.CoreWatch(tmp_path)
    watch.ticks = 100
    write(50, 30)  # each allowed CPU 0.5 s busier in one second, 0.3 s of it ours
    clock[0] += 1.0
    assert watch.others_busy() == pytest.approx(0.5 * len(allowed) - 0.3)
    clock[0] += 1.0
    assert watch.others_busy() == 0.0  # nothing moved: an idle machine
    assert threads.CoreWatch(tmp_path / "absent").others_busy() is None  # not Linux: nothing to say
