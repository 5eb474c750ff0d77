"""Validation of object keys, applied by every driver on every operation.

A key is a relative, '/'-separated path. Validation is what stops a hostile listing (or a
corrupt manifest) from making a caller touch anything outside the replica.
"""

from __future__ import annotations

import re

from .errors import InvalidKey

MAX_KEY_BYTES = 1024
"""Longest key accepted, in UTF-8 bytes (the S3 limit)."""

TEMP_NAME = re.compile(r"^\..*\.tmp-[0-9a-f]{16}$", re.DOTALL)
STALE_TEMP_SECONDS = 24 * 3600  # a temporary file this old belongs to a put that is over
"""Names the file driver gives its temporary files; reserved so keys stay portable."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def validate_key(key: str) -> str:
    """Return key unchanged if it is a legal object key, else raise InvalidKey."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, not {type(key).__name__}")
    problem = _problem(key)
    if problem:
        raise InvalidKey(f"invalid key {key[:200]!r}: {problem}", key=key)
    return key


def validate_prefix(prefix: str) -> str:
    """Return prefix unchanged if some legal key could start with it ('' included)."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"prefix must be a str, not {type(prefix).__name__}")
    # A prefix is legal when completing its last segment gives a legal key.
    if prefix and _problem(prefix + "x"):
        raise InvalidKey(f"invalid prefix {prefix[:200]!r}: {_problem(prefix + 'x')}", key=prefix)
    return prefix


def _problem(key: str) -> str | None:
    if not key:
        return "empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid Unicode (lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "absolute (leading '/')"
    if "\\" in key:
        return "contains a backslash"
    if _CONTROL.search(key):
        return "contains a control character"
    segments = key.split("/")
    if "" in segments:
        return "empty path segment"
    if "." in segments or ".." in segments:
        return "'.' or '..' path segment"
    if TEMP_NAME.match(segments[-1]):
        return "name reserved for temporary files"
    return None
