"""replicas: storage drivers for replicator. Bytes in, bytes out; nothing about SQLite.

Open a driver with open_driver(url, **options); every driver implements Driver and
raises only StorageError subclasses. Wrap one in TimeoutDriver to bound operations that
make no progress, and in RetryingDriver to retry Transient errors.
"""

from . import mem
from .base import CHUNK_SIZE, Capability, Driver, ObjectInfo
from .errors import (
    BadURL,
    IntegrityError,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from .file import FileDriver
from .keys import validate_key, validate_prefix
from .mem import MemDriver
from .registry import open_driver, redact_url, register, schemes
from .retry import RetryingDriver
from .timeout import TimeoutDriver

register("file", FileDriver.from_url)
register("mem", MemDriver.from_url)


def _lazy(module: str) -> "object":
    """A factory that imports a remote driver (and its client library) on first use."""

    def factory(url: str, **options: object) -> Driver:
        import importlib

        return importlib.import_module(f"replicas.{module}").from_url(url, **options)

    return factory


for _scheme in ("s3", "sftp", "nats"):
    register(_scheme, _lazy(_scheme))

__all__ = [
    "CHUNK_SIZE",
    "BadURL",
    "Capability",
    "Driver",
    "FileDriver",
    "IntegrityError",
    "InvalidKey",
    "MemDriver",
    "NotFound",
    "ObjectInfo",
    "PermissionDenied",
    "PreconditionFailed",
    "RetryingDriver",
    "StorageError",
    "TimeoutDriver",
    "Transient",
    "mem",
    "open_driver",
    "redact_url",
    "register",
    "schemes",
    "validate_key",
    "validate_prefix",
]
