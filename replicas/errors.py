"""The one exception hierarchy of the driver layer.

Drivers translate their backend's own errors into these, so callers catch `StorageError`
or a precise subclass and never an exception of minio, paramiko, nats-py or the OS.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error a driver raises; `key` names the object concerned, if any."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        # One line whatever the backend said, so a log event stays one line.
        message = str(message).replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message
        self.key = key

    def __reduce__(self):  # keep `key` across pickling (e.g. to a worker process)
        return _rebuild, (type(self), self.message, self.key)


def _rebuild(cls: type[StorageError], message: str, key: str | None) -> StorageError:
    return cls(message, key=key)


class NotFound(StorageError):
    """The object (or the replica location) does not exist."""


class PreconditionFailed(StorageError):
    """A condition was not met, e.g. a conditional create found the key already there."""


class Transient(StorageError):
    """A failure worth retrying: timeout, connection reset, throttling, server 5xx."""


class PermissionDenied(StorageError):
    """The backend refused the operation (credentials, ACLs, a path escaping the root)."""


class IntegrityError(StorageError):
    """Transferred data does not match its declared size or checksum."""


class InvalidKey(StorageError):
    """A key failed validation: malformed, or hostile (path traversal, control characters)."""


class BadURL(StorageError):
    """A replica URL could not be parsed, names an unknown scheme, or has a bad option."""
