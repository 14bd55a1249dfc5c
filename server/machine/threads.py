"""Who runs torch's CPU threads: the engine thread, alone.

libgomp (torch's OpenMP on Linux) gives every thread that runs a parallel op its own pool of
worker threads and keeps it until that thread exits. Once a process holds more pool threads than
cores, the workers stop spinning between parallel regions, so each of the thousand small ops of a
step pays a wake-up. Measured on 2 cores with a one-off script (SmolLM2-135M shape, a 64-request decode step in a
worker thread, alternating fresh processes): 221-258 ms when no other thread had run torch with
2 threads, 268-345 ms when the main thread had (it had loaded the model). So on CPU the engine
thread takes the intra-op threads and every other thread (startup, HTTP handlers, uploads) runs
torch inline on one thread, which costs them little: their tensors are small.

How many: `--threads`, else `usable_cpus()`, the cores this process may use. torch's own default counts
the machine's cores (its affinity at most), not a container's CPU quota, so under `--cpus 2` on a
64-core host it ran 64 threads that the quota then throttled. `serve` and `train` both count here.

torch is imported inside the functions: `serve --help` shows the default (server/engine/config.py)
without importing it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller alone or together with cpuacct, under either name.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The CPU cores this process may use: the CPUs it may run on (os.sched_getaffinity; os.cpu_count()
    where there is none), at most its cgroup CPU quota rounded down, at most OMP_NUM_THREADS when that is set
    (the usual way to cap a process's threads), and at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None:
        # Rounded down: a thread more than the quota gets the whole cgroup throttled each period.
        cpus = min(cpus, math.floor(quota))
    with contextlib.suppress(KeyError, ValueError):
        cpus = min(cpus, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (2.5: 250 ms of CPU time each 100 ms): the tightest of
    its own cgroup's and those above it, from cgroup v2's cpu.max ("quota period" or "max period") or v1's
    cpu.cfs_quota_us / cpu.cfs_period_us (-1: none). None when no quota is set or none can be read."""
    v2_path, v1_path = _own_cgroups(self_cgroup)
    found = []
    for directory in _up_to(cgroup_root, v2_path):
        with contextlib.suppress(OSError, ValueError):
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max":
                found.append(int(quota) / int(period))
    for mount in (cgroup_root / name for name in _V1_CPU_MOUNTS):
        for directory in _up_to(mount, v1_path):
            with contextlib.suppress(OSError, ValueError):
                quota_us = int((directory / "cpu.cfs_quota_us").read_text())
                if quota_us > 0:
                    found.append(quota_us / int((directory / "cpu.cfs_period_us").read_text()))
    return min((q for q in found if q > 0), default=None)


