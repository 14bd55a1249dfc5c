"""The registry of task prompts: validated, versioned, persisted one file per task, safe across threads.

Readers call `get(task)` and keep the returned PromptSnapshot for as long as their request runs:
a snapshot is immutable, so a later put or delete of the same task never changes what a running
request sees. Writers (put/delete) are serialized; they change the disk first and memory second,
so memory never serves a version the disk does not hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from prompt_store.dtypes import dtype_name
from prompt_store.errors import (
    BodyTooLarge,
    OutsidePromptDirectory,
    PromptError,
    UnknownTask,
    storage_error,
)
from prompt_store.format import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    PromptFile,
    atomic_write,
    fsync_dir,
    peek_metadata,
    read_bytes_limited,
    read_path,
    read_prompt,
    tensor_sha256,
    write_prompt,
)
from prompt_store.geometry import ModelGeometry
from prompt_store.preconditions import NO_PRECONDITIONS, Preconditions
from prompt_store.validate import (
    SERVED_DTYPES,
    CheckedPrompt,
    Kind,
    RegistryLimits,
    base_model_mismatch,
    check_prompt,
    check_task_name,
    model_key,
)

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# A delete leaves an empty marker whose *name* records the highest version issued so far: the file
# deleted may have held it, and versions must never repeat after a restart. A name and not content,
# so that a delete needs no free block on a full disk: the task's own file is renamed to the marker
# and truncated, which frees its space.
VERSION_MARKER = ".promptswap-version-"
LEGACY_VERSION_FILE = ".promptswap-version"  # the floor as file content, written by earlier releases


@dataclass(frozen=True, slots=True, eq=False)
class PromptSnapshot:
    """One immutable version of a task's prompt. Never mutate `embeddings`: other requests share it."""

    task: str
    kind: Kind
    num_virtual_tokens: int
    version: int
    sha256: str  # of `embeddings`' bytes (see format.tensor_sha256)
    embeddings: torch.Tensor = field(repr=False)  # CPU, registry dtype, finite: [n, hidden] or [n, L*2*kv_dim]
    created_at: float
    source: Literal["file", "peft"]
    base_model: str | None = None
    description: str | None = None
    warnings: tuple[str, ...] = ()  # noticed when it was stored (an adapter recorded for another model)

    @property
    def key(self) -> tuple[str, int]:
        """Unique per put in this process: what the engine caches derived tensors under."""
        return (self.task, self.version)


@dataclass(frozen=True, slots=True)
class PromptDescriptor:
    """What describe/list report. Fields other than task/bytes/error are None for a file that failed."""

    task: str
    kind: str | None = None
    num_virtual_tokens: int | None = None
    dtype: str | None = None  # the served dtype
    bytes: int | None = None  # size of the stored file
    sha256: str | None = None
    version: int | None = None
    created_at: float | None = None
    source: str | None = None
    base_model: str | None = None
    description: str | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, snap: PromptSnapshot, nbytes: int | None) -> PromptDescriptor:
        return cls(
            task=snap.task, kind=snap.kind, num_virtual_tokens=snap.num_virtual_tokens,
            dtype=dtype_name(snap.embeddings.dtype), bytes=nbytes, sha256=snap.sha256, version=snap.version,
            created_at=snap.created_at, source=snap.source, base_model=snap.base_model,
            description=snap.description, warnings=snap.warnings,
        )  # fmt: skip


