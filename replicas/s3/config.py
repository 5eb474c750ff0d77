"""Parsing an s3 replica URL and its options: bucket, prefix, endpoint, region, credentials.

Everything here is pure (no network): a mistake in the configuration is a BadURL naming
the option, raised when the driver is opened, never on the first upload.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..errors import BadURL, InvalidKey
from ..keys import validate_key

MiB = 1 << 20
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3 rejects smaller parts (except the last)
MAX_PART_SIZE = 5 * 1024 * MiB
DEFAULT_REGION = "us-east-1"
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
POOL_SIZE = 32

OPTIONS = (
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "force_path_style",
    "skip_verify",
    "part_size",
)
_SECRET_OPTIONS = frozenset({"secret_access_key", "session_token"})
_BOOL_WORDS = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def parse_url(url: str, options: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(bucket, prefix, keyword options) from `s3://BUCKET[/PREFIX][?option=value&...]` and options."""
    shown = redact(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise BadURL(f"not an s3 URL: {shown}")
    if "@" in parts.netloc:
        raise BadURL(
            f"s3 URL must not carry credentials ({shown}): give access-key-id and"
            " secret-access-key as options or in the environment"
        )
    if parts.fragment:
        raise BadURL(f"s3 URL must not have a fragment: {shown}")
    bucket = urllib.parse.unquote(parts.netloc)
    if not bucket:
        raise BadURL(f"s3 URL needs a bucket: s3://BUCKET/PREFIX (got {shown})")
    given: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        option = name.replace("-", "_")
        if option not in OPTIONS:
            raise BadURL(
                f"unknown option {name!r} for s3 replica {shown} (known: {known()})"
            )
        if option in _SECRET_OPTIONS:
            raise BadURL(
                f"s3 option {name!r} is a secret: give it as an option or in the environment,"
                f" not in the URL ({shown})"
            )
        if option in given:
            raise BadURL(f"s3 option {name!r} given twice in {shown}")
        given[option] = value
    for name, value in options.items():
        option = name.replace("-", "_")
        if option not in OPTIONS:
            raise BadURL(
                f"unknown option {name!r} for s3 replica {shown} (known: {known()})"
            )
        if value is None:
            continue
        if option in given and parse_option(
            option, given[option], shown
        ) != parse_option(option, value, shown):
            raise BadURL(
                f"s3 option {name!r} is given both in the URL and as an option for {shown}"
            )
        given[option] = value
    parsed = {name: parse_option(name, value, shown) for name, value in given.items()}
    return bucket, urllib.parse.unquote(parts.path), parsed


def known() -> str:
    return ", ".join(name.replace("_", "-") for name in OPTIONS)


def redact(url: str) -> str:
    from ..registry import redact_url

    return redact_url(url)


def normalise_prefix(prefix: str) -> str:
    """'' or the prefix with one trailing '/', validated like a key."""
    if not isinstance(prefix, str):
        raise BadURL(f"s3 prefix must be a str, not {type(prefix).__name__}")
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    try:
        validate_key(stripped)
    except InvalidKey as exc:
        raise BadURL(
            f"invalid s3 prefix {prefix[:200]!r}: {exc.message.partition(': ')[2]}"
        ) from None
    return stripped + "/"


def check_part_size(part_size: object) -> int:
    """part_size if S3 accepts it as the size of every part but the last."""
    if not isinstance(part_size, int) or isinstance(part_size, bool):
        raise BadURL(f"S3 option part_size must be a number of bytes, not {part_size!r}")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise BadURL(
            f"S3 option part_size must be between 5 MiB and 5 GiB (got {part_size} bytes)"
        )
    return part_size


def parse_endpoint(endpoint: str) -> tuple[str, str, bool]:
    """(display form, host[:port] for minio, secure) from `http(s)://host[:port]` or `host[:port]`."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise BadURL(f"invalid S3 endpoint {endpoint!r}")
    text = endpoint.strip()
    if "://" not in text:
        text = "https://" + text  # TLS unless asked otherwise
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadURL(
            f"S3 endpoint must start with http:// or https:// (got {endpoint!r})"
        )
    if parts.username or parts.password:
        raise BadURL("S3 endpoint must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadURL(
            f"S3 endpoint must be scheme://host[:port] without a path (got {endpoint!r})"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BadURL(f"invalid port in S3 endpoint {endpoint!r}") from None
    if not parts.hostname:
        raise BadURL(f"S3 endpoint has no host: {endpoint!r}")
    host = parts.netloc
    return f"{scheme}://{host}", host, scheme == "https"


def credentials(
    access: str | None, secret: str | None, token: str | None, env: Mapping[str, str]
) -> tuple[str | None, str | None, str | None]:
    """(access key id, secret, session token): the options, else the environment, else anonymous."""
    if access or secret:
        if not (access and secret):
            missing = "secret-access-key" if access else "access-key-id"
            raise BadURL(f"s3 credentials incomplete: {missing} is missing")
        return access, secret, token or None
    if token:
        raise BadURL(
            "s3 session-token given without access-key-id and secret-access-key"
        )
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
            raise BadURL(
                "s3 credentials incomplete: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return (
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            env.get("AWS_SESSION_TOKEN") or None,
        )
    if env.get("MINIO_ACCESS_KEY") or env.get("MINIO_SECRET_KEY"):
        if not (env.get("MINIO_ACCESS_KEY") and env.get("MINIO_SECRET_KEY")):
            raise BadURL(
                "s3 credentials incomplete: set both MINIO_ACCESS_KEY and MINIO_SECRET_KEY"
            )
        return env["MINIO_ACCESS_KEY"], env["MINIO_SECRET_KEY"], None
    return None, None, None  # anonymous: public buckets only


def parse_option(name: str, value: Any, shown: str) -> Any:
    """One option's value from the URL query (text) or the configuration (typed)."""
    if name in ("force_path_style", "skip_verify"):
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word == "" and name != "skip_verify":  # `?force-path-style` alone means true
            return True
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word]
        raise BadURL(
            f"s3 option {name.replace('_', '-')!r} must be true or false (got {value!r}) in {shown}"
        )
    if name == "part_size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        match = _SIZE.match(str(value))
        if not match:
            raise BadURL(
                f"s3 option 'part-size' must be a size like 16MiB (got {value!r}) in {shown}"
            )
        number, unit = int(match.group(1)), match.group(2).lower()
        return number * 1024 ** "_kmgt".index(unit or "_")
    if not isinstance(value, str):
        raise BadURL(
            f"s3 option {name.replace('_', '-')!r} must be a string in {shown}"
        )
    return value
