"""A directory built once and reused: the demo model, a converted GGUF checkpoint.

Built beside the target and renamed into place with a completion marker, so a crash (or a second
server starting at the same time) never leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, made by `build(empty_dir)` unless a complete copy is already there."""
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished directory is an ordinary one
        (tmp / COMPLETE_MARKER).write_text("complete\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first, or a stale incomplete copy is in the way
            if not (target / COMPLETE_MARKER).exists():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
