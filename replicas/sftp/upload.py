"""Atomic uploads: write a temporary file next to the key, fsync it, rename it over the key.

A put streams to ``.<name>.tmp-<16 hex>`` in the target directory (never listed), fsyncs it
(fsync@openssh.com when the server offers it) and renames it over the key with
posix-rename@openssh.com, so readers see the old object or the new one. ``if_absent``
links the temporary file with hardlink@openssh.com, which fails if the key exists. A
dropped connection mid-write resumes the temporary file (see _Transfer).

A put that fails on a connection that is gone cannot remove its temporary file then; the
uploader remembers it and removes it on the next put that reaches the server. The temporary
files of an agent killed mid-put are swept by listing once they are a day old (listing.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import posixpath
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_MKDIR,
    CMD_OPEN,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_WRITE,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from ..activity import note_progress
from ..base import ObjectInfo, iter_chunks
from ..errors import PermissionDenied, PreconditionFailed, StorageError, Transient
from ..resume import DEFAULT_BACKOFF, should_resume
from .pool import SessionPool, lstat
from .protocol import WRITE_BEHIND_BYTES, Session, Status

log = logging.getLogger("replicas.sftp")

FILE_MODE = 0o600
DIR_MODE = 0o700


class Uploader:
    """The puts of one driver (which remembers whether the server can fsync)."""

    def __init__(self, pool: SessionPool) -> None:
        self.pool = pool
        self.url = pool.url
        self.no_fsync = False
        self.orphans: set[str] = set()  # temporary files a broken connection kept us from removing

    def put(
        self,
        key: str,
        path: str,
        data: bytes | BinaryIO,
        *,
        size: int | None,
        progress: Callable[[int], None] | None,
        if_absent: bool,
    ) -> ObjectInfo:
        """Store data under path (the key's remote path) atomically."""
        transfer = _Transfer(self, key, path, _Source(data, size, progress))
        try:
            attrs = transfer.run()
            self._commit(transfer.live_session, transfer.tmp, path, key, if_absent)  # type: ignore[arg-type]
            transfer.tmp = None
        except BaseException as exc:
            transfer.abandon(exc)
            raise
        finally:
            transfer.release()
        modified = attrs.st_mtime if attrs.st_mtime is not None else time.time()
        return ObjectInfo(key, transfer.written, float(modified))

    def sweep_orphans(self, session: Session) -> None:
        """Remove the temporary files of puts that failed with their connection (best effort)."""
        for tmp in list(self.orphans):
            if session.broken:
                return
            try:
                session.call(CMD_REMOVE, tmp)
            except Status as status:
                if status.code != SFTP_NO_SUCH_FILE:
                    continue  # keep it; a later put tries again
            except Exception:  # noqa: BLE001 - the put that follows reports the connection's state
                session.broken = True
                return
            self.orphans.discard(tmp)
            log.info("%s: removed %s, left by an upload cut with its connection", self.url, tmp)

    def _create_temp(self, session: Session, directory: str, name: str, key: str) -> tuple[bytes, str]:
        short = name.encode()[:128].decode(errors="ignore")  # keep the temp name short
        attrs = SFTPAttributes()
        attrs.st_mode = FILE_MODE
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        existed = 0
        with self.pool.connection_errors(session, "write", key):
            for _ in range(8):
                tmp = f"{directory}/.{short}.tmp-{secrets.token_hex(8)}"
                try:
                    _, msg = session.call(CMD_OPEN, tmp, flags, attrs)
                    return msg.get_binary(), tmp
                except Status as status:
                    if status.code != SFTP_NO_SUCH_FILE or existed >= 2:
                        raise self.pool.status_error(status, "write", key) from None
                # Make the directory, then try again (a delete may prune it meanwhile). If
                # it was there all along, twice, the server just cannot create the file.
                existed = 0 if self._makedirs(session, directory, key) else existed + 1
        raise Transient(f"{self.url}: directory for {key!r} keeps disappearing", key=key)

    def _makedirs(self, session: Session, directory: str, key: str) -> bool:
        """mkdir -p, mode 0700: True if it made directory, False if it was there already."""
        attrs = SFTPAttributes()
        attrs.st_mode = DIR_MODE
        try:
            session.call(CMD_MKDIR, directory, attrs)
            return True
        except Status as status:
            failure = status
        if failure.code == SFTP_NO_SUCH_FILE and posixpath.dirname(directory) != directory:
            self._makedirs(session, posixpath.dirname(directory), key)
            try:
                session.call(CMD_MKDIR, directory, attrs)
                return True
            except Status as status:
                failure = status
        if failure.code == SFTP_PERMISSION_DENIED:
            raise PermissionDenied(
                f"{self.url}: cannot write {key!r}: cannot create {directory}: {failure.text}", key=key
            )
        attrs = lstat(session, directory)  # mkdir fails when it exists: fine if a directory
        if attrs is not None and attrs.st_mode is not None and stat.S_ISDIR(attrs.st_mode):
            return False
        if attrs is None:
            return True  # gone again (a concurrent delete pruned it): the caller retries
        raise StorageError(
            f"{self.url}: cannot write {key!r}: {directory} exists and is not a directory"
            " (a file and a directory share a name)",
            key=key,
        )

    def _wait_fsync(self, session: Session, num: int) -> None:
        try:
            session.wait(num)
        except Status as status:
            if status.code != SFTP_OP_UNSUPPORTED:
                raise
            if not self.no_fsync:
                self.no_fsync = True
                log.info("%s: the server does not support fsync@openssh.com; puts are not fsynced", self.url)

    def _commit(self, session: Session, tmp: str, path: str, key: str, if_absent: bool) -> None:
        """Move the finished temporary file to the key's name (atomically)."""
        pool = self.pool
        with pool.connection_errors(session, "write", key):
            if if_absent:
                try:
                    session.call(CMD_EXTENDED, "hardlink@openssh.com", tmp, path)
                except Status as status:
                    if status.code == SFTP_OP_UNSUPPORTED:
                        raise StorageError(
                            f"{self.url}: cannot write {key!r} if absent: the server lacks hardlink@openssh.com",
                            key=key,
                        ) from None
                    if status.code == SFTP_FAILURE and lstat(session, path) is not None:
                        raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key) from None
                    raise pool.status_error(status, "write", key) from None
                with contextlib.suppress(Status):
                    session.call(CMD_REMOVE, tmp)
                return
            try:
                session.call(CMD_EXTENDED, "posix-rename@openssh.com", tmp, path)
                return
            except Status as status:
                if status.code != SFTP_OP_UNSUPPORTED:
                    raise pool.status_error(status, "write", key) from None
            # A server without posix-rename: plain SFTP rename refuses to replace a file.
            try:
                session.call(CMD_RENAME, tmp, path)
                return
            except Status as status:
                if status.code != SFTP_FAILURE or lstat(session, path) is None:
                    raise pool.status_error(status, "write", key) from None
            log.warning("%s: no posix-rename@openssh.com; replacing %r is not atomic", self.url, key)
            try:
                with contextlib.suppress(Status):
                    session.call(CMD_REMOVE, path)
                session.call(CMD_RENAME, tmp, path)
            except Status as status:
                raise pool.status_error(status, "write", key) from None

    def _abandon(self, session: Session, inflight: Iterable[int], handle: bytes | None, tmp: str | None) -> None:
        """After a failed put: collect the replies, close and remove the temporary file."""
        if session.broken:
            if tmp is not None:
                self.orphans.add(tmp)  # the next put on a working connection removes it
            return
        try:
            for num in inflight:
                with contextlib.suppress(Status):
                    session.wait(num)
            if handle is not None:
                with contextlib.suppress(Status):
                    session.call(CMD_CLOSE, handle)
            if tmp is not None:
                with contextlib.suppress(Status):
                    session.call(CMD_REMOVE, tmp)
        except BaseException:  # noqa: BLE001 - the put's own error is what the caller gets
            session.broken = True  # leave it to the pool to throw away
            if tmp is not None:
                self.orphans.add(tmp)


