"""Translating minio, urllib3 and socket errors into the driver layer's hierarchy.

S3 servers report errors three ways (an XML body, a bare status on HEAD, a dropped
connection); callers must see one StorageError subclass whatever the way, in one line and
without a secret, so that they can decide what to retry.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from xml.etree import ElementTree

from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.exceptions import SSLError as Urllib3SSLError

from ..errors import (
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from ..resume import mark_timeout

TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
        "NoSuchUpload",  # an expired or aborted multipart upload: the whole put can be redone
    }
)
PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
CODE_IN_BODY = re.compile(r"<Code>\s*([A-Za-z0-9.]+)\s*</Code>")


class ErrorMapper:
    """Builds the errors of one driver: its URL and endpoint in the message, its secrets scrubbed."""

    def __init__(self, url: str, endpoint: str, bucket: str, secrets: Iterable[str]) -> None:
        self.url = url
        self.endpoint = endpoint
        self.bucket = bucket
        self._secrets = tuple(secrets)

    def call(self, action: str, key: str | None, operation: Callable[[], Any]) -> Any:
        """operation(), with any client error translated."""
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client error is mapped
            raise self.translate(exc, action, key) from None

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def bucket_missing(self, key: str | None) -> NotFound:
        error = NotFound(
            f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint} (create it first)",
            key=key,
        )
        error.bucket_missing = True  # type: ignore[attr-defined]
        return error

    def translate(self, exc: BaseException, action: str, key: str | None) -> StorageError:
        """Translate a minio/urllib3/socket error into the driver's hierarchy (one line, no secrets)."""
        status, code = status_of(exc), code_of(exc)
        if status is not None or code is not None:
            return self.from_status(status, code, action, key)
        what = f"{self.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
        where = f" at {self.endpoint}"
        reason = self.scrub(describe(exc))
        if isinstance(exc, MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        if isinstance(exc, (Urllib3SSLError, ssl.SSLError)):
            if (
                "CERTIFICATE_VERIFY_FAILED" in reason
                or "certificate verify failed" in reason
            ):
                return StorageError(
                    f"{what}{where}: TLS certificate not trusted ({reason});"
                    " fix the server certificate or set SSL_CERT_FILE (skip-verify disables the check)",
                    key=key,
                )
            return Transient(f"{what}{where}: TLS error: {reason}", key=key)
        if isinstance(
            exc, (Urllib3HTTPError, OSError, socket.timeout, ConnectionError)
        ):
            if "timed out" in reason.lower() or isinstance(
                exc, (socket.timeout, TimeoutError)
            ):
                return mark_timeout(Transient(f"{what}{where}: timed out ({reason})", key=key))
            return Transient(f"{what}{where}: connection failed ({reason})", key=key)
        if isinstance(exc, ElementTree.ParseError):
            return StorageError(
                f"{what}{where}: unreadable reply from the server ({reason})", key=key
            )
        if isinstance(exc, ValueError):
            return StorageError(f"{what}{where}: {reason}", key=key)
        return StorageError(f"{what}{where}: {type(exc).__name__}: {reason}", key=key)

    def from_status(
        self, status: int | None, code: str | None, action: str, key: str | None
    ) -> StorageError:
        """The error for an HTTP status and/or S3 error code."""
        what = f"{self.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
        detail = " ".join(
            str(x) for x in (f"HTTP {status}" if status else None, code) if x
        )
        where = f" at {self.endpoint} ({detail})"
        if code == "NoSuchBucket":
            return self.bucket_missing(key)
        if code in ("NoSuchKey", "NotFound") or (
            status == 404 and code in (None, "ResourceNotFound")
        ):
            return NotFound(
                f"{self.url}: {key!r} not found at {self.endpoint}", key=key
            )
        if status == 404:
            return NotFound(f"{what}{where}: not found", key=key)
        if code in PERMISSION_CODES or status in (401, 403):
            hint = ""
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId"):
                hint = " (check the access key id and secret access key)"
            elif code == "RequestTimeTooSkewed":
                hint = " (the local clock is off)"
            return PermissionDenied(f"{what}{where}: access denied{hint}", key=key)
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
        if code in ("KeyTooLongError", "InvalidObjectName"):
            return InvalidKey(f"{what}{where}: the server refused the key", key=key)
        if (
            code in TRANSIENT_CODES
            or status in (408, 429)
            or (status is not None and status >= 500)
        ):
            return Transient(f"{what}{where}: server error, worth retrying", key=key)
        return StorageError(f"{what}{where}: request failed", key=key)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status a minio error carries, if any."""
    if isinstance(exc, S3Error):
        response = getattr(exc, "response", None)
        status = getattr(response, "status", None)
        return int(status) if isinstance(status, int) else None
    if isinstance(exc, InvalidResponseError):
        code = getattr(exc, "_code", None)
        return int(code) if isinstance(code, int) else None
    if isinstance(exc, ServerError):
        return exc.status_code
    return None


def code_of(exc: BaseException) -> str | None:
    """The S3 error code a minio error carries, if any (rclone sends it in a text/xml body)."""
    if isinstance(exc, S3Error):
        return exc.code
    if isinstance(exc, InvalidResponseError):
        match = CODE_IN_BODY.search(getattr(exc, "_body", None) or "")
        return match.group(1) if match else None
    return None


def describe(exc: BaseException) -> str:
    """A short one-line description of a transport error, without dumping server bodies."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        return describe(exc.reason)
    if isinstance(exc, MinioException):
        return type(exc).__name__
    if (
        isinstance(exc, ProtocolError)
        and len(exc.args) == 2
        and isinstance(exc.args[1], BaseException)
    ):
        outer, inner = str(exc.args[0]).rstrip("."), exc.args[1]
        text = (
            outer
            if str(inner) and str(inner) in outer
            else f"{outer}: {describe(inner)}"
        )
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{type(exc).__name__}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = re.sub(r"<urllib3\.[^>]*>:?\s*", "", text)
    text = " ".join(text.split())
    return text[:300]
