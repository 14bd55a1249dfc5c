"""HTTP's conditional requests on task prompts: the version as a strong ETag, If-Match and If-None-Match.

A task's ETag is its version, quoted (`"7"`): strong, because a version names exactly one prompt
(bytes and metadata) and is never issued twice for a task. `If-Match` compares strongly (a weak tag
`W/"7"` never matches, RFC 9110 13.1.1); `If-None-Match` weakly. The store checks the conditions under
its write lock (prompt_store/preconditions.py); this module only reads and writes the headers.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from prompt_store.preconditions import ANY, Any_, Preconditions
from server.engine.errors import InvalidParameter

# One member of the list: an RFC 9110 entity-tag (etagc: any visible character but the quote, so a
# comma may sit inside the quotes), then a comma or the end.
_MEMBER = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|$)')
_EMPTY = re.compile(r"[ \t]*,|[ \t]+$")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # how etag() writes a version
EXPECTED = 'a comma-separated list of quoted ETags such as "7" (W/"7" is weak), or *'


def etag(version: int | None) -> str | None:
    return None if version is None else f'"{version}"'


def parse(header: str, value: str | None, *, weak_matches: bool) -> frozenset[int] | Any_ | None:
    """The versions a header names (ANY for `*`); None when it is absent. A tag that is no version of
    ours (or a weak one where only strong tags compare) names nothing, so it never matches."""
    if value is None:
        return None
    if value.strip() == "*":
        return ANY
    versions: set[int] = set()
    members = 0
    at = 0
    while at < len(value):
        empty = _EMPTY.match(value, at)  # empty list members are ignored (RFC 9110 5.6.1)
        if empty is not None and empty.end() > at:
            at = empty.end()
            continue
        match = _MEMBER.match(value, at)
        if match is None or match.end() == at:
            raise InvalidParameter(header, EXPECTED, value)
        at = match.end()
        members += 1
        weak, opaque = match.groups()
        # Tags compare character by character: "07" is not "7", and only our own decimal form is a version.
        if (weak and not weak_matches) or not _VERSION.fullmatch(opaque):
            continue
        versions.add(int(opaque))
    if not members:
        raise InvalidParameter(header, EXPECTED, value)
    return frozenset(versions)


def header(request: Request, name: str) -> str | None:
    """A list header's value over all its lines (a client may send If-Match twice), or None when absent."""
    lines = request.headers.getlist(name)
    return ", ".join(lines) if lines else None


def preconditions(if_match: str | None, if_none_match: str | None) -> Preconditions:
    return Preconditions(parse("If-Match", if_match, weak_matches=False),
                         parse("If-None-Match", if_none_match, weak_matches=True))


def not_modified(if_none_match: str | None, version: int | None) -> bool:
    """Whether a GET's If-None-Match names the version it would return (answer 304)."""
    tags = parse("If-None-Match", if_none_match, weak_matches=True)
    return tags is not None and version is not None and (tags == ANY or version in tags)
