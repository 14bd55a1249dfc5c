"""Real filesystem faults for storage tests: a small tmpfs that fills up, a read-only remount, an
immutable directory. Root ignores permission bits, so chmod would prove nothing; these need mount
and chattr, and skip with the reason where the machine does not allow them."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` mounted at `path` for the duration; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


def remount_readonly(path: Path) -> None:
    done = _run("mount", "-o", "remount,ro", str(path))
    if done.returncode != 0:
        pytest.fail(f"could not remount {path} read-only: {done.stderr.strip()}")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """`chattr +i path` for the duration; skips where the tool or the filesystem does not support it."""
    done = _run("chattr", "+i", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} immutable here (chattr +i): {(done.stderr or done.stdout).strip()}")
    try:
        yield path
    finally:
        _run("chattr", "-i", str(path))


def fill(directory: Path) -> None:
    """Write filler into `directory` until its filesystem has no block left."""
    for name, chunk in (("filler", b"\0" * 65536), ("filler-tail", b"\0")):  # then whatever a chunk left
        with open(directory / name, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
