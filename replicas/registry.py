"""Open a driver from a replica URL: `file:///path`, `mem://name`, later s3, sftp, nats.

A factory is called as factory(url, **options) and parses its own URL (including any
query options); keyword options come from configuration. It raises BadURL for anything
it does not understand, naming the offending option.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from .base import Driver
from .errors import BadURL

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TOKEN_USERINFO = frozenset({"nats"})  # nats://TOKEN@host: a lone user-info is a token
_SECRET_PARAM = re.compile(r"secret|passw|pwd|token|key|credential|signature", re.IGNORECASE)

_factories: dict[str, Callable[..., Driver]] = {}
_lock = threading.Lock()


def register(scheme: str, factory: Callable[..., Driver]) -> None:
    """Make open_driver() use factory(url, **options) for URLs of scheme (replacing any)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"invalid URL scheme {scheme!r} (lower-case letters, digits, '+.-')")
    with _lock:
        _factories[scheme] = factory


def schemes() -> list[str]:
    """The registered URL schemes, sorted."""
    with _lock:
        return sorted(_factories)


def open_driver(url: str, **options: object) -> Driver:
    """Open the driver for url; a string without `scheme://` is a file path."""
    if not isinstance(url, str) or not url.strip():
        raise BadURL(f"empty replica URL: {url!r}")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else "file"
    with _lock:
        factory = _factories.get(scheme)
    if factory is None:
        known = ", ".join(schemes())
        raise BadURL(f"unknown replica URL scheme {scheme!r} in {redact_url(url)} (known: {known})")
    return factory(url, **options)


def redact_url(url: str) -> str:
    """url with secrets replaced by '***': the user-info password and secret-looking query values."""
    match = _SCHEME.match(url)
    if not match:
        return url
    scheme, rest = match.group(1).lower(), url[match.end() :]
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    # The last '@' ends the user-info: secrets often hold an unescaped '/' or '+'.
    userinfo, at, location = rest.rpartition("@")
    if at and not userinfo.startswith("/"):
        user, colon, _password = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{location}"
        elif scheme in _TOKEN_USERINFO:
            rest = f"***@{location}"
    if query:
        query = "&".join(_redact_param(param) for param in query.split("&"))
    return f"{url[: match.end()]}{rest}{qmark}{query}{hash_}{fragment}"


def _redact_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}=***" if eq and value and _SECRET_PARAM.search(name) else param
