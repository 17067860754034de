"""``versions.version_key``: a PEP 440 version as a string of digits that sorts as the versions do.

So the database orders and compares versions itself (``ORDER BY version_key``, ``version_key = :key``),
and picking the newest of 100,000 versions reads one row instead of parsing every version string.
Equal versions get equal keys (``1.0`` and ``1.0.0``). Digits only, so every collation (SQLite's
binary one, a PostgreSQL locale) orders the keys alike.

Each part is self-delimiting, so comparing two keys compares the parts in turn, as packaging does:
epoch, release (trailing zeros dropped), pre-release (a dev-only release sorts before alpha), post,
dev, local (absent first; a string segment before a number, a shorter local first).
"""

from __future__ import annotations

from packaging.version import Version

_PRE = {"a": "1", "b": "2", "rc": "3"}


def _number(n: int) -> str:
    digits = str(n)
    return f"{len(digits):02d}{digits}"  # a longer number is a bigger one (versions have under 100 digits)


def _letters(text: str) -> str:
    # a local segment's characters are [0-9a-z] once normalised; "00" ends it, so "ab" < "abc"
    return "".join(f"{10 + int(c)}" if c.isdigit() else f"{20 + ord(c) - ord('a')}" for c in text) + "00"


def version_key(version: Version | str) -> str:
    """The sortable key of a PEP 440 version."""
    v = version if isinstance(version, Version) else Version(version)
    release = list(v.release)
    while release and release[-1] == 0:
        release.pop()
    parts = [_number(v.epoch), *("1" + _number(p) for p in release), "0"]
    if v.pre is not None:
        parts.append(_PRE[v.pre[0]] + _number(v.pre[1]))
    else:
        parts.append(("0" if v.post is None and v.dev is not None else "4") + _number(0))
    parts.append("0" + _number(0) if v.post is None else "1" + _number(v.post))
    parts.append("1" + _number(0) if v.dev is None else "0" + _number(v.dev))
    if v.local is None:
        parts.append("0")
    else:
        segments = [("2" + _number(int(s))) if s.isdigit() else ("1" + _letters(s)) for s in v.local.split(".")]
        parts.append("1" + "".join(segments) + "0")
    return "".join(parts)
