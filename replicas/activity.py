"""Progress signals from inside a driver to the TimeoutDriver watching the current operation.

A TimeoutDriver bounds the time an operation goes without progress, not its whole length,
so that a large transfer over a slow link is not killed. Only the driver knows when bytes
really move (a part sent, a write acknowledged, a chunk received), so it calls
note_progress() there. The watch travels in a context variable: it follows the operation
into the driver's code on the caller's thread, and into coroutines the caller submits to
an event loop (asyncio copies the context), without any driver knowing of the wrapper.
Outside a TimeoutDriver both functions cost one context variable lookup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar


class Watch:
    """One operation (or one read of a stream) watched for progress.

    `paused` counts sections where the time spent is not the driver's (reading the
    caller's source stream, running the caller's progress callback): they never expire.
    """

    __slots__ = ("_clock", "expired", "key", "last", "operation", "paused")

    def __init__(self, operation: str, key: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.operation = operation
        self.key = key
        self._clock = clock
        self.last = clock()
        self.paused = 0
        self.expired = False

    def touch(self) -> None:
        """Progress was made: the deadline starts again."""
        self.last = self._clock()

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time spent inside is not counted (the deadline starts again after)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.touch()


_current: ContextVar[Watch | None] = ContextVar("replicas_watch", default=None)


def note_progress() -> None:
    """Tell the TimeoutDriver watching this operation, if any, that bytes moved."""
    watch = _current.get()
    if watch is not None:
        watch.touch()


def expired() -> bool:
    """True if a TimeoutDriver gave up on this operation: a driver must not retry or resume it."""
    watch = _current.get()
    return watch is not None and watch.expired


@contextlib.contextmanager
def watching(watch: Watch) -> Iterator[Watch]:
    """Make watch the current operation's watch for the code inside."""
    token = _current.set(watch)
    try:
        yield watch
    finally:
        _current.reset(token)
