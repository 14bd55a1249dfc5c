"""S3-compatible object storage: one object per task, shared by every replica (`pip install "promptswap[s3]"`).

Layout under `s3://bucket/prefix/`:
    <task>.safetensors      the task; its version is inside (the safetensors metadata), so equal
                            weights stored twice still differ in bytes and in ETag; also copied into
                            the object's user metadata, so a HEAD tells it
    .tombstones/<task>      the highest version a deleted task ever had, so a re-created task starts
                            above it and an old If-Match can never match a newer object
    .changes                a small marker every write replaces: a replica polls it with a
                            conditional HEAD (304 when nothing moved) and lists only when it moved

Every write is conditional on what it read (PUT/DELETE with If-Match on the object's ETag, or
If-None-Match: * to create), so two replicas racing on one task can never interleave into a state
neither wrote: the loser re-reads and tries again, or fails the client's own condition (412).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prompt_store.backends import S3_SCHEME, Current, Entry, NotStored, Unreadable, Written
from prompt_store.errors import BodyTooLarge, StorageError, StorageUnavailable
from prompt_store.format import parse_header
from prompt_store.preconditions import Preconditions

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:  # pragma: no cover -- the message is the point
    raise ImportError('an s3:// prompt store needs boto3: pip install "promptswap[s3]"') from exc

log = logging.getLogger("prompt_store.registry")

SUFFIX = ".safetensors"
VERSION_META = "promptswap-version"  # user metadata (x-amz-meta-promptswap-version)
WRITE_META = "promptswap-write"  # the id of the write that stored the object
TOMBSTONES = ".tombstones/"
CHANGES = ".changes"
ATTEMPTS = 8  # conditional writes lost to other replicas in a row before giving up (503)


_RAISE = object()  # _call's `absent` when a missing object is an error


class _Conflict(Exception):
    """A conditional request lost: the object changed since it was read."""


@dataclass(frozen=True, slots=True)
class _Head:
    etag: str
    version: int
    write_id: str | None = None


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    if not url.startswith(S3_SCHEME):
        raise ValueError(f"an object store URL starts with {S3_SCHEME}, got {url!r}")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"the object store URL names no bucket: expected s3://bucket/prefix, got {url!r}")
    return bucket, prefix.strip("/")


class ObjectStore:
    directory = None

    def __init__(self, url: str, *, endpoint_url: str | None = None, timeout_s: float = 10.0,
                 client: Any = None) -> None:
        """Credentials and region come from the standard AWS variables and files (boto3's chain)."""
        self.bucket, prefix = parse_url(url)
        self._base = f"{prefix}/" if prefix else ""
        self.location = f"{S3_SCHEME}{self.bucket}/{self._base}"
        config = Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2, "mode": "standard"},
            # An endpoint of our own (MinIO, moto, an IP) rarely resolves bucket.host names.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = client or boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._marker_tag: str | None = None
        self._writer = f"{socket.gethostname()}:{os.getpid()}"

    # -- reading ---------------------------------------------------------------------------------

    def scan(self) -> dict[str, Entry]:
        entries = {}
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._base, Delimiter="/")
        for page in self._call("list", "*", list, pages):
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(self._base):]
                if name.endswith(SUFFIX) and not name.startswith("."):
                    task = name[: -len(SUFFIX)]
                    entries[task] = Entry(task, tag=obj["ETag"], size=obj["Size"],
                                          modified=obj["LastModified"].timestamp())
        return entries

    def read(self, entry: Entry, max_bytes: int) -> tuple[bytes, Entry]:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(entry.task))
        except ClientError as exc:
            status = _status(exc) or 500
            if _absent(exc):  # deleted since the listing
                raise NotStored(entry.task) from None
            if 400 <= status < 500 and status not in (404, 408, 429):  # this object only (access, archived)
                raise Unreadable(f"{self._key(entry.task)}: {_code(exc)} ({exc})") from None
            raise self._error(exc, "read", entry.task) from None
        except BotoCoreError as exc:
            raise self._error(exc, "read", entry.task) from None
        size = answer["ContentLength"]
        if size > max_bytes:
            answer["Body"].close()
            raise BodyTooLarge(f"{self._key(entry.task)} is {size} bytes, over the limit of {max_bytes} bytes",
                               expected=max_bytes, actual=size)
        data = self._call("read", entry.task, answer["Body"].read)
        return data, Entry(entry.task, tag=answer["ETag"], size=size, modified=answer["LastModified"].timestamp())

    def fetch(self, task: str, max_bytes: int) -> bytes:
        try:
            return self.read(Entry(task, tag=""), max_bytes)[0]
        except Unreadable as exc:
            raise StorageUnavailable(f"could not read task {task!r}: {exc}", cause=exc) from None

    def version_hint(self, entry: Entry) -> int:
        return 0  # versions are per task here, read from the store at each write

    def issued(self, version: int) -> None:
        pass  # the store itself (objects and tombstones) remembers every version

    def unversioned(self) -> int:
        return 0  # an object written by another tool: served as version 0; the next write numbers it

    def changed(self) -> bool:
        """One conditional HEAD of the change marker: 304 (nothing moved) costs no listing."""
        guard = {"IfNoneMatch": self._marker_tag} if self._marker_tag else {}
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=self._base + CHANGES, **guard)
        except ClientError as exc:
            status = _status(exc)
            if status == 304:
                return False
            if status == 404:  # never written (or removed by hand): nothing to follow
                moved, self._marker_tag = self._marker_tag is not None, None
                return moved
            raise self._error(exc, "poll", "*") from None
        except BotoCoreError as exc:
            raise self._error(exc, "poll", "*") from None
        self._marker_tag = answer["ETag"]
        return True

    # -- writing ---------------------------------------------------------------------------------

    def write(self, task: str, encode: Callable[[int], bytes], when: Preconditions, current: Current) -> Written:
        key = self._key(task)
        # Names this write in the object's metadata: if the store applied a PUT whose answer was lost (and
        # botocore's retry of it then lost its condition), the next HEAD shows it was ours.
        write_id = uuid.uuid4().hex
        sent: tuple[int, int, bool] | None = None  # (version, size, created) of the last PUT sent
        for _ in range(ATTEMPTS):
            head = self._head(task)
            if sent is not None and head is not None and head.write_id == write_id:
                self._bump(task, sent[0])
                return Written(sent[0], head.etag, sent[1], created=sent[2])
            when.check(task, head is not None, head.version if head is not None else None)
            # Above the current version and every deleted one, even if an old object was copied back in.
            version = max(head.version if head is not None else 0, self._tombstone(task)[0]) + 1
            blob = encode(version)
            guard = {"IfMatch": head.etag} if head is not None else {"IfNoneMatch": "*"}
            sent = (version, len(blob), head is None)
            try:
                answer = self._call("store", task, self._client.put_object, conditional=True,
                                    Bucket=self.bucket, Key=key, Body=blob, ContentType="application/octet-stream",
                                    Metadata={VERSION_META: str(version), WRITE_META: write_id}, **guard)
            except _Conflict:
                continue
            self._bump(task, version)
            return Written(version, answer["ETag"], len(blob), created=head is None)
        raise self._contended("store", task)

    def remove(self, task: str, when: Preconditions, current: Current) -> None:
        sent = False  # a DELETE was sent: its answer may have been lost and its retry found nothing
        for _ in range(ATTEMPTS):
            head = self._head(task)
            if head is None:
                if sent:
                    return  # gone, as asked (by this delete, or by another at the same moment)
                raise NotStored(task)
            when.check(task, True, head.version)
            self._raise_tombstone(task, head.version)  # first: a re-create must never see no object and no floor
            sent = True
            try:
                self._call("delete", task, self._client.delete_object, conditional=True,
                           Bucket=self.bucket, Key=self._key(task), IfMatch=head.etag)
            except _Conflict:
                continue
            self._bump(task, head.version)
            return
        raise self._contended("delete", task)

    def check_conditional_writes(self) -> bool:
        """Whether the store honours conditional writes, tried on a probe object: some S3-compatible stores
        ignore If-None-Match / If-Match, and then racing writers can lose updates. Logged, not fatal."""
        key = f"{self._base}.probe-{uuid.uuid4().hex}"
        honoured = True
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
            for attempt in ({"IfNoneMatch": "*"}, {"IfMatch": '"0"'}):
                try:
                    self._client.put_object(Bucket=self.bucket, Key=key, Body=b"2", **attempt)
                    honoured = False
                except ClientError as exc:
                    honoured &= _status(exc) == 412
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch='"0"')
                honoured = False
            except ClientError as exc:
                honoured &= _status(exc) == 412
        finally:
            with contextlib.suppress(BotoCoreError, ClientError):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        if not honoured:
            log.error("the object store %s ignores conditional writes (If-Match / If-None-Match): replicas racing "
                      "on one task can lose an update. Use a store that honours them (AWS S3, recent MinIO)",
                      self.location)
        return honoured

    # -- objects ---------------------------------------------------------------------------------

    def _key(self, task: str) -> str:
        return f"{self._base}{task}{SUFFIX}"

    def _head(self, task: str) -> _Head | None:
        answer = self._call("read", task, self._client.head_object, absent=None, Bucket=self.bucket,
                            Key=self._key(task))
        if answer is None:
            return None
        metadata = answer.get("Metadata", {})
        version = _int(metadata.get(VERSION_META))
        if version is None:  # written by another tool: the header may still record one
            version = self._header_version(task)
        return _Head(answer["ETag"], version, metadata.get(WRITE_META))

    def _header_version(self, task: str) -> int:
        answer = self._call("read", task, self._client.get_object, Bucket=self.bucket, Key=self._key(task))
        try:
            _, metadata = parse_header(answer["Body"].read())
        except ValueError:
            return 0
        return _int(metadata.get("version")) or 0

    def _tombstone(self, task: str) -> tuple[int, str | None]:
        """(the highest version the task had when last deleted, the tombstone's ETag); (0, None) if none."""
        answer = self._call("read", task, self._client.get_object, absent=None, Bucket=self.bucket,
                            Key=self._base + TOMBSTONES + task)
        if answer is None:
            return 0, None
        return _int(self._call("read", task, answer["Body"].read).decode("ascii", "replace")) or 0, answer["ETag"]

    def _raise_tombstone(self, task: str, version: int) -> None:
        """Make the tombstone record at least `version`; conditional too, so it never goes down."""
        key = self._base + TOMBSTONES + task
        for _ in range(ATTEMPTS):
            recorded, etag = self._tombstone(task)
            if recorded >= version:
                return
            guard = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self._call("delete", task, self._client.put_object, conditional=True,
                           Bucket=self.bucket, Key=key, Body=str(version).encode(), **guard)
                return
            except _Conflict:
                continue
        raise self._contended("delete", task)

    def _bump(self, task: str, version: int) -> None:
        """Tell every replica something moved. Best effort: a replica that misses it finds the change at its
        next full listing."""
        body = json.dumps({"task": task, "version": version, "by": self._writer, "at": time.time()})
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._base + CHANGES, Body=body.encode())
        except (BotoCoreError, ClientError) as exc:
            log.warning("task %s v%d stored, but the change marker %s%s was not updated (%s); other replicas "
                        "will see it at their next full listing", task, version, self.location, CHANGES, exc)

    def _call(self, action: str, task: str, fn: Callable[..., Any], *args: Any, conditional: bool = False,
              absent: Any = _RAISE, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), with the store's failures as StorageError, a lost condition as _Conflict, and
        a missing object as `absent` when one is given."""
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            if absent is not _RAISE and _absent(exc):
                return absent
            # 412: the ETag moved; 409: a concurrent conditional write; 404: deleted meanwhile.
            if conditional and _status(exc) in (404, 409, 412):
                raise _Conflict from None
            raise self._error(exc, action, task) from None
        except BotoCoreError as exc:
            raise self._error(exc, action, task) from None

    def _error(self, exc: Exception, action: str, task: str) -> StorageError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            reason = {
                "NoSuchBucket": f"has no bucket {self.bucket!r}",
                "AccessDenied": "refused access (AccessDenied): check the credentials and the bucket policy",
            }.get(code, f"answered {code} ({exc.response.get('Error', {}).get('Message', '')})")
        else:
            reason = f"cannot be reached ({exc})"
        what = f"task {task!r}" if task != "*" else "tasks"
        error = StorageUnavailable(f"could not {action} {what}: the object store {self.location} {reason}", cause=exc)
        log.error("%s", error)
        return error

    def _contended(self, action: str, task: str) -> StorageError:
        return StorageUnavailable(
            f"could not {action} task {task!r}: it changed {ATTEMPTS} times in {self.location} while this write "
            "tried; try again", cause=RuntimeError("conditional write contention"))


def _absent(exc: ClientError) -> bool:
    """No such object (a missing bucket is no missing object: that is the store's failure)."""
    return _status(exc) == 404 and _code(exc) != "NoSuchBucket"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None:
        code = exc.response.get("Error", {}).get("Code", "")
        return int(code) if code.isdigit() else None
    return int(status)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
