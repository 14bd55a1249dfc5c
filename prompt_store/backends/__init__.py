"""Where task prompts persist. The registry (memory, validation, snapshots) is the same whatever the
backend; a backend only moves bytes and decides versions:

- `LocalDirectory` (local.py): one file per task in a directory, one server. The default.
- `ObjectStore` (s3.py): one object per task in S3-compatible storage, shared by any number of
  replicas; conditional requests guard every write. Needs the `[s3]` extra (boto3), imported only here.

A backend allocates the version inside `write`, because only it knows what "the current version" is:
this process's memory for a directory only it writes, the store itself for an object store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prompt_store.preconditions import Preconditions

if TYPE_CHECKING:
    from prompt_store.backends.local import LocalDirectory
    from prompt_store.backends.s3 import ObjectStore

S3_SCHEME = "s3://"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored task as a listing shows it. `tag` changes whenever the stored bytes do (S3: the ETag),
    so a replica reloads a task only when its tag moved."""

    task: str
    tag: str
    size: int | None = None
    modified: float | None = None  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class Current:
    """What this process serves for a task when a write starts: the truth for a directory only it writes."""

    listed: bool  # described, even as a file that failed to load
    version: int | None  # the served version; None: not served (absent, or failed to load)


@dataclass(frozen=True, slots=True)
class Written:
    version: int
    tag: str
    nbytes: int
    created: bool  # no version of the task was stored before


class NotStored(LookupError):
    """remove() or read() of a task the backend does not hold (read: removed since it was listed)."""


class Unreadable(Exception):
    """One stored task cannot be read (access denied to that object, an archived object): that task fails,
    the rest of the store loads."""


class PromptBackend(Protocol):
    @property
    def location(self) -> str:
        """For logs and messages: a directory, or s3://bucket/prefix."""

    @property
    def directory(self) -> Path | None:
        """The local directory, if that is what it is."""

    def scan(self) -> dict[str, Entry] | None:
        """Every stored task (None: nothing is persisted, so there is nothing to load)."""

    def read(self, entry: Entry, max_bytes: int) -> tuple[bytes, Entry]:
        """A task's bytes and the entry they were read under (its tag may have moved since the listing);
        NotStored if it was removed since."""

    def fetch(self, task: str, max_bytes: int) -> bytes:
        """The task's stored bytes as they are now; NotStored if there are none (or nothing is persisted)."""

    def version_hint(self, entry: Entry) -> int:
        """The version recorded by a stored task that failed to load (0 if unknown): it was issued once."""

    def issued(self, version: int) -> None:
        """A version found in the store: never issue it again (where versions are this process's to issue)."""

    def unversioned(self) -> int:
        """The version to serve a stored task under whose file records none (put there by hand)."""

    def write(self, task: str, encode: Callable[[int], bytes], when: Preconditions, current: Current) -> Written:
        """Store `encode(version)` as the task's new version, if `when` holds for the task as stored."""

    def remove(self, task: str, when: Preconditions, current: Current) -> None:
        """Remove the task, if `when` holds; NotStored if there is none."""

    def changed(self) -> bool:
        """Cheaply: may anything have changed since the last call? (False where only this process writes.)"""


def open_backend(where: str | Path | None, *, endpoint_url: str | None = None,
                 timeout_s: float = 10.0) -> LocalDirectory | ObjectStore:
    """`s3://bucket/prefix` is an object store; anything else a local directory (None: memory only)."""
    if isinstance(where, str) and where.startswith(S3_SCHEME):
        from prompt_store.backends.s3 import ObjectStore

        return ObjectStore(where, endpoint_url=endpoint_url, timeout_s=timeout_s)
    from prompt_store.backends.local import LocalDirectory

    return LocalDirectory(Path(where) if where is not None else None)
