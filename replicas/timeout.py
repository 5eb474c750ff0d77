"""Operation timeouts, as a wrapper around any driver.

A hung server (the TCP connection up, nothing answering) must not hold a replica's
uploads forever, whatever the driver and whatever its own socket timeouts. TimeoutDriver
gives every operation a deadline: op_timeout seconds without progress. When it passes, the
operation is marked expired (so the driver neither retries nor resumes it, see
activity.expired), the inner driver's reset() drops its connections so that the blocked
call fails at once, and the caller gets Transient naming the operation, the key and the
replica. The RetryingDriver around it then decides whether to try again.

Progress, not total time: head and delete have op_timeout seconds in all; a put's deadline
starts again whenever the driver notes progress (activity.note_progress: a part sent, a
write acknowledged) or takes the next chunk of the source; a get stream's whenever a read
returns (each read asks the driver for at most CHUNK_SIZE bytes); a listing's whenever an
entry arrives. Time spent in the caller's code (reading its source stream, its progress
callback, between two reads of a stream) is not counted. So a 64 MiB transfer over a slow
link lives as long as bytes keep moving.

A driver whose reset() is a no-op (file, mem) cannot be interrupted: the caller then gets
its Transient only when the blocked call returns.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from .activity import Watch, watching
from .base import CHUNK_SIZE, Driver, ObjectInfo
from .errors import Transient
from .resume import mark_timeout

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 60.0
"""Seconds an operation may go without progress; above every driver's own network timeout."""


