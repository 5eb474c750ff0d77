"""A get stream: bytes of an open remote file, read ahead in pipelined requests (bounded memory)."""

from __future__ import annotations

import collections
import contextlib
import io

from paramiko.sftp import CMD_CLOSE, CMD_DATA, CMD_READ, SFTP_EOF, SFTPError, int64

from ..activity import note_progress
from .pool import SessionPool
from .protocol import READ_AHEAD_BYTES, Session, Status


class Reader(io.RawIOBase):
    """Bytes [pos, end) of an open remote file; the session goes back to the pool on close."""

    def __init__(
        self,
        pool: SessionPool,
        session: Session,
        handle: bytes,
        key: str,
        pos: int,
        end: int,
        inflight: collections.deque[tuple[int, int, int]],
    ) -> None:
        super().__init__()
        self._pool = pool
        self._session: Session | None = session
        self._handle = handle
        self._key = key
        self._pos = pos
        self._end = end
        self._inflight = inflight  # (request number, offset, length), in offset order
        self._next = pos + sum(length for _, _, length in inflight)
        self._depth = max(4, READ_AHEAD_BYTES // session.read_size)
        self._pending = memoryview(b"")

    @property
    def end(self) -> int:
        """Where the stream stops (the file's size when opened, or the range's end)."""
        return self._end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        if not len(self._pending):
            self._fetch()
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def readall(self) -> bytes:
        parts = [bytes(self._pending)]
        self._pending = memoryview(b"")
        while True:
            self._fetch()
            if not len(self._pending):
                return b"".join(parts)
            parts.append(bytes(self._pending))
            self._pending = memoryview(b"")

    def _fetch(self) -> None:
        """Make _pending the next bytes (empty at the end)."""
        session = self._session
        if session is None:
            raise ValueError("I/O operation on closed file")
        if self._pos >= self._end:
            return
        pool, key = self._pool, self._key
        with pool.connection_errors(session, "read", key):
            while len(self._inflight) < self._depth and self._next < self._end:
                length = min(session.read_size, self._end - self._next)
                self._inflight.append(
                    (session.send(CMD_READ, self._handle, int64(self._next), length), self._next, length)
                )
                self._next += length
            if not self._inflight:
                self._end = self._pos
                return
            num, offset, length = self._inflight.popleft()
            try:
                t, msg = session.wait(num)
            except Status as status:
                if status.code == SFTP_EOF:  # shorter than when opened: end here
                    self._end = self._pos
                    return
                raise pool.status_error(status, "read", key) from None
            if t != CMD_DATA or msg is None:
                raise SFTPError(f"expected data, got reply type {t}")
            data = msg.get_string()[:length]
            if not data:
                self._end = self._pos
                return
            if len(data) < length:  # a short read: ask for the rest first
                rest = offset + len(data)
                num = session.send(CMD_READ, self._handle, int64(rest), length - len(data))
                self._inflight.appendleft((num, rest, length - len(data)))
            self._pos = offset + len(data)
            self._pending = memoryview(data)
        note_progress()

    def close(self) -> None:
        if self.closed:
            return
        session, self._session = self._session, None
        try:
            if session is not None:
                if not session.broken:
                    try:
                        if sum(length for _, _, length in self._inflight) > (1 << 20):
                            session.broken = True  # cheaper to drop the session than to drain it
                        else:
                            for num, _, _ in self._inflight:
                                with contextlib.suppress(Status):
                                    session.wait(num)
                            session.send_forget(CMD_CLOSE, self._handle)
                    except BaseException:  # noqa: BLE001 - closing must not fail
                        session.broken = True
                self._inflight.clear()
                self._pool.release(session)
        finally:
            super().close()
