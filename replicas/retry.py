"""Retry with exponential backoff and full jitter, as a wrapper around any driver."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from .base import Driver, ObjectInfo
from .errors import Transient

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingDriver(Driver):
    """Runs each operation of `inner` up to `attempts` times while it fails with Transient.

    The wait before retry n (n = 1, 2, ...) is uniform in [0, min(max_delay,
    base_delay * 2**(n-1))]. Other errors pass through at once. A put from a stream is
    retried only if the stream is seekable (it is rewound first). get retries opening the
    stream, not reading it (the s3 and sftp drivers resume a read cut short themselves, see
    resume.py); list resumes after the last key it yielded.
    """

    def __init__(
        self,
        inner: Driver,
        *,
        attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1 (got {attempts})")
        self.inner = inner
        self.scheme = inner.scheme  # type: ignore[misc]
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.url = inner.url
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._jitter = jitter

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(retry - 1, 64))
        return self._jitter() * ceiling

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        # Note: a lost reply to a successful if_absent put makes the retry raise PreconditionFailed.
        def attempt() -> ObjectInfo:
            return self.inner.put(key, data, size=size, progress=progress, if_absent=if_absent)

        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._call("put", key, attempt)
        if not _seekable(data):
            return attempt()  # cannot replay a consumed stream
        start = data.tell()
        return self._call("put", key, attempt, before_retry=lambda: data.seek(start))

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        return self._call("get", key, lambda: self.inner.get(key, offset=offset, length=length))

    def head(self, key: str) -> ObjectInfo:
        return self._call("head", key, lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        first = self._call("list", prefix, lambda: self.inner.list(prefix, page_size=page_size))
        return self._resuming_list(first, prefix, page_size)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def close(self) -> None:
        self.inner.close()

    def reset(self) -> None:
        self.inner.reset()

    def _call(
        self,
        operation: str,
        key: str,
        attempt: Callable[[], T],
        before_retry: Callable[[], object] | None = None,
    ) -> T:
        for number in range(1, self.attempts + 1):
            try:
                return attempt()
            except Transient as exc:
                if number == self.attempts:
                    raise
                self._wait(operation, key, number, exc)
                if before_retry is not None:
                    before_retry()
        raise AssertionError("unreachable")

    def _resuming_list(
        self, items: Iterator[ObjectInfo] | None, prefix: str, page_size: int
    ) -> Iterator[ObjectInfo]:
        last: str | None = None
        failures = 0  # consecutive, reset by progress
        while True:
            try:
                if items is None:
                    items = self.inner.list(prefix, page_size=page_size)
                for info in items:
                    if last is not None and info.key <= last:
                        continue  # already yielded before the failure
                    last, failures = info.key, 0
                    yield info
                return
            except Transient as exc:
                failures += 1
                if failures >= self.attempts:
                    raise
                self._wait("list", prefix, failures, exc)
                items = None

    def _wait(self, operation: str, key: str, retry: int, exc: Transient) -> None:
        seconds = self.delay(retry)
        log.warning(
            "retrying %s %r on %s in %.2fs (retry %d of %d): %s",
            operation, key, self.url, seconds, retry, self.attempts - 1, exc,
        )
        self._sleep(seconds)


def _seekable(stream: object) -> bool:
    try:
        return bool(stream.seekable())  # type: ignore[attr-defined]
    except Exception:
        return False
