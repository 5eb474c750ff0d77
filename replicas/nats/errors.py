"""Translating nats-py (and OS) exceptions into the driver layer's hierarchy, in one line.

nats-py reports a refused permission only through the error callback, while the request
itself times out: a timeout that follows such a report is PermissionDenied, not Transient.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import nats
import nats.errors
import nats.js.errors

from ..errors import IntegrityError, NotFound, PermissionDenied, StorageError, Transient
from ..resume import mark_timeout

if TYPE_CHECKING:
    from .connection import Connection

ERR_WRONG_LAST_SEQUENCE = 10071
ERR_STREAM_NOT_FOUND = 10059
ERR_STREAM_NAME_IN_USE = 10058
ERR_JETSTREAM_NOT_ENABLED_FOR_ACCOUNT = 10039
ERR_JETSTREAM_NOT_ENABLED = 10076  # on the server
_ERR_FULL = {10023, 10047, 10077}  # insufficient resources, store exceeded, maximum bytes exceeded
_FULL_TEXTS = ("maximum bytes exceeded", "maximum messages exceeded", "insufficient resources")
_TRANSIENT = (
    OSError,
    EOFError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.errors.SlowConsumerError,
    nats.errors.NoRespondersError,
)


def translate(conn: Connection, exc: BaseException, action: str, key: str | None, started: float) -> StorageError:
    """Map a nats-py (or OS) exception to the driver's hierarchy, with a one-line message."""
    what = f"{conn.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
    detail = conn.scrub(describe(exc))
    if isinstance(exc, nats.js.errors.APIError):
        return _api_error(conn, exc, what, detail, key)
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return Transient(f"{what}: JetStream did not answer ({detail})", key=key)
    if isinstance(exc, nats.errors.AuthorizationError):
        return PermissionDenied(f"{what}: authorization failed", key=key)
    if isinstance(exc, nats.js.errors.DigestMismatchError):
        return IntegrityError(f"{what}: digest mismatch", key=key)
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        denied = conn.denied
        if denied is not None and denied[0] >= started:
            return PermissionDenied(f"{what}: {conn.scrub(denied[1])}", key=key)
        return mark_timeout(Transient(f"{what}: timed out after {conn.timeout:g}s ({detail})", key=key))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermissionDenied(f"{what}: TLS certificate verification failed ({detail})", key=key)
    if isinstance(exc, _TRANSIENT):
        return Transient(f"{what}: {detail}", key=key)
    return StorageError(f"{what}: {detail}", key=key)


def _api_error(conn: Connection, exc: nats.js.errors.APIError, what: str, detail: str, key: str | None) -> StorageError:
    code, err_code = exc.code or 0, exc.err_code or 0
    if err_code in _ERR_FULL or any(text in detail.lower() for text in _FULL_TEXTS):
        return StorageError(f"{what}: object store bucket {conn.bucket!r} is full ({detail})", key=key)
    if err_code in (ERR_JETSTREAM_NOT_ENABLED_FOR_ACCOUNT, ERR_JETSTREAM_NOT_ENABLED):  # a 503, but no outage
        return StorageError(f"{what}: JetStream is not enabled ({detail})", key=key)
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) or code == 503:
        return Transient(f"{what}: JetStream not available ({detail})", key=key)
    if code in (401, 403) or "permission" in detail.lower() or "authoriz" in detail.lower():
        return PermissionDenied(f"{what}: {detail}", key=key)
    if err_code == ERR_STREAM_NOT_FOUND:
        conn.ready = False  # deleted under us: open (or create) it again next time
        return NotFound(f"{what}: object store bucket {conn.bucket!r} not found", key=key)
    if isinstance(exc, nats.js.errors.NotFoundError):
        return NotFound(f"{what}: not found ({detail})", key=key)
    if code >= 500:
        return Transient(f"{what}: {detail}", key=key)
    return StorageError(f"{what}: {detail}", key=key)


def describe(exc: BaseException) -> str:
    """A short one-line description of a backend exception."""
    if isinstance(exc, nats.js.errors.APIError):
        text = exc.description or f"code {exc.code}"
        return f"{text} (code {exc.code}, err_code {exc.err_code})" if exc.err_code else text
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == "nats: timeout":
        return name if text == "" else "timeout"
    return text if text.startswith("nats:") else f"{name}: {text}"
