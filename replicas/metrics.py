"""Per-operation metrics, as a wrapper around any driver (Prometheus client, default registry,
counted once the agent serves metrics: see replicas.instruments).

    replicator_replica_operation_seconds{db, replica, operation}          histogram
    replicator_replica_operation_errors_total{db, replica, operation, kind}  counter
    replicator_replica_uploaded_bytes_total{db, replica}                  counter

Wrapped inside the retry wrapper, every attempt is measured: an error counted here may
still have succeeded on retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from .base import Driver, ObjectInfo
from .errors import StorageError
from .instruments import Counter, Histogram

T = TypeVar("T")

OPERATION_SECONDS = Histogram(
    "replicator_replica_operation_seconds",
    "Duration of storage operations on a replica, per attempt.",
    ["db", "replica", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OPERATION_ERRORS = Counter(
    "replicator_replica_operation_errors_total",
    "Failed storage operations on a replica, by operation and error kind.",
    ["db", "replica", "operation", "kind"],
)
UPLOADED_BYTES = Counter(
    "replicator_replica_uploaded_bytes_total",
    "Bytes stored on a replica.",
    ["db", "replica"],
)


class MetricsDriver(Driver):
    """Measures each operation of `inner` under the labels db and replica."""

    def __init__(self, inner: Driver, *, db: str, replica: str) -> None:
        self.inner = inner
        self.scheme = inner.scheme  # type: ignore[misc]
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.url = inner.url
        self._labels = {"db": db, "replica": replica}
        self._seconds: dict[str, object] = {}
        self._uploaded = UPLOADED_BYTES.labels(**self._labels)

    def _measure(self, operation: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        except StorageError as e:
            OPERATION_ERRORS.labels(operation=operation, kind=type(e).__name__, **self._labels).inc()
            raise
        except Exception:
            OPERATION_ERRORS.labels(operation=operation, kind="other", **self._labels).inc()
            raise
        finally:
            seconds = self._seconds.get(operation)
            if seconds is None:  # labels() is a lock and a dict lookup: once per operation
                seconds = self._seconds[operation] = OPERATION_SECONDS.labels(operation=operation, **self._labels)
            seconds.observe(time.perf_counter() - started)

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        info = self._measure("put", lambda: self.inner.put(key, data, size=size, progress=progress, if_absent=if_absent))
        self._uploaded.inc(info.size)
        return info

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        return self._measure("get", lambda: self.inner.get(key, offset=offset, length=length))

    def head(self, key: str) -> ObjectInfo:
        return self._measure("head", lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        # streamed; measured as a whole, from the first page until it is consumed or closed
        started = time.perf_counter()
        try:
            yield from self.inner.list(prefix, page_size=page_size)
        except StorageError as e:
            OPERATION_ERRORS.labels(operation="list", kind=type(e).__name__, **self._labels).inc()
            raise
        finally:
            OPERATION_SECONDS.labels(operation="list", **self._labels).observe(time.perf_counter() - started)

    def delete(self, key: str) -> None:
        self._measure("delete", lambda: self.inner.delete(key))

    def close(self) -> None:
        self.inner.close()

    def reset(self) -> None:
        self.inner.reset()
