"""Resuming interrupted transfers, shared by the drivers whose backend allows it.

A large transfer cut by a dropped connection should continue where it stopped, not start
over: these helpers decide when that is worth trying (should_resume), how long to wait in
between (Backoff), and, for downloads, do it once for every driver (ResumingReader over a
driver's ranged open).

What is resumed: Transient errors that are not timeouts. A timeout means the server is
there but hung: another attempt would most likely wait out the timeout again, so the error
goes up at once and the caller's retry policy decides. Nothing is resumed either once a
TimeoutDriver has given up on the operation (activity.expired()).
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from . import activity
from .errors import IntegrityError, NotFound, StorageError, Transient

log = logging.getLogger(__name__)
E = TypeVar("E", bound=StorageError)


def mark_timeout(error: E) -> E:
    """Mark error as the result of waiting out a timeout (see is_timeout); returns it."""
    error.timed_out = True  # type: ignore[attr-defined]
    return error


def is_timeout(error: BaseException) -> bool:
    """True if the error came from waiting out a timeout (the server is hung, not gone)."""
    return bool(getattr(error, "timed_out", False))


def should_resume(error: BaseException) -> bool:
    """Whether a transfer that failed with error is worth resuming (see the module docstring)."""
    return isinstance(error, Transient) and not is_timeout(error) and not activity.expired()


@dataclass(frozen=True)
class Backoff:
    """Bounded attempts with exponential backoff and full jitter, for resumes inside a driver.

    Short on purpose: a driver resumes a transfer in progress; waiting out a real outage is
    the job of the RetryingDriver around it. Wait n (1-based) is uniform in
    [0, min(max_delay, base_delay * 2**(n-1))].
    """

    attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random

    def wait(self, attempt: int) -> None:
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 64))
        self.sleep(self.jitter() * ceiling)


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class Version:
    """What identifies one revision of an object; a resumed read must find the same."""

    size: int
    etag: str | None = None
    modified: float | None = None

    def same_as(self, other: Version) -> bool:
        """Equal size, and equal etag and modification time where both sides know them."""
        if self.size != other.size:
            return False
        if self.etag is not None and other.etag is not None and self.etag != other.etag:
            return False
        return self.modified is None or other.modified is None or self.modified == other.modified


RangeOpener = Callable[[int, int], tuple[BinaryIO, Version]]
"""open(offset, length) -> (a raw stream of bytes [offset, offset + length) of the object as
it is now, and its Version). Raises NotFound if the object is gone."""


class ResumingReader(io.RawIOBase):
    """Bytes [offset, end) of one object revision, re-opened from where it stopped after a drop.

    A Transient error while reading (see should_resume) closes the broken stream and opens
    the object again at the current offset, up to backoff.attempts times per stream. The
    object must not have changed meanwhile (Version.same_as), else IntegrityError: bytes
    of two revisions must never be mixed. A stream that ends before `end` (or a deleted
    object) is IntegrityError too: the caller gets every byte or an error.
    """

    def __init__(
        self,
        opener: RangeOpener,
        *,
        url: str,
        key: str,
        offset: int,
        end: int,
        stream: BinaryIO,
        version: Version,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__()
        self._opener = opener
        self._url = url
        self._key = key
        self._pos = offset
        self._end = end
        self._stream: BinaryIO | None = stream
        self._version = version
        self._backoff = backoff
        self._resumes = 0
        self._failure: StorageError | None = None  # why the stream gave up, raised again by every read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._failure is not None:
            raise self._failure
        if self._stream is None:
            raise ValueError("I/O operation on closed stream")
        view = memoryview(buffer).cast("B")[: self._end - self._pos]
        if not len(view):
            return 0
        while True:
            try:
                n = self._stream.readinto(view)  # type: ignore[attr-defined]
            except StorageError as exc:
                try:
                    self._resume(exc)
                except StorageError as final:
                    self._failure = final
                    raise
                continue
            if not n:
                raise IntegrityError(
                    f"{self._url}: {self._key!r} ended after byte {self._pos} of {self._end} (short read)",
                    key=self._key,
                )
            self._pos += n
            return n

    def close(self) -> None:
        if self.closed:
            return
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                stream.close()
        finally:
            super().close()

    def _resume(self, error: StorageError) -> None:
        """Replace the broken stream by one opened at the current offset, or raise."""
        while True:
            self._resumes += 1
            if self._resumes > self._backoff.attempts or not should_resume(error):
                raise error
            log.warning(
                "%s: resuming the read of %r at byte %d (attempt %d of %d) after: %s",
                self._url, self._key, self._pos, self._resumes, self._backoff.attempts, error,
            )
            self._drop_stream()
            self._backoff.wait(self._resumes)
            try:
                stream, version = self._opener(self._pos, self._end - self._pos)
            except NotFound:
                raise self._changed("was deleted") from None
            except StorageError as exc:
                error = exc
                continue
            if not version.same_as(self._version):
                stream.close()
                raise self._changed("changed")
            self._stream = stream
            return

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # it is broken already
                stream.close()

    def _changed(self, what: str) -> IntegrityError:
        return IntegrityError(
            f"{self._url}: {self._key!r} {what} while being read (at byte {self._pos}); read it again",
            key=self._key,
        )
