"""Conditional writes: a put or delete that happens only if the task is at the version the writer saw.

A task's version is its entity tag (HTTP's ETag, quoted: `"7"`). Versions are never issued twice for a
task, across deletes and restarts (registry.py), so an old tag can never match a newer prompt. The
check runs under the registry's write lock, so two writers racing on one task cannot both pass it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prompt_store.errors import PreconditionFailed

Any_ = Literal["*"]
ANY: Any_ = "*"


@dataclass(frozen=True, slots=True)
class Preconditions:
    """`if_match`: write only if the task exists at one of these versions ("*": exists at all).
    `if_none_match`: write only if it is at none of them ("*": does not exist). None: no condition."""

    if_match: frozenset[int] | Any_ | None = None
    if_none_match: frozenset[int] | Any_ | None = None

    def check(self, task: str, exists: bool, version: int | None) -> None:
        """Raise PreconditionFailed unless both conditions hold for the task as it is now."""
        now = f'task {task!r} is at version {version} (ETag "{version}")' if exists else f"task {task!r} does not exist"
        if self.if_match is not None:
            holds = exists and (self.if_match == ANY or (version is not None and version in self.if_match))
            if not holds:
                raise PreconditionFailed(f"If-Match {_show(self.if_match)} does not hold: {now}",
                                         param="If-Match", current_version=version)
        if self.if_none_match is not None:
            broken = exists and (self.if_none_match == ANY or (version is not None and version in self.if_none_match))
            if broken:
                raise PreconditionFailed(f"If-None-Match {_show(self.if_none_match)} does not hold: {now}",
                                         param="If-None-Match", current_version=version)


NO_PRECONDITIONS = Preconditions()


def _show(tags: frozenset[int] | Any_) -> str:
    return "*" if tags == ANY else ", ".join(f'"{v}"' for v in sorted(tags)) or "(no usable strong tag)"