class _Source:
    """The data of one put, readable again from any offset if it is bytes or a seekable stream.

    Progress is reported only beyond the highest total reported before, so that bytes
    sent again after a resume do not make the caller's progress go backwards.
    """

    def __init__(self, data: bytes | BinaryIO, size: int | None, progress: Callable[[int], None] | None) -> None:
        self.data = data
        self.size = size
        self._progress = progress
        self._reported = 0
        self._origin = None if isinstance(data, (bytes, bytearray, memoryview)) else _position(data)
        self.rewindable = self._origin is not None or isinstance(data, (bytes, bytearray, memoryview))

    def chunks(self, key: str, offset: int) -> Iterator[bytes | memoryview]:
        """The data from offset on (a stream must have been rewound there)."""
        return iter_chunks(self.data, key=key, size=self.size, progress=self._report, start=offset)

    def rewind(self, offset: int) -> None:
        """Position a stream at offset bytes from where the put started reading it."""
        if self._origin is not None:
            self.data.seek(self._origin + offset)  # type: ignore[union-attr]

    def _report(self, total: int) -> None:
        if total > self._reported:
            self._reported = total
            if self._progress is not None:
                self._progress(total)


def _position(stream: object) -> int | None:
    """Where a seekable stream is now; None if it cannot seek (then an upload cannot resume)."""
    try:
        return stream.tell() if stream.seekable() else None  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


