"""Parsing a nats replica URL and its options into Settings (no network; mistakes are BadURL)."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BadURL, InvalidKey
from ..keys import validate_key
from ..registry import redact_url
from .credentials import CredentialError, check_creds_file, check_nkey_file

DEFAULT_PORT = 4222
DEFAULT_TIMEOUT = 10.0

_BUCKET = re.compile(r"^[A-Za-z0-9_-]+$")
_OPTIONS = (
    "username",
    "password",
    "token",
    "nkey_path",
    "creds_path",
    "tls_ca_path",
    "skip_verify",
    "max_bucket_bytes",
    "timeout",
    "create_bucket",
    "tls",
)
_CHECKS: dict[str, Callable[[str], None]] = {"nkey_path": check_nkey_file, "creds_path": check_creds_file}


@dataclass(frozen=True)
class Settings:
    """Everything a driver needs to reach one object store bucket."""

    servers: tuple[str, ...]  # host:port
    bucket: str
    prefix: str  # '' or ending in '/'
    tls: bool  # TLS required
    username: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_path: str | None = None
    creds_path: str | None = None
    tls_ca_path: str | None = None
    skip_verify: bool = False
    max_bucket_bytes: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    create_bucket: bool = True


def parse(url: str, options: dict[str, object]) -> Settings:
    """Settings from a nats:// or tls:// URL and keyword options; BadURL names what is wrong."""
    if not isinstance(url, str):
        raise BadURL(f"not a nats URL: {url!r}")
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("nats", "tls") or not sep:
        raise BadURL(f"not a nats URL: {shown}")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise BadURL(f"nats URL must not have a fragment: {shown}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if "@" in path:  # a secret holding a raw '/' would spill into the path: refuse to guess
        raise BadURL(f"nats URL has an '@' after the server; percent-encode '/' and '@' in credentials: {shown}")
    values: dict[str, object] = {}
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
        if colon:
            if not user:
                raise BadURL(f"nats URL has a password but no user name: {shown}")
            values["username"], values["password"] = user, password
        elif user:
            values["token"] = user
        else:
            raise BadURL(f"nats URL has an empty token before '@': {shown}")
    servers = tuple(_server(part, shown) for part in hosts.split(","))
    bucket, _, prefix = path.partition("/")
    bucket = urllib.parse.unquote(bucket)
    if not bucket:
        raise BadURL(f"nats URL needs a bucket: nats://HOST:PORT/BUCKET[/PREFIX] (got {shown})")
    if not _BUCKET.match(bucket):
        raise BadURL(f"invalid object store bucket name {bucket!r} (letters, digits, '-', '_') in {shown}")
    prefix = urllib.parse.unquote(prefix).strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKey as exc:
            raise BadURL(f"invalid prefix in {shown}: {exc}") from None
        prefix += "/"
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        option = name.replace("-", "_")
        if option not in _OPTIONS:
            raise BadURL(f"unknown option {name!r} for nats replica {shown}")
        if option in values:
            raise BadURL(f"option {option!r} given twice in {shown}")
        values[option] = value
    for name, value in options.items():
        option = name.replace("-", "_")
        if option not in _OPTIONS:
            raise BadURL(f"unknown option {name!r} for nats replica {shown}")
        if value is None:
            continue
        if option in values:
            raise BadURL(f"option {option!r} given both in the URL and as an option for {shown}")
        values[option] = value
    settings: dict[str, Any] = {}
    for option in ("username", "password", "token"):
        if option in values:
            settings[option] = _text(values[option], option, shown, secret=option != "username")
    for option in ("nkey_path", "creds_path", "tls_ca_path"):
        if option in values:
            raw = values[option]
            path_value = _text(os.fspath(raw) if isinstance(raw, os.PathLike) else raw, option, shown)
            if not os.path.isfile(path_value):
                raise BadURL(f"{option} {path_value!r} is not a readable file (for {shown})")
            if option in _CHECKS:
                _check_credentials(option, path_value, shown)
            settings[option] = path_value
    for option in ("skip_verify", "create_bucket", "tls"):
        if option in values:
            settings[option] = _flag(values[option], option, shown)
    if "max_bucket_bytes" in values:
        settings["max_bucket_bytes"] = _number(values["max_bucket_bytes"], "max_bucket_bytes", shown, int)
    if "timeout" in values:
        settings["timeout"] = _number(values["timeout"], "timeout", shown, float)
    if "token" in settings and ("username" in settings or "password" in settings):
        raise BadURL(f"nats replica takes a token or a username and password, not both: {shown}")
    if "password" in settings and "username" not in settings:
        raise BadURL(f"nats replica has a password but no username: {shown}")
    if "username" in settings and "password" not in settings:
        raise BadURL(f"nats replica has a username but no password: {shown}")
    tls = settings.pop("tls", False) or scheme.lower() == "tls" or "tls_ca_path" in settings
    return Settings(servers=servers, bucket=bucket, prefix=prefix, tls=tls, **settings)


def _check_credentials(option: str, path: str, shown: str) -> None:
    """BadURL unless the nkey seed or .creds file at path is well formed (its contents never shown)."""
    try:
        import nkeys  # noqa: F401  (nkey and creds authentication need it)
    except ImportError:
        raise BadURL(f"nats option {option!r} needs the 'nkeys' package: pip install nkeys (for {shown})") from None
    try:
        _CHECKS[option](path)
    except CredentialError as exc:
        message = str(exc)
    else:
        return
    raise BadURL(f"nats option {message} (for {shown})")


def _server(part: str, shown: str) -> str:
    if not part:
        raise BadURL(f"nats URLs need a server: nats://HOST:PORT/BUCKET (got {shown})")
    try:
        parsed = urllib.parse.urlsplit("//" + part)
        host, port = parsed.hostname, parsed.port
    except ValueError:
        raise BadURL(f"invalid server {part!r} in {shown}") from None
    if not host or parsed.username is not None:
        raise BadURL(f"nats URLs need a server: nats://HOST:PORT/BUCKET (got {shown})")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port or DEFAULT_PORT}"


def _text(value: object, option: str, shown: str, *, secret: bool = False) -> str:
    if not isinstance(value, str) or not value:
        what = "a non-empty string" if secret else f"a non-empty string, not {value!r}"
        raise BadURL(f"nats option {option!r} must be {what} (for {shown})")
    return value


def _flag(value: object, option: str, shown: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise BadURL(f"nats option {option!r} must be true or false, not {value!r} (for {shown})")


def _number(value: object, option: str, shown: str, kind: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool):
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})") from None
    if not number > 0:
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})")
    return number
