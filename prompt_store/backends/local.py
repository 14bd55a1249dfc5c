"""A local directory of prompt files: one `<task>.safetensors` per task, written only by this process.

Versions are one counter for the whole directory, kept above every version the directory ever held:
a delete leaves an empty marker whose *name* records the highest version issued so far, because the
file deleted may have held it and versions must never repeat after a restart. A name and not
content, so that a delete needs no free block on a full disk: the task's own file is renamed to the
marker and truncated, which frees its space.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from prompt_store.backends import Current, Entry, NotStored, Written
from prompt_store.errors import OutsidePromptDirectory, storage_error
from prompt_store.format import TEMP_PREFIX, TEMP_SUFFIX, atomic_write, fsync_dir, peek_metadata, read_bytes_limited
from prompt_store.preconditions import Preconditions

log = logging.getLogger("prompt_store.registry")  # one logger for the store, whichever backend

SUFFIX = ".safetensors"
VERSION_MARKER = ".promptswap-version-"
LEGACY_VERSION_FILE = ".promptswap-version"  # the floor as file content, written by earlier releases


class LocalDirectory:
    """`directory` None keeps nothing on disk (tests, tools): versions are still never repeated."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.location = str(directory) if directory is not None else "(memory)"
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._last_version = 0

    # -- reading ---------------------------------------------------------------------------------

    def scan(self) -> dict[str, Entry] | None:
        if self.directory is None:
            return None
        self._last_version = max(self._last_version, self._read_version_floor())
        entries = {}
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX):
                # Left by a write that crashed before its rename: the old file is intact.
                log.warning("removing %s, left by an interrupted write", path.name)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if path.suffix != SUFFIX or path.name.startswith(".") or not path.is_file():
                continue
            entries[path.stem] = self._entry(path.stem)
        self._remove_old_markers()
        return entries

    def read(self, entry: Entry, max_bytes: int) -> tuple[bytes, Entry]:
        path = self._path(entry.task)
        self._check_inside(path)
        return read_bytes_limited(path, max_bytes), entry

    def fetch(self, task: str, max_bytes: int) -> bytes:
        if self.directory is None or not self._path(task).is_file():
            raise NotStored(task)
        return self.read(Entry(task, tag=""), max_bytes)[0]

    def version_hint(self, entry: Entry) -> int:
        return _int(peek_metadata(self._path(entry.task)).get("version")) or 0

    def issued(self, version: int) -> None:
        self._last_version = max(self._last_version, version)

    def unversioned(self) -> int:
        self._last_version += 1
        return self._last_version

    def changed(self) -> bool:
        return False

    # -- writing (the registry holds its write lock around these) -------------------------------

    def write(self, task: str, encode: Callable[[int], bytes], when: Preconditions, current: Current) -> Written:
        when.check(task, current.version is not None, current.version)
        # A version is consumed even if the write below fails, so no number is ever issued twice.
        self._last_version += 1
        blob = encode(self._last_version)
        tag = ""
        if self.directory is not None:
            with self._storage("store", task):
                atomic_write(self._path(task), blob)  # a failed write leaves the old file, whole
            tag = self._entry(task).tag
        return Written(self._last_version, tag, len(blob), created=current.version is None)

    def remove(self, task: str, when: Preconditions, current: Current) -> None:
        if not current.listed:  # a 404 either way: conditions only count where the answer would be 2xx (RFC 9110)
            raise NotStored(task)
        when.check(task, current.version is not None, current.version)
        if self.directory is not None:
            with self._storage("delete", task):
                self._remove_file(task)

    # -- files -----------------------------------------------------------------------------------

    def _path(self, task: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{task}{SUFFIX}"

    def _entry(self, task: str) -> Entry:
        path = self._path(task)
        try:
            info = path.stat()
        except OSError:
            return Entry(task, tag="unreadable")
        return Entry(task, tag=f"{info.st_ino}:{info.st_mtime_ns}:{info.st_size}", size=info.st_size,
                     modified=info.st_mtime)

    def _check_inside(self, path: Path) -> None:
        """Only files that resolve inside the prompt directory are served: a symlink must not reach out."""
        assert self.directory is not None
        target = path.resolve()
        if not target.is_relative_to(self.directory.resolve()):
            raise OutsidePromptDirectory(
                f"{path.name} is a symbolic link to {target}, outside the prompt directory {self.directory}; "
                "it is not served", expected=str(self.directory), actual=str(target),
            )

    @contextlib.contextmanager
    def _storage(self, action: str, task: str) -> Iterator[None]:
        """Turn the prompt directory's OSErrors into a StorageError, logged once, without a traceback."""
        try:
            yield
        except OSError as exc:
            error = storage_error(exc, action=action, task=task, directory=self.directory)
            log.error("%s", error)
            raise error from exc

    def _remove_file(self, task: str) -> None:
        """Remove the task's file and record the version floor in one rename, which needs no free space."""
        assert self.directory is not None
        path = self._path(task)
        marker = self.directory / f"{VERSION_MARKER}{self._last_version}"
        try:
            os.replace(path, marker)  # the link itself, if it is one
        except FileNotFoundError:  # removed by hand meanwhile: the floor still needs recording
            marker.touch()
        else:
            _empty_if_only_ours(marker)
        fsync_dir(self.directory)
        self._remove_old_markers()

    def _version_markers(self) -> dict[Path, int]:
        assert self.directory is not None
        markers = {}
        for path in self.directory.glob(f"{VERSION_MARKER}*"):
            version = _int(path.name[len(VERSION_MARKER):])
            if version is not None:
                markers[path] = version
        return markers

    def _remove_old_markers(self) -> None:
        """Only the highest marker counts; the others are removed where the directory allows."""
        markers = self._version_markers()
        if len(markers) < 2:
            return
        top = max(markers.values())
        for path, version in markers.items():
            if version < top:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _read_version_floor(self) -> int:
        assert self.directory is not None
        floor = max(self._version_markers().values(), default=0)
        legacy = self.directory / LEGACY_VERSION_FILE
        try:
            floor = max(floor, int(legacy.read_text().strip()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", legacy, exc)
        return floor


def _empty_if_only_ours(marker: Path) -> None:
    """Free the deleted task's bytes, but only if nothing else holds them: a symbolic link's target or a
    hard link's other names keep theirs, and the marker becomes a fresh empty file instead."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:  # a symbolic link (ELOOP): never write through it
        _replace_with_empty(marker)
        return
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            os.ftruncate(fd, 0)
            return
    except OSError as exc:  # the task is gone from disk either way; only its bytes linger
        log.warning("could not truncate %s: %s", marker.name, exc)
        return
    finally:
        os.close(fd)
    _replace_with_empty(marker)


def _replace_with_empty(marker: Path) -> None:
    marker.unlink()
    marker.touch()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