class PromptRegistry:
    def __init__(
        self,
        geometry: ModelGeometry,
        directory: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        limits: RegistryLimits = RegistryLimits(),  # noqa: B008 -- frozen, so sharing the default is safe
        base_model_names: Iterable[str] = (),
        strict_base_model: bool = False,
    ) -> None:
        """`base_model_names`: every name the served model goes by (served name, hub id, path, its config's
        own name). An adapter that records another base model is stored with a warning, or refused with
        BaseModelMismatch when `strict_base_model`. Without names nothing is checked."""
        if dtype not in SERVED_DTYPES:
            raise ValueError(f"dtype must be one of {SERVED_DTYPES}, got {dtype}")
        self.geometry = geometry
        self.dtype = dtype
        self.limits = limits
        self.served_names = frozenset(model_key(name) for name in base_model_names if name)
        self.strict_base_model = strict_base_model
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._snapshots: dict[str, PromptSnapshot] = {}
        self._descriptors: dict[str, PromptDescriptor] = {}  # every task, including files that failed
        self._last_version = 0
        self._write_lock = threading.Lock()  # serializes put/delete/load_all, held across disk I/O
        self._lock = threading.Lock()  # guards the two dicts; held only for a lookup or a swap

    # -- reading ---------------------------------------------------------------------------------

    def get(self, task: str) -> PromptSnapshot:
        with self._lock:
            snap = self._snapshots.get(task)
        if snap is None:
            raise self._unknown(task)
        return snap

    def describe(self, task: str) -> PromptDescriptor:
        with self._lock:
            desc = self._descriptors.get(task)
        if desc is None:
            raise self._unknown(task)
        return desc

    def list(self) -> list[PromptDescriptor]:
        with self._lock:
            return [self._descriptors[t] for t in sorted(self._descriptors)]

    def __contains__(self, task: object) -> bool:
        with self._lock:
            return task in self._snapshots

    def __len__(self) -> int:
        with self._lock:
            return len(self._snapshots)

    def _unknown(self, task: str) -> UnknownTask:
        """Why `task` is not served. A name no task can have is a bad request (InvalidTaskName), not an
        unknown task; a listed file (even one with a malformed name) is described and deletable."""
        with self._lock:
            desc = self._descriptors.get(task)
        if desc is None:
            check_task_name(task)
        if desc is not None and desc.error:
            return UnknownTask(
                f"task {task!r} is not served: its file failed to load ({desc.error})",
                expected="a loaded task", actual=task,
            )
        return UnknownTask(f"unknown task {task!r}", expected="a registered task", actual=task)

    # -- writing ---------------------------------------------------------------------------------

    def put(
        self,
        task: str,
        data: bytes,
        *,
        kind: str | None = None,
        config: dict | bytes | None = None,
        description: str | None = None,
        when: Preconditions = NO_PRECONDITIONS,
    ) -> tuple[PromptSnapshot, bool]:
        """Add or replace `task` from safetensors bytes (+ PEFT config), if `when` holds. Returns
        (snapshot, created)."""
        check_task_name(task)
        if len(data) > self.limits.max_bytes:
            raise BodyTooLarge(
                f"the prompt is {len(data)} bytes, over the limit of {self.limits.max_bytes} bytes",
                expected=self.limits.max_bytes, actual=len(data),
            )
        return self._put(task, read_prompt(data), kind=kind, config=config, description=description, when=when)

    def put_path(
        self, task: str, path: str | Path, *, kind: str | None = None, description: str | None = None,
        when: Preconditions = NO_PRECONDITIONS,
    ) -> tuple[PromptSnapshot, bool]:
        """Add or replace `task` from a PEFT adapter directory or a .safetensors (or legacy .bin) file."""
        check_task_name(task)
        return self._put(
            task, read_path(path, max_bytes=self.limits.max_bytes), kind=kind, config=None,
            description=description, when=when,
        )  # fmt: skip

    def _put(
        self, task: str, source: PromptFile, *, kind: str | None, config, description: str | None,
        when: Preconditions,
    ) -> tuple[PromptSnapshot, bool]:
        checked = self._check(source, kind=kind, config=config)
        warnings = self._base_model_warnings(task, checked)
        if description is not None and not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        sha = tensor_sha256(checked.embeddings)
        with self._write_lock:
            self._check_preconditions(task, when)
            # A version is consumed even if the write below fails, so no number is ever issued twice.
            self._last_version += 1
            snap = PromptSnapshot(
                task=task, kind=checked.served_kind, num_virtual_tokens=checked.num_virtual_tokens,
                version=self._last_version, sha256=sha, embeddings=checked.embeddings,
                created_at=time.time(), source=checked.source, base_model=checked.base_model,
                description=description if description is not None else checked.description, warnings=warnings,
            )  # fmt: skip
            # The file keeps the tensor as uploaded (not converted): a restart with another dtype
            # loses nothing.
            blob = write_prompt(checked.stored, _metadata(snap))
            if self.directory is not None:
                with self._storage("store", task):
                    atomic_write(self._path(task), blob)  # a failed write leaves the old file, whole
            with self._lock:
                created = task not in self._snapshots
                self._snapshots[task] = snap
                self._descriptors[task] = PromptDescriptor.of(snap, len(blob))
        log.info("prompt %s v%d stored (%s, %d virtual tokens)", task, snap.version, snap.kind, snap.num_virtual_tokens)
        return snap, created

    def delete(self, task: str, *, when: Preconditions = NO_PRECONDITIONS) -> None:
        """Forget `task` and remove its file, if `when` holds. Snapshots already handed out stay valid."""
        with self._write_lock:
            with self._lock:
                known = task in self._descriptors
            if not known:  # a 404 either way: conditions only count where the answer would be 2xx (RFC 9110)
                raise self._unknown(task)
            self._check_preconditions(task, when)
            if self.directory is not None:
                with self._storage("delete", task):
                    self._remove_file(task)
            with self._lock:
                self._snapshots.pop(task, None)
                self._descriptors.pop(task, None)
        log.info("prompt %s deleted", task)

    def _check_preconditions(self, task: str, when: Preconditions) -> None:
        """Under the write lock: the task as it is now against the writer's conditions. A file that failed
        to load serves no version: it counts as absent, as it does for `created`."""
        with self._lock:
            snapshot = self._snapshots.get(task)
        when.check(task, snapshot is not None, snapshot.version if snapshot is not None else None)

    # -- persistence -----------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every prompt file in the directory. A bad file is logged and listed, never fatal."""
        if self.directory is None:
            return
        with self._write_lock:
            good: list[tuple[str, CheckedPrompt, dict[str, str], int, Path, tuple[str, ...]]] = []
            failed: dict[str, PromptDescriptor] = {}
            highest = max(self._last_version, self._read_version_floor())
            for path in sorted(self.directory.iterdir()):
                if path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX):
                    # Left by a write that crashed before its rename: the old file is intact.
                    log.warning("removing %s, left by an interrupted write", path.name)
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                if path.suffix != SUFFIX or path.name.startswith(".") or not path.is_file():
                    continue
                task = path.stem
                try:
                    check_task_name(task)
                    self._check_inside(path)
                    data = read_bytes_limited(path, self.limits.max_bytes)
                    source = read_prompt(data)
                    checked = self._check(source, kind=None, config=None)
                    warnings = self._base_model_warnings(task, checked)
                except (PromptError, OSError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("prompt file %s not loaded: %s", path.name, error)
                    failed[task] = PromptDescriptor(task=task, bytes=_size(path), error=error)
                    highest = max(highest, _peek_version(path))
                    continue
                version = _int(source.metadata.get("version"))
                highest = max(highest, version or 0)
                good.append((task, checked, source.metadata, len(data), path, warnings))
            snapshots: dict[str, PromptSnapshot] = {}
            descriptors = dict(failed)
            for task, checked, meta, nbytes, path, warnings in good:
                version = _int(meta.get("version"))
                if version is None:  # a file put there by hand: give it a fresh number
                    highest += 1
                    version = highest
                snap = PromptSnapshot(
                    task=task, kind=checked.served_kind, num_virtual_tokens=checked.num_virtual_tokens,
                    version=version, sha256=tensor_sha256(checked.embeddings), embeddings=checked.embeddings,
                    created_at=_float(meta.get("created_at")) or path.stat().st_mtime, source=checked.source,
                    base_model=checked.base_model, description=checked.description, warnings=warnings,
                )  # fmt: skip
                snapshots[task] = snap
                descriptors[task] = PromptDescriptor.of(snap, nbytes)
            self._last_version = highest
            self._remove_old_markers()
            with self._lock:
                self._snapshots = snapshots
                self._descriptors = descriptors
        log.info("loaded %d prompts from %s (%d failed)", len(snapshots), self.directory, len(failed))

    def _check_inside(self, path: Path) -> None:
        """Only files that resolve inside the prompt directory are served: a symlink must not reach out."""
        assert self.directory is not None
        target = path.resolve()
        if not target.is_relative_to(self.directory.resolve()):
            raise OutsidePromptDirectory(
                f"{path.name} is a symbolic link to {target}, outside the prompt directory {self.directory}; "
                "it is not served", expected=str(self.directory), actual=str(target),
            )

    def _base_model_warnings(self, task: str, checked: CheckedPrompt) -> tuple[str, ...]:
        """() when the adapter's recorded base model is the served one (or unrecorded); else its warning,
        logged once, or BaseModelMismatch when strict."""
        mismatch = base_model_mismatch(checked.base_model, self.served_names)
        if mismatch is None:
            return ()
        if self.strict_base_model:
            raise mismatch
        log.warning("prompt %s: %s", task, mismatch.message)
        return (mismatch.message,)

    def _check(self, source: PromptFile, *, kind: str | None, config) -> CheckedPrompt:
        checked = check_prompt(
            source, geometry=self.geometry, limits=self.limits, dtype=self.dtype, kind=kind, config=config
        )
        assert checked.kind is not None, "with a geometry, check_prompt resolves the kind or raises"
        return checked

    def _path(self, task: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{task}{SUFFIX}"

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


def _metadata(snap: PromptSnapshot) -> dict[str, str]:
    meta = {
        "task": snap.task,
        "kind": snap.kind,
        "num_virtual_tokens": str(snap.num_virtual_tokens),
        "version": str(snap.version),
        "created_at": repr(snap.created_at),
        "source": snap.source,
    }
    if snap.base_model is not None:
        meta["base_model"] = snap.base_model
    if snap.description is not None:
        meta["description"] = snap.description
    return meta


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _peek_version(path: Path) -> int:
    """The version recorded in a file that failed validation (0 if unreadable): it was issued once."""
    return _int(peek_metadata(path).get("version")) or 0