class TimeoutDriver(Driver):
    """Runs each operation of `inner` with a deadline of op_timeout seconds without progress."""

    def __init__(
        self,
        inner: Driver,
        *,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not op_timeout > 0:
            raise ValueError(f"op_timeout must be positive (got {op_timeout!r})")
        self.inner = inner
        self.scheme = inner.scheme  # type: ignore[misc]
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.url = inner.url
        self.op_timeout = float(op_timeout)
        self._clock = clock
        self._watchdog = _Watchdog(self.op_timeout, self._expired, clock)

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        watch = Watch("put", key, self._clock)

        def report(total: int) -> None:
            watch.touch()
            if progress is not None:
                with watch.pause():
                    progress(total)

        source = _WatchedSource(data, watch) if callable(getattr(data, "read", None)) else data
        return self._run(
            watch,
            lambda: self.inner.put(key, source, size=size, progress=report, if_absent=if_absent),  # type: ignore[arg-type]
        )

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        watch = Watch("get", key, self._clock)
        stream = self._run(watch, lambda: self.inner.get(key, offset=offset, length=length))
        return io.BufferedReader(_WatchedStream(self, stream, key), buffer_size=64 << 10)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        return self._run(Watch("head", key, self._clock), lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        items = self._run(Watch("list", prefix, self._clock), lambda: self.inner.list(prefix, page_size=page_size))
        return self._watched_items(items, prefix)

    def delete(self, key: str) -> None:
        self._run(Watch("delete", key, self._clock), lambda: self.inner.delete(key))

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        self._watchdog.stop()
        self.inner.close()

    # --- watching -------------------------------------------------------------------

    def _run(self, watch: Watch, call: Callable[[], T]) -> T:
        """call() under watch; Transient if the watchdog gave up on it meanwhile."""
        with watching(watch):
            self._watchdog.add(watch)
            try:
                return call()
            except BaseException as exc:
                if watch.expired:
                    raise self._timed_out(watch) from exc
                raise
            finally:
                self._watchdog.remove(watch)

    def _watched_items(self, items: Iterator[ObjectInfo], prefix: str) -> Iterator[ObjectInfo]:
        while True:
            item = self._run(Watch("list", prefix, self._clock), lambda: next(items, None))
            if item is None:
                return
            yield item

    def _timed_out(self, watch: Watch) -> Transient:
        return mark_timeout(
            Transient(
                f"{self.url}: {watch.operation} {watch.key!r} timed out: no progress for {self.op_timeout:g}s"
                " (connections reset)",
                key=watch.key,
            )
        )

    def _expired(self, watches: list[Watch]) -> None:
        """Called by the watchdog (on its thread) with the operations it just gave up on."""
        for watch in watches:
            log.warning(
                "%s: %s %r made no progress for %gs: resetting the connections",
                self.url, watch.operation, watch.key, self.op_timeout,
            )
        # On a thread of its own: a reset that blocks must not stop the watchdog.
        threading.Thread(target=self._reset_quietly, name="replicas-timeout-reset", daemon=True).start()

    def _reset_quietly(self) -> None:
        try:
            self.inner.reset()
        except Exception:
            log.exception("%s: reset after a timeout failed", self.url)


class _WatchedSource:
    """A put's source stream: time blocked reading it is the caller's, not the driver's."""

    def __init__(self, stream: BinaryIO, watch: Watch) -> None:
        self._stream = stream
        self._watch = watch

    def read(self, size: int = -1) -> bytes:
        with self._watch.pause():
            return self._stream.read(size)

    def readinto(self, buffer: Any) -> int:
        with self._watch.pause():
            return self._stream.readinto(buffer)  # type: ignore[attr-defined]

    def seekable(self) -> bool:
        try:
            return bool(self._stream.seekable())
        except (AttributeError, OSError, ValueError):
            return False

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


class _WatchedStream(io.RawIOBase):
    """A get stream whose every read has op_timeout seconds to return some bytes."""

    def __init__(self, driver: TimeoutDriver, stream: BinaryIO, key: str) -> None:
        super().__init__()
        self._driver = driver
        self._stream = stream
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[:CHUNK_SIZE]
        watch = Watch("read", self._key, self._driver._clock)
        return self._driver._run(watch, lambda: self._read(view))

    def readall(self) -> bytes:
        # RawIOBase reads 8 KiB at a time; whole chunks cost fewer watches.
        data = bytearray()
        while chunk := self.read(CHUNK_SIZE):
            data += chunk
        return bytes(data)

    def _read(self, view: memoryview) -> int:
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            return readinto(view) or 0
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._stream.close()
        finally:
            super().close()


class _Watchdog:
    """One thread per TimeoutDriver that expires the watches without progress for `timeout` seconds.

    It sleeps until the earliest deadline, at most `timeout` (a new watch's deadline is
    never earlier than that, a deadline only moves later, and a paused watch comes back
    with a fresh one), and at most LINGER. Adding a watch wakes it only when the thread
    would otherwise sleep past the new watch's deadline: with the default op-timeout (60 s)
    against LINGER (5 s), never, so a busy replica's many short calls (77 a second at
    1,000 tx/s) do not each wake a thread. With nothing to watch for LINGER seconds the
    thread ends (the next watch starts another), so the replicas of idle databases cost no
    thread.
    """

    LINGER = 5.0

    def __init__(self, timeout: float, on_expired: Callable[[list[Watch]], None], clock: Callable[[], float]) -> None:
        self._timeout = timeout
        self._on_expired = on_expired
        self._clock = clock
        self._watches: set[Watch] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._wake_at: float | None = None  # (clock) when the sleeping thread wakes by itself

    def add(self, watch: Watch) -> None:
        with self._cond:
            self._watches.add(watch)
            if self._thread is None and not self._stopped:
                self._wake_at = None
                self._thread = threading.Thread(target=self._run, name="replicas-timeout-watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or self._wake_at > self._clock() + self._timeout:
                self._cond.notify()  # it would sleep past this watch's deadline

    def remove(self, watch: Watch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                expired, wait = self._due()
                if not expired:
                    # at most LINGER: neither removing the last watch nor adding one wakes it
                    sleep = self.LINGER if wait is None else min(wait, self.LINGER)
                    self._wake_at = self._clock() + sleep
                    self._cond.wait(sleep)
                    self._wake_at = None
                    if wait is None and not self._watches and not self._stopped:
                        self._thread = None  # under the lock: add() starts a new one
                        return
                    continue
            self._on_expired(expired)

    def _due(self) -> tuple[list[Watch], float | None]:
        """The watches past their deadline (marked expired, forgotten), and how long to sleep."""
        if not self._watches:
            return [], None
        now = self._clock()
        expired: list[Watch] = []
        wait = self._timeout
        for watch in self._watches:
            if watch.paused:
                continue
            left = watch.last + self._timeout - now
            if left <= 0:
                expired.append(watch)
            else:
                wait = min(wait, left)
        for watch in expired:
            watch.expired = True  # before the reset: the driver must not resume what fails now
            self._watches.discard(watch)
        return expired, wait
