"""The prepared GPU check runs its whole path on the CPU with tiny shapes (a GPU session runs it for real), so
it does not rot between the sessions that are lent a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_the_cpu_and_passes_its_fidelity():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fidelity PASSED" in done.stdout
    assert "tok/s" in done.stdout and "tiny" in done.stdout
