"""The driver interface every storage backend implements, and helpers shared by drivers."""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from .errors import IntegrityError

CHUNK_SIZE = 1 << 20
"""Bytes moved per read/write when streaming; bounds a transfer's memory."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a replica knows about one stored object."""

    key: str
    size: int
    modified: float  # unix seconds
    etag: str | None = None


class Capability(enum.Flag):
    """Optional features a driver declares beyond the core operations."""

    NONE = 0
    RANGE_READ = enum.auto()  # get(offset=, length=) without reading the skipped bytes
    MULTIPART = enum.auto()  # large uploads in parts, resumable
    SERVER_COPY = enum.auto()  # copy without moving the bytes through the client
    CONDITIONAL_CREATE = enum.auto()  # put(if_absent=True) is atomic
    LOCAL = enum.auto()  # objects are on this machine: a get costs system calls, not a round trip


class Driver(abc.ABC):
    """One storage location holding objects under relative '/'-separated keys.

    Bytes in, bytes out: a driver knows nothing about SQLite. Every operation validates
    its key (see keys.validate_key) and raises only errors.StorageError subclasses.
    """

    scheme: ClassVar[str]
    capabilities: ClassVar[Capability] = Capability.NONE
    url: str  # display URL, secrets removed

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        """Store data (bytes or a binary stream read in CHUNK_SIZE pieces) under key, atomically.

        Readers see the old object or the whole new one, never a part. `size`, when given,
        is the exact length (IntegrityError otherwise, nothing stored). `progress` gets
        the total bytes sent so far after each chunk. `if_absent=True` raises
        PreconditionFailed if key exists (only with Capability.CONDITIONAL_CREATE).
        """

    @abc.abstractmethod
    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        """Open key for reading: a binary stream to close (or use as a context manager).

        offset/length select bytes like data[offset:offset + length]; raises NotFound.
        """

    def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read a whole object (or a range of it) into memory; for small objects."""
        with self.get(key, offset=offset, length=length) as stream:
            return stream.read()

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Describe key without reading it; raises NotFound."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix (a string prefix), sorted by key.

        Fetches page_size entries at a time from the backend.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; deleting a missing key is not an error."""

    def close(self) -> None:
        """Release connections and other resources; the driver is not used afterwards."""

    def reset(self) -> None:
        """Drop every connection now, so that calls blocked on them fail promptly (Transient).

        Called from another thread (by TimeoutDriver, when an operation made no progress
        for too long). The driver stays usable: the next operation connects again. Drivers
        without connections need not implement it.
        """

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def check_range(offset: int, length: int | None) -> None:
    """Reject a negative offset or length (a programming error, hence ValueError)."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"offset and length must not be negative (got {offset}, {length})")


def check_page_size(page_size: int) -> None:
    """Reject a page size below one."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1 (got {page_size})")


def iter_chunks(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    key: str,
    size: int | None = None,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Iterator[bytes | memoryview]:
    """Yield data in pieces of at most CHUNK_SIZE, calling progress with the running total.

    Raises IntegrityError (after the last chunk) when size is given and data is shorter
    or longer, so a driver can discard what it wrote. `start` resumes a transfer: that
    many bytes were sent already, so bytes data is yielded from there, a stream (which the
    caller positioned) is read from where it is, and totals and size checks count them.
    """
    total = start
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        if size is not None and size != len(view):
            raise IntegrityError(f"put {key!r}: size={size} but data has {len(view)} bytes", key=key)
        for begin in range(start, len(view), CHUNK_SIZE):
            chunk = view[begin : begin + CHUNK_SIZE]
            yield chunk
            total += len(chunk)
            if progress:
                progress(total)
        return
    if not callable(getattr(data, "read", None)):
        raise TypeError(f"data must be bytes or a binary stream, not {type(data).__name__}")
    while size is None or total < size:
        chunk = data.read(CHUNK_SIZE if size is None else min(CHUNK_SIZE, size - total))
        if not chunk:
            break
        yield chunk
        total += len(chunk)
        if progress:
            progress(total)
    if size is not None and (total < size or data.read(1)):
        raise IntegrityError(
            f"put {key!r}: size={size} but the stream {'ended after' if total < size else 'has more than'}"
            f" {total} bytes",
            key=key,
        )
