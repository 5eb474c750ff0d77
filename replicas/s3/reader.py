"""The body of an S3 GET as a raw stream: errors mapped, a length limit, the connection released."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from ..activity import note_progress
from .errors import ErrorMapper


class Body(io.RawIOBase):
    """The body of a GET: maps read errors, honours a limit, releases the connection on close.

    `skip` bytes are dropped first: a server that ignores Range sends the whole object.
    """

    def __init__(
        self, errors: ErrorMapper, response: Any, key: str, *, skip: int, limit: int | None
    ) -> None:
        self._errors = errors
        self._response = response
        self._key = key
        self._skip = skip
        self._left = limit
        self._eof = False

    def readable(self) -> bool:
        return True

    def limit_to(self, count: int) -> None:
        """Deliver at most count bytes: reaching that end frees the connection for reuse."""
        if self._left is None or count < self._left:
            self._left = count

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        if not view or self._eof:
            return 0
        try:
            while self._skip:
                dropped = self._response.read(min(self._skip, 1 << 20))
                if not dropped:
                    break
                self._skip -= len(dropped)
            data = self._response.read(len(view))
        except Exception as exc:  # noqa: BLE001
            raise self._errors.translate(exc, "read", self._key) from None
        if not data:
            self._eof = True
            return 0
        n = len(data)
        view[:n] = data
        if self._left is not None:
            self._left -= n
        note_progress()
        return n

    def readall(self) -> bytes:
        out = bytearray()
        while True:
            chunk = self.read(1 << 20)
            if not chunk:
                return bytes(out)
            out += chunk

    def close(self) -> None:
        if self.closed:
            return
        response, self._response = self._response, None
        with contextlib.suppress(Exception):  # closing never fails the caller
            done = self._eof or (
                self._left == 0 and not self._skip and _exhausted(response)
            )
            if not done:
                response.close()  # unread bytes on the wire: the connection cannot be reused
            response.release_conn()
        super().close()


def _exhausted(response: Any) -> bool:
    try:
        remaining = response.length_remaining
    except AttributeError:
        return False
    return remaining == 0