def _own_cgroups(self_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and its v1 cpu controller's path, from /proc/self/cgroup lines
    `0::/path` (v2) and `N:cpu,cpuacct:/path` (v1); "/" for what is not there."""
    v2, v1 = "/", "/"
    with contextlib.suppress(OSError):
        for line in self_cgroup.read_text().splitlines():
            number, controllers, path = [*line.split(":", 2), "", ""][:3]
            if number == "0" and not controllers:
                v2 = path or "/"
            elif "cpu" in controllers.split(","):
                v1 = path or "/"
    return v2, v1


def _up_to(mount: Path, cgroup_path: str) -> list[Path]:
    """The directory of `cgroup_path` under `mount` and each one above it, up to `mount` itself. A cgroup's
    limits bind the cgroups below it; in a container the path may name the host's cgroup, absent here."""
    directory = mount.joinpath(*[part for part in cgroup_path.split("/") if part not in ("", ".", "..")])
    return [directory, *[d for d in directory.parents if d.is_relative_to(mount)]]


def single_threaded_here() -> None:
    """This thread, and threads started after this call, run torch ops inline (no OpenMP pool).

    Call it in the main thread before any torch work (model loading included) when another thread
    is to do the heavy lifting: a pool made earlier in this thread lives as long as the thread."""
    import torch

    torch.set_num_threads(1)


def intra_op_threads(threads: int | None = None) -> int:
    """What `take_threads(threads)` gives: `threads`, or the cores this process may use."""
    return threads or usable_cpus()


def take_threads(threads: int | None = None) -> int:
    """Give the calling thread `threads` intra-op threads (default: `usable_cpus()`); returns the count."""
    import torch

    torch.set_num_threads(intra_op_threads(threads))
    # torch applies the process-wide count to a thread lazily, at its first parallel op; reading the
    # count does it now, so a later single_threaded_here() elsewhere cannot lower this thread's.
    return torch.get_num_threads()


@contextlib.contextmanager
def threads_for(threads: int | None = None) -> Iterator[int]:
    """`take_threads(threads)` in the calling thread for the block (yielding the count); its count before, after."""
    import torch

    before = torch.get_num_threads()
    try:
        yield take_threads(threads)
    finally:
        torch.set_num_threads(before)


def limit_interop_threads(threads: int | None = None) -> bool:
    """Size torch's inter-op pool (torch.jit.fork and the like) as `take_threads` sizes the intra-op one. torch
    allows it once per process, before any inter-op work: False (nothing changed) when it is too late."""
    import torch

    try:
        torch.set_num_interop_threads(intra_op_threads(threads))
    except RuntimeError:
        return False
    return True


# -- a busy machine ------------------------------------------------------------------------------------------


class CoreWatch:
    """How much of this process's CPUs other processes used since the last look, in cores, from the kernel's
    per-CPU counters (/proc/stat, the CPUs of this process's affinity) less this process's own (/proc/self/stat).
    None where they cannot be read (not Linux)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = set()
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(busy ticks of our CPUs, ticks of this process, wall seconds)."""
        try:
            busy = 0
            for line in (self.proc / "stat").read_text().splitlines():
                name, *fields = line.split()
                if name in self.cpus:
                    counts = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy += sum(counts) - counts[3] - counts[4]
            stat = (self.proc / "self" / "stat").read_text()
            own = stat[stat.rindex(")") + 2:].split()
            mine = int(own[11]) + int(own[12])  # utime, stime: every thread of this process
        except (OSError, ValueError, IndexError):
            return None
        return busy, mine, time.monotonic()

    def others_busy(self) -> float | None:
        """Cores' worth of CPU time other processes took on our CPUs since the last call."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] <= 0:
            return None
        others = ((now[0] - last[0]) - (now[1] - last[1])) / self.ticks
        return max(0.0, others / (now[2] - last[2]))


class AdaptiveThreads:
    """The engine's thread count when --threads is not set: all its cores while the machine is quiet, fewer
    while other processes use them. OpenMP's workers spin while they wait for work, so on cores another job is
    using, each of a step's thousand small parallel ops waits for a descheduled worker: measured here with a
    busy loop on both of 2 cores, a SmolLM2-135M forward took 926 ms with 2 threads and 134 ms with 1 (52.8 vs
    42.7 ms on a quiet machine). Looked at every `every_s` seconds by the engine thread, between steps."""

    def __init__(self, limit: int, watch: CoreWatch | None = None, every_s: float = 1.0,
                 first_look_s: float = 0.2) -> None:
        self.limit = limit
        self.watch = watch or CoreWatch()
        self.every_s = every_s
        self.current = limit
        # The first look comes soon: a server started on a busy machine should not serve its first requests
        # at the spinning pace for a whole period.
        self._next = time.monotonic() + first_look_s

    def target(self, others: float) -> int:
        """Threads for `others` cores' worth of other work: a core given up per core (rounded) they take, half
        a core of noise ignored; at least 1."""
        return max(1, min(self.limit, self.limit - math.ceil(others - 0.5)))

    def adjust(self) -> int | None:
        """The new thread count when it should change now (the caller sets it), else None."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        others = self.watch.others_busy()
        if others is None:
            return None
        wanted = self.target(others)
        if wanted == self.current:
            return None
        self.current = wanted
        return wanted