class _Transfer:
    """One put's temporary file, and how much of it the server has acknowledged.

    A dropped connection (see resume.should_resume) does not cost the bytes already
    written: the transfer reconnects, reopens the temporary file, and goes on from the
    bytes both acknowledged and present (the file's size by fstat, in case of doubt the
    smaller), with the source rewound there. A source that cannot seek cannot resume: the
    error goes up, and the caller has to restart the put.
    """

    def __init__(self, uploader: Uploader, key: str, path: str, source: _Source) -> None:
        self.uploader = uploader
        self.pool = uploader.pool
        self.key = key
        self.path = path
        self.source = source
        self.session: Session | None = None
        self.handle: bytes | None = None
        self.tmp: str | None = None
        self.inflight: collections.deque[tuple[int, int]] = collections.deque()  # (request, end offset)
        self.written = 0  # bytes sent
        self.acked = 0  # bytes the server confirmed writing: always a prefix of the file
        self.resumes = 0

    @property
    def live_session(self) -> Session:
        assert self.session is not None
        return self.session

    def run(self) -> SFTPAttributes:
        """Write the whole temporary file, fsync and close it; its attributes."""
        self.session = self.pool.borrow()
        if self.uploader.orphans:
            self.uploader.sweep_orphans(self.session)
        directory, name = posixpath.split(self.path)
        self.handle, self.tmp = self.uploader._create_temp(self.session, directory, name, self.key)
        while True:
            try:
                self._send()
                return self._finish()
            except Transient as exc:
                if self.session is not None and not self.session.broken:
                    raise  # not our connection (a progress callback's error, say): nothing to resume
                self._resume(exc)

    def _send(self) -> None:
        session, pool = self.live_session, self.pool
        step = session.write_size
        depth = max(4, WRITE_BEHIND_BYTES // step)
        for chunk in self.source.chunks(self.key, self.written):
            view = memoryview(chunk).cast("B")
            with pool.mapped(session, "write", self.key):
                for start in range(0, len(view), step):
                    piece = view[start : start + step]
                    num = session.send(CMD_WRITE, self.handle, int64(self.written), piece)
                    self.written += len(piece)
                    self.inflight.append((num, self.written))
                    while len(self.inflight) > depth:
                        self._acknowledged()

    def _acknowledged(self) -> None:
        """Wait for the oldest write in flight."""
        num, end = self.inflight.popleft()
        self.live_session.wait(num)
        self.acked = end
        note_progress()

    def _finish(self) -> SFTPAttributes:
        session, uploader = self.live_session, self.uploader
        with self.pool.mapped(session, "write", self.key):
            # fsync, fstat and close go with the last writes: one round trip in all.
            sync_num = None if uploader.no_fsync else session.send(CMD_EXTENDED, "fsync@openssh.com", self.handle)
            stat_num = session.send(CMD_FSTAT, self.handle)
            close_num = session.send(CMD_CLOSE, self.handle)
            self.handle = None
            while self.inflight:
                self._acknowledged()
            if sync_num is not None:
                uploader._wait_fsync(session, sync_num)
            _, msg = session.wait(stat_num)
            attrs = SFTPAttributes._from_msg(msg)
            session.wait(close_num)
        return attrs

    def _resume(self, error: Transient) -> None:
        """Go on on a new connection from where the server got to, or raise the error that stopped us."""
        first = error
        backoff = DEFAULT_BACKOFF
        while True:
            self.resumes += 1
            if self.resumes > backoff.attempts or not should_resume(error) or not self.source.rewindable:
                raise first
            log.warning(
                "%s: resuming the upload of %r (attempt %d of %d) after: %s",
                self.uploader.url, self.key, self.resumes, backoff.attempts, error,
            )
            self._drop_session()
            backoff.wait(self.resumes)
            try:
                self._reopen()
                return
            except Transient as exc:
                error = exc

    def _drop_session(self) -> None:
        session, self.session = self.session, None
        self.handle = None
        self.inflight.clear()
        if session is not None:
            session.broken = True
            self.pool.release(session)

    def _reopen(self) -> None:
        """Open the temporary file again on a new session, cut to what is surely there, and rewind."""
        self.session = session = self.pool.borrow()
        pool, key = self.pool, self.key
        with pool.mapped(session, "write", key):
            try:
                _, msg = session.call(CMD_OPEN, self.tmp, SFTP_FLAG_WRITE, SFTPAttributes())
            except Status as status:
                if status.code != SFTP_NO_SUCH_FILE:
                    raise
                directory, name = posixpath.split(self.path)  # gone: start over in a new one
                self.handle, self.tmp = self.uploader._create_temp(session, directory, name, key)
                offset = 0
            else:
                self.handle = msg.get_binary()
                _, msg = session.call(CMD_FSTAT, self.handle)
                offset = min(SFTPAttributes._from_msg(msg).st_size or 0, self.acked)
                cut = SFTPAttributes()
                cut.st_size = offset
                with contextlib.suppress(Status):  # best effort: the same bytes are written again anyway
                    session.call(CMD_FSETSTAT, self.handle, cut)  # drop unacknowledged bytes past offset
        try:
            self.source.rewind(offset)
        except (OSError, ValueError) as exc:
            raise StorageError(f"{self.uploader.url}: cannot resume {key!r}: the source cannot seek back", key=key) from exc
        self.written = self.acked = offset
        log.info("%s: resuming the upload of %r at byte %d", self.uploader.url, key, offset)

    def abandon(self, exc: BaseException) -> None:
        """After a failure: clean up what the server still has, if it can be reached."""
        session = self.session
        if session is None:  # lost while resuming: no connection to clean up with
            if self.tmp is not None:
                self.uploader.orphans.add(self.tmp)
            return
        if not isinstance(exc, Exception):  # e.g. KeyboardInterrupt mid-reply
            session.broken = True
        self.uploader._abandon(session, [num for num, _ in self.inflight], self.handle, self.tmp)

    def release(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.pool.release(session)
