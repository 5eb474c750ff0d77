"""Parsing an sftp replica URL and its options (no network; mistakes are BadURL at open time)."""

from __future__ import annotations

import base64
import contextlib
import urllib.parse

import paramiko

from ..errors import BadURL
from ..registry import redact_url

DEFAULT_PORT = 22
DEFAULT_TIMEOUT = 30.0

OPTIONS = ("user", "password", "key_path", "known_hosts_path", "host_key", "timeout")
_QUERY_OPTIONS = frozenset(OPTIONS) - {"password"}


def parse_url(url: str, options: dict[str, object]) -> tuple[str, str, int, dict[str, object]]:
    """(host, root, port, keyword options) from `sftp://[USER[:PASSWORD]@]HOST[:PORT]/ABS/PATH[?...]`.

    A value given both in the URL and as an option must agree; the password never comes
    from the query (it would end up in logs).
    """
    shown = redact_url(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str) or url[:7].lower() != "sftp://":
        raise BadURL(f"not an sftp URL: {shown}")
    rest, _, fragment = url[7:].partition("#")
    if fragment:
        raise BadURL(f"sftp URL must not have a #fragment: {shown}")
    rest, _, query = rest.partition("?")
    userinfo, at, location = rest.rpartition("@")
    url_user = url_password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        url_user = urllib.parse.unquote(name) or None
        url_password = urllib.parse.unquote(secret) if colon else None
    hostport, slash, path = location.partition("/")
    host, port = split_host_port(hostport, shown)
    if not host:
        raise BadURL(f"sftp URL needs a host: sftp://[USER@]HOST[:PORT]/PATH, got {shown}")
    if not slash:
        raise BadURL(f"sftp URL needs the remote directory as an absolute path (sftp://HOST/PATH): {shown}")
    root = urllib.parse.unquote("/" + path)

    merged: dict[str, object] = {}
    for raw_name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        name = raw_name.replace("-", "_")
        if name == "password":
            raise BadURL(
                f"sftp URL must not carry the password in the query"
                f" (use the user-info or the password option): {shown}"
            )
        if name not in _QUERY_OPTIONS:
            raise BadURL(f"unknown option {raw_name!r} for sftp replica {shown} (known: {', '.join(OPTIONS)})")
        if name in merged:
            raise BadURL(f"option {raw_name!r} given twice in {shown}")
        merged[name] = value
    for name, value in options.items():
        if name not in OPTIONS:
            raise BadURL(f"unknown option {name!r} for sftp replica {shown} (known: {', '.join(OPTIONS)})")
        if value is None:
            continue
        if name in merged and not _same_option(name, merged[name], value):
            raise BadURL(
                f"option {name!r} for sftp replica {shown} is given in the URL and as an option, differently"
            )
        merged[name] = value
    for name, from_url in (("user", url_user), ("password", url_password)):
        if from_url is None:
            continue
        if name in merged and merged[name] != from_url:
            what = "the password" if name == "password" else f"user {merged[name]!r}"
            raise BadURL(f"sftp replica {shown}: {what} differs from the one in the URL")
        merged[name] = from_url
    for name in ("user", "password", "host_key"):
        if name in merged and not isinstance(merged[name], str):
            raise BadURL(f"sftp option {name} must be a string")
    return host, root, port, merged


def _same_option(name: str, a: object, b: object) -> bool:
    if name == "timeout":
        with contextlib.suppress(TypeError, ValueError):
            return float(a) == float(b)  # type: ignore[arg-type]
    return str(a) == str(b)


def split_host_port(hostport: str, shown: str) -> tuple[str, int]:
    """(host, port) from `host`, `host:port` or `[v6]:port`; the host lower-cased as ssh does."""
    if hostport.startswith("["):  # an IPv6 literal
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise BadURL(f"malformed host {hostport!r} in {shown}")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = hostport.partition(":")
    host = urllib.parse.unquote(host).lower()  # as ssh matches known_hosts names
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadURL(f"invalid port {port_text!r} in {shown}")
    return host, int(port_text)


def parse_host_key(line: str) -> paramiko.PKey:
    """A pinned host key: "TYPE BASE64 [comment]", optionally with known_hosts' host field first."""
    if not isinstance(line, str):
        raise BadURL(f"sftp option host_key must be a string like 'ssh-ed25519 AAAA...', not {type(line).__name__}")
    tokens = line.split()
    for index, token in enumerate(tokens[:-1]):
        if token.startswith(("ssh-", "ecdsa-", "rsa-", "sk-")):
            try:
                blob = base64.b64decode(tokens[index + 1], validate=True)
                key = paramiko.PKey.from_type_string(token, blob)
            except Exception as exc:  # noqa: BLE001 - binascii.Error, paramiko's key errors, ...
                raise BadURL(f"sftp option host_key is not a valid {token} public key: {describe(exc)}") from None
            return key
    raise BadURL(f"sftp option host_key must be a public key line like 'ssh-ed25519 AAAA...', got {line[:40]!r}")


def describe(exc: BaseException) -> str:
    """A short one-line reason for an exception (never a secret: these come from sockets/paramiko)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
