"""HTTP's conditional requests on task prompts: the version as a strong ETag, If-Match and If-None-Match.

A task's ETag is its version, quoted (`"7"`): strong, because a version names exactly one prompt
(bytes and metadata) and is never issued twice for a task. `If-Match` compares strongly (a weak tag
`W/"7"` never matches, RFC 9110 13.1.1); `If-None-Match` weakly. The store checks the conditions under
its write lock (prompt_store/preconditions.py); this module only reads and writes the headers.
"""

from __future__ import annotations

import re

from prompt_store.preconditions import ANY, Any_, Preconditions
from server.engine.errors import InvalidParameter

# One member of the list: an RFC 9110 entity-tag (etagc: any visible character but the quote, so a
# comma may sit inside the quotes), then a comma or the end.
_MEMBER = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|$)')
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
    at = 0
    while at < len(value):
        match = _MEMBER.match(value, at)
        if match is None or match.end() == at:
            raise InvalidParameter(header, EXPECTED, value)
        at = match.end()
        weak, opaque = match.groups()
        if (weak and not weak_matches) or not opaque.isdigit() or len(opaque) > 18:
            continue
        versions.add(int(opaque))
    if at == 0 or value.rstrip().endswith(","):
        raise InvalidParameter(header, EXPECTED, value)
    return frozenset(versions)


def preconditions(if_match: str | None, if_none_match: str | None) -> Preconditions:
    return Preconditions(parse("If-Match", if_match, weak_matches=False),
                         parse("If-None-Match", if_none_match, weak_matches=True))


def not_modified(if_none_match: str | None, version: int | None) -> bool:
    """Whether a GET's If-None-Match names the version it would return (answer 304)."""
    tags = parse("If-None-Match", if_none_match, weak_matches=True)
    return tags is not None and version is not None and (tags == ANY or version in tags)
