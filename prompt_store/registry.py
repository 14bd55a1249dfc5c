"""The registry of task prompts: validated, versioned, persisted (prompt_store/backends), safe across threads.

Readers call `get(task)` and keep the returned PromptSnapshot for as long as their request runs:
a snapshot is immutable, so a later put, delete or sync of the same task never changes what a
running request sees. Writers (put/delete) are serialized; they change the store first and memory
second, so memory never serves a version the store does not hold. `sync()` brings memory up to a
store that other replicas also write (see prompt_store/sync.py for the poller that calls it).
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from prompt_store.backends import Current, Entry, NotStored, PromptBackend, Unreadable
from prompt_store.backends.local import LocalDirectory
from prompt_store.dtypes import dtype_name
from prompt_store.errors import BodyTooLarge, InvalidDefaults, PreconditionFailed, PromptError, UnknownTask
from prompt_store.format import PromptFile, read_path, read_prompt, tensor_sha256, write_prompt
from prompt_store.geometry import ModelGeometry
from prompt_store.preconditions import NO_PRECONDITIONS, Preconditions
from prompt_store.template import (
    check_defaults,
    check_description,
    check_system,
    encode_choices,
    encode_defaults,
    parse_defaults,
)
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
    template: str | None = None  # the text template it was trained with: requests' text goes in its {text}
    choices: tuple[str, ...] | None = None  # the answers it was trained to give (a classifier's labels)
    defaults: dict | None = None  # generation defaults its requests start from (never mutate: shared)
    system: str | None = None  # the chat system message its conversations get when they bring none

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
    template: str | None = None
    choices: tuple[str, ...] | None = None
    defaults: dict | None = None
    system: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, snap: PromptSnapshot, nbytes: int | None) -> PromptDescriptor:
        return cls(
            task=snap.task, kind=snap.kind, num_virtual_tokens=snap.num_virtual_tokens,
            dtype=dtype_name(snap.embeddings.dtype), bytes=nbytes, sha256=snap.sha256, version=snap.version,
            created_at=snap.created_at, source=snap.source, base_model=snap.base_model,
            description=snap.description, warnings=snap.warnings, template=snap.template, choices=snap.choices,
            defaults=dict(snap.defaults) if snap.defaults is not None else None, system=snap.system,
        )  # fmt: skip


class PromptRegistry:
    def __init__(
        self,
        geometry: ModelGeometry,
        directory: str | Path | None = None,
        *,
        backend: PromptBackend | None = None,
        dtype: torch.dtype = torch.float32,
        limits: RegistryLimits = RegistryLimits(),  # noqa: B008 -- frozen, so sharing the default is safe
        base_model_names: Iterable[str] = (),
        strict_base_model: bool = False,
        check_defaults: Callable[[dict], None] | None = None,
    ) -> None:
        """Persisted in `directory`, or in `backend` (an object store); with neither, in memory only.

        `base_model_names`: every name the served model goes by (served name, hub id, path, its config's
        own name). An adapter that records another base model is stored with a warning, or refused with
        BaseModelMismatch when `strict_base_model`. Without names nothing is checked. `check_defaults` checks
        a task's generation defaults' ranges (the engine's rule), raising InvalidDefaults."""
        if dtype not in SERVED_DTYPES:
            raise ValueError(f"dtype must be one of {SERVED_DTYPES}, got {dtype}")
        if backend is not None and directory is not None:
            raise ValueError("give a directory or a backend, not both")
        self.geometry = geometry
        self.dtype = dtype
        self.limits = limits
        self.served_names = frozenset(model_key(name) for name in base_model_names if name)
        self.strict_base_model = strict_base_model
        self.check_defaults = check_defaults
        self.backend: PromptBackend = backend or LocalDirectory(Path(directory) if directory is not None else None)
        self._snapshots: dict[str, PromptSnapshot] = {}
        self._descriptors: dict[str, PromptDescriptor] = {}  # every task, including files that failed
        self._tags: dict[str, str] = {}  # the stored tag each task was loaded or written under
        self._synced = threading.Event()  # set by the first complete load
        self._write_lock = threading.Lock()  # serializes writes and the application of a sync
        self._lock = threading.Lock()  # guards the dicts; held only for a lookup or a swap

    @property
    def directory(self) -> Path | None:
        return self.backend.directory

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def synced(self) -> bool:
        """Whether everything stored has been loaded once (at once for a store without persistence)."""
        return self._synced.is_set()

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
        return UnknownTask(f"unknown task {task!r}{self._did_you_mean(task)}", expected="a registered task",
                           actual=task)

    def _did_you_mean(self, task: str) -> str:
        """The served task names closest to a misspelt one (`; did you mean 'sentiment'?`), or ""."""
        with self._lock:
            served = list(self._snapshots)
        close = difflib.get_close_matches(task, served, n=3)
        return f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""

    # -- writing ---------------------------------------------------------------------------------

    def put(
        self,
        task: str,
        data: bytes,
        *,
        kind: str | None = None,
        config: dict | bytes | None = None,
        description: str | None = None,
        defaults: dict | None = None,
        when: Preconditions = NO_PRECONDITIONS,
    ) -> tuple[PromptSnapshot, bool]:
        """Add or replace `task` from safetensors bytes (+ PEFT config), if `when` holds. Returns
        (snapshot, created). `description` and `defaults`, when given, replace what the file records."""
        check_task_name(task)
        if len(data) > self.limits.max_bytes:
            raise BodyTooLarge(
                f"the prompt is {len(data)} bytes, over the limit of {self.limits.max_bytes} bytes",
                expected=self.limits.max_bytes, actual=len(data),
            )
        return self._put(task, read_prompt(data), kind=kind, config=config, description=description,
                         defaults=defaults, when=when)

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
        when: Preconditions, defaults: dict | None = None,
    ) -> tuple[PromptSnapshot, bool]:
        checked = self._check(source, kind=kind, config=config)
        warnings = self._base_model_warnings(task, checked)
        if description is not None and not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        if defaults is not None:
            defaults = self._check_defaults(defaults) or None  # {} means none, as a patch's {} does
        draft = PromptSnapshot(
            task=task, kind=checked.served_kind, num_virtual_tokens=checked.num_virtual_tokens,
            version=0, sha256=tensor_sha256(checked.embeddings), embeddings=checked.embeddings,
            created_at=time.time(), source=checked.source, base_model=checked.base_model,
            description=description if description is not None else checked.description, warnings=warnings,
            template=checked.template, choices=checked.choices,
            defaults=defaults if defaults is not None else checked.defaults, system=checked.system,
        )  # fmt: skip

        if draft.description is not None:  # before a version is used: an upload's, a file's or a patch's
            check_description(draft.description)

        def encode(version: int) -> bytes:
            # The file keeps the tensor as uploaded (not converted): a restart with another dtype loses
            # nothing. The version travels inside it, so equal weights stored twice differ in bytes.
            return write_prompt(checked.stored, _metadata(replace(draft, version=version)))

        with self._write_lock:
            written = self.backend.write(task, encode, when, self._current(task))
            snap = replace(draft, version=written.version)
            with self._lock:
                self._snapshots[task] = snap
                self._descriptors[task] = PromptDescriptor.of(snap, written.nbytes)
                self._tags[task] = written.tag
        log.info("prompt %s v%d stored (%s, %d virtual tokens)", task, snap.version, snap.kind, snap.num_virtual_tokens)
        return snap, written.created

    def patch(self, task: str, changes: dict, *, when: Preconditions = NO_PRECONDITIONS) -> PromptSnapshot:
        """Change a task's description, generation defaults and chat system message without new weights (a JSON
        merge patch, RFC 7396, over {"description", "defaults", "system"}), if `when` holds: a new version, the
        weights as stored."""
        if not isinstance(changes, dict):
            raise InvalidDefaults("a patch is a JSON object (a merge patch over description and defaults)",
                                  param="body", expected="an object", actual=type(changes).__name__)
        for key in changes:
            if key not in ("description", "defaults", "system"):
                raise InvalidDefaults(f"a patch changes description, defaults and system, not {key!r}", param=key,
                                      expected=["description", "defaults", "system"], actual=key)
        lost: PreconditionFailed | None = None
        for _ in range(3):  # another writer may land between the read and the write: read again
            source, version = self._stored(task)
            when.check(task, True, version)
            meta = dict(source.metadata)
            merged = merge_patch({"description": meta.get("description"), "system": meta.get("system"),
                                  "defaults": parse_defaults(meta["defaults"]) if "defaults" in meta else None},
                                 changes)
            assert isinstance(merged, dict)
            meta.pop("description", None)
            meta.pop("defaults", None)
            meta.pop("system", None)
            if merged.get("system") is not None:
                meta["system"] = check_system(merged["system"])
            if merged.get("description") is not None:
                meta["description"] = check_description(merged["description"])
            if merged.get("defaults") is not None:  # a non-object is refused, an empty one means none
                kept = self._check_defaults(merged["defaults"])
                if kept:
                    meta["defaults"] = encode_defaults(kept)
            try:
                snapshot, _ = self._put(task, PromptFile(source.embeddings, meta, source.config), kind=None,
                                        config=source.config, description=None,
                                        when=Preconditions(if_match=frozenset({version})))
                return snapshot
            except PreconditionFailed as exc:
                lost = exc
        assert lost is not None
        raise lost

    def _stored(self, task: str) -> tuple[PromptFile, int]:
        """The task as stored now (the store's bytes; for a registry without storage, what it serves) and
        its version."""
        try:
            data = self.backend.fetch(task, self.limits.max_bytes)
        except NotStored:
            snap = self.get(task)  # UnknownTask when there is none at all
            memory_only = isinstance(self.backend, LocalDirectory) and self.backend.directory is None
            if not memory_only:
                raise self._unknown(task) from None
            data = write_prompt(snap.embeddings, _metadata(snap))
        source = read_prompt(data)
        return source, _int(source.metadata.get("version")) or 0

    def _check_defaults(self, defaults: dict) -> dict:
        checked = check_defaults(defaults)
        if self.check_defaults is not None:
            self.check_defaults(checked)
        return checked

    def delete(self, task: str, *, when: Preconditions = NO_PRECONDITIONS) -> None:
        """Forget `task` and remove it from storage, if `when` holds. Snapshots already handed out stay valid."""
        with self._write_lock:
            try:
                self.backend.remove(task, when, self._current(task))
            except NotStored:
                error = self._unknown(task)
                with self._lock:  # gone from the store (another replica deleted it): stop serving it here too
                    self._forget(task)
                raise error from None
            with self._lock:
                self._forget(task)
        log.info("prompt %s deleted", task)

    def _forget(self, task: str) -> None:
        """Drop `task` from memory (the caller holds `_lock`)."""
        self._snapshots.pop(task, None)
        self._descriptors.pop(task, None)
        self._tags.pop(task, None)

    def _current(self, task: str) -> Current:
        """The task as this process serves it. A file that failed to load serves no version: it counts as
        absent for conditions and for `created`, yet it is listed (so it can be deleted)."""
        with self._lock:
            snapshot = self._snapshots.get(task)
            return Current(listed=task in self._descriptors,
                           version=snapshot.version if snapshot is not None else None)

    # -- loading ---------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load everything stored: startup's first load. A bad file is logged and listed, never fatal."""
        self.sync()

    def sync(self) -> int:
        """Bring memory up to the store: load new and changed tasks (by tag), drop removed ones. Returns
        how many tasks changed. Fetching runs without the write lock; a task this process wrote or
        deleted meanwhile is left as it wrote it (its own write is newer than the listing)."""
        with self._lock:  # before listing: a write from here on differs from it, so the sync leaves it be
            before = dict(self._tags)
        entries = self.backend.scan()
        if entries is None:
            self._synced.set()
            return 0
        loaded, gone = [], []
        for task, entry in sorted(entries.items()):
            if before.get(task) != entry.tag:
                try:
                    loaded.append(self._load(entry))
                except NotStored:  # removed since the listing
                    gone.append(task)
                except Unreadable as exc:  # this object alone: a served version stays, a new task is listed
                    log.warning("prompt %s in %s not loaded: %s", task, self.location, exc)
                    if before.get(task) is None:
                        unreadable = PromptDescriptor(task=task, bytes=entry.size, error=f"Unreadable: {exc}")
                        # A tag that never matches: the next sync tries again (the policy may be fixed).
                        loaded.append((replace(entry, tag=f"unreadable:{entry.tag}"), unreadable, 0))
        for _, _, version in loaded:
            self.backend.issued(version or 0)
        removed = [task for task in before if task not in entries or task in gone]
        changed = 0
        with self._write_lock:
            for task_entry, result, version in loaded:
                task = task_entry.task
                with self._lock:
                    if self._tags.get(task) != before.get(task):
                        continue  # written here since the listing
                    if isinstance(result, PromptDescriptor):
                        self._snapshots.pop(task, None)
                        self._descriptors[task] = result
                    else:
                        if version is None:  # a file put there by hand: give it a number
                            result = replace(result, version=self.backend.unversioned())
                        self._snapshots[task] = result
                        self._descriptors[task] = PromptDescriptor.of(result, task_entry.size)
                    self._tags[task] = task_entry.tag
                    changed += 1
            for task in removed:
                with self._lock:
                    if self._tags.get(task) != before.get(task):
                        continue
                    self._forget(task)
                    changed += 1
        failed = sum(1 for d in self.list() if d.error)
        if changed or not self._synced.is_set():
            log.info("loaded %d prompts from %s (%d failed, %d changed)", len(self), self.location, failed, changed)
        self._synced.set()
        return changed

    def _load(self, entry: Entry) -> tuple[Entry, PromptSnapshot | PromptDescriptor, int | None]:
        """One stored task, validated: (the entry read, its snapshot or a failed descriptor, its version)."""
        task = entry.task
        try:
            check_task_name(task)
            data, entry = self.backend.read(entry, self.limits.max_bytes)
            source = read_prompt(data)
            checked = self._check(source, kind=None, config=None)
            warnings = self._base_model_warnings(task, checked)
        except (PromptError, OSError) as exc:  # a StorageError (the store is down) aborts the whole sync
            error = f"{type(exc).__name__}: {exc}"
            log.warning("prompt %s in %s not loaded: %s", task, self.location, error)
            return entry, PromptDescriptor(task=task, bytes=entry.size, error=error), self.backend.version_hint(entry)
        meta = source.metadata
        version = _int(meta.get("version"))
        entry = replace(entry, size=len(data))
        snap = PromptSnapshot(
            task=task, kind=checked.served_kind, num_virtual_tokens=checked.num_virtual_tokens,
            version=version or 0, sha256=tensor_sha256(checked.embeddings), embeddings=checked.embeddings,
            created_at=_float(meta.get("created_at")) or entry.modified or time.time(), source=checked.source,
            base_model=checked.base_model, description=checked.description, warnings=warnings,
            template=checked.template, choices=checked.choices, defaults=checked.defaults, system=checked.system,
        )  # fmt: skip
        return entry, snap, version

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
        if checked.defaults is not None and self.check_defaults is not None:
            self.check_defaults(checked.defaults)
        return checked


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
    if snap.template is not None:
        meta["template"] = snap.template
    if snap.choices is not None:
        meta["choices"] = encode_choices(snap.choices)
    if snap.defaults:
        meta["defaults"] = encode_defaults(snap.defaults)
    if snap.system is not None:
        meta["system"] = snap.system
    return meta


def merge_patch(target: object, patch: object) -> object:
    """RFC 7396: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


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


