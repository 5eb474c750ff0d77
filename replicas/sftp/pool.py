"""One SSH connection per driver, carrying a pool of SFTP sessions (one per concurrent operation).

A connection found dead is re-established by the next operation. Errors on a session are
mapped here: a lost or silent connection is Transient (and retired), an SFTP status is the
matching StorageError subclass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import paramiko
from paramiko.sftp import (
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_LSTAT,
    SFTP_CONNECTION_LOST,
    SFTP_NO_CONNECTION,
    SFTP_NO_SUCH_FILE,
    SFTP_PERMISSION_DENIED,
)
from paramiko.sftp_attr import SFTPAttributes

from ..errors import NotFound, PermissionDenied, StorageError, Transient
from ..resume import mark_timeout
from .config import describe
from .connection import CONNECTION_ERRORS, Connector
from .protocol import MAX_PACKET_SIZE, MAX_REQUEST_SIZE, WINDOW_SIZE, Session, Status

log = logging.getLogger("replicas.sftp")

MAX_IDLE_SESSIONS = 8
"""SFTP sessions kept open for reuse when no operation needs them."""


class SessionPool:
    """Borrow a session for one operation, give it back after; see the module docstring.

    OpenSSH's MaxSessions (10 by default) bounds the concurrency: once the server refuses
    a session, the number open becomes this connection's limit, and operations beyond it
    wait up to `timeout` for a free session.
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.url = connector.url
        self.host_id = connector.host_id
        self.timeout = connector.timeout
        self._transport: paramiko.Transport | None = None
        self._ever_connected = False
        self._connect_attempts = 0
        self._connect_failure: StorageError | None = None
        self._connect_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())  # guards _idle and _transport swaps
        self._idle: list[Session] = []
        self._sessions: set[Session] = set()  # every open session, idle or borrowed
        self._session_limit: int | None = None  # sessions the server allows, once it refused one
        self._opening = 0  # sessions being opened
        self.closed = False

    # --- borrowing and giving back ------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        session = self.borrow()
        try:
            yield session
        except BaseException as exc:
            if not isinstance(exc, Exception):  # e.g. KeyboardInterrupt mid-reply
                session.broken = True
            raise
        finally:
            self.release(session)

    def borrow(self) -> Session:
        """A session for one operation: an idle one, else a new channel on the connection."""
        reconnected = False
        deadline: float | None = None
        while True:
            if self.closed:
                raise StorageError(f"{self.url}: the driver is closed")
            transport = self._live_transport()
            with self._cond:
                while self._idle:
                    session = self._idle.pop()
                    if session.transport is transport and session.usable():
                        return session
                    self._discard(session)
                    session.close()  # its connection is closed already: does not block
                busy = self._busy(transport) + self._opening
                if self._session_limit is not None and busy >= self._session_limit:
                    deadline = deadline or time.monotonic() + self.timeout
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Transient(
                            f"{self.url}: all {busy} SFTP sessions to {self.host_id} stayed busy for"
                            f" {self.timeout:g}s (the server allows no more)"
                        )
                    self._cond.wait(min(remaining, 1.0))
                    continue
                self._opening += 1
            try:
                try:
                    session = self._open_session(transport)
                except BaseException:
                    self._opened(None)
                    raise
            except TimeoutError as exc:
                self.drop(transport)
                raise mark_timeout(
                    Transient(f"{self.url}: no answer from {self.host_id} within {self.timeout:g}s")
                ) from exc
            except (*CONNECTION_ERRORS, Status) as exc:
                if transport.is_active():
                    with self._cond:
                        busy = self._busy(transport)
                        if busy + self._opening == 0:  # not a limit: the server will not run sftp for us
                            raise StorageError(
                                f"{self.url}: {self.host_id} refused an SFTP session: {describe(exc)}"
                            ) from exc
                        if transport is self._transport:
                            self._session_limit = max(1, busy)
                    log.debug("%s: %s refused another session with %d open", self.url, self.host_id, busy)
                    continue
                self.drop(transport)
                if reconnected:
                    raise Transient(
                        f"{self.url}: cannot open an SFTP session on {self.host_id}: {describe(exc)}"
                    ) from exc
                reconnected = True  # the connection died unnoticed: connect again, once
                continue
            self._opened(session)
            return session

    def release(self, session: Session) -> None:
        session.replies.clear()  # replies to abandoned requests
        with self._cond:
            if (
                not self.closed
                and session.transport is self._transport
                and session.usable()
                and len(self._idle) < MAX_IDLE_SESSIONS
            ):
                self._idle.append(session)
                self._cond.notify()
                return
            self._discard(session)
        session.close()

    def _opened(self, session: Session | None) -> None:
        """Count the end of a session opening (None: it failed)."""
        with self._cond:
            self._opening -= 1
            if session is not None:
                self._sessions.add(session)
                busy = self._busy(session.transport)
                if self._session_limit is not None and busy > self._session_limit:
                    self._session_limit = busy  # learnt too low while others were opening

    def _busy(self, transport: paramiko.Transport) -> int:
        """Sessions open on transport (hold self._cond)."""
        return sum(1 for session in self._sessions if session.transport is transport)

    def _discard(self, session: Session) -> None:
        """Forget a session (hold self._cond); the caller closes it."""
        self._sessions.discard(session)
        self._cond.notify_all()

    def _open_session(self, transport: paramiko.Transport) -> Session:
        channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=self.timeout)
        try:
            channel.settimeout(self.timeout)
            # invoke_subsystem waits for the reply without a timeout: close the channel if none comes.
            watchdog = threading.Timer(self.timeout, channel.close)
            watchdog.daemon = True
            watchdog.start()
            try:
                channel.invoke_subsystem("sftp")
            finally:
                watchdog.cancel()
            session = Session(paramiko.SFTPClient(channel), transport)
            try:
                t, msg = session.call(CMD_EXTENDED, "limits@openssh.com")
            except Status:
                pass  # not OpenSSH: stay with requests every server takes
            else:
                if t == CMD_EXTENDED_REPLY and msg is not None:
                    msg.get_int64()  # max packet length
                    max_read, max_write = msg.get_int64(), msg.get_int64()
                    session.read_size = min(max_read, MAX_REQUEST_SIZE) if max_read else MAX_REQUEST_SIZE
                    session.write_size = min(max_write, MAX_REQUEST_SIZE) if max_write else MAX_REQUEST_SIZE
                    session.read_size = max(session.read_size, 1024)
                    session.write_size = max(session.write_size, 1024)
            return session
        except BaseException:
            channel.close()
            raise

    # --- the connection ---------------------------------------------------------------

    def _live_transport(self) -> paramiko.Transport:
        transport = self._transport
        if transport is not None and transport.is_active():
            return transport
        attempts = self._connect_attempts
        with self._connect_lock:
            transport = self._transport
            if transport is not None and transport.is_active():
                return transport
            if transport is not None:
                self.drop(transport)
            if self.closed:
                raise StorageError(f"{self.url}: the driver is closed")
            failure = self._connect_failure
            if failure is not None and self._connect_attempts != attempts:
                # Another thread tried while we queued, and failed: do not wait that long again.
                raise type(failure)(failure.message, key=failure.key)
            self._connect_attempts += 1
            try:
                transport = self.connector.connect()
            except StorageError as exc:
                self._connect_failure = exc
                raise
            self._connect_failure = None
            with self._cond:
                if self.closed:
                    transport.close()
                    raise StorageError(f"{self.url}: the driver is closed")
                self._transport = transport
                self._session_limit = None  # learnt again on this connection
            if self._ever_connected:
                log.info("%s: reconnected to %s", self.url, self.host_id)
            self._ever_connected = True
            return transport

    def drop(self, transport: paramiko.Transport) -> None:
        """Forget a connection that failed, so that the next operation connects again."""
        with self._cond:
            if self._transport is transport:
                self._transport = None
            self._idle = [s for s in self._idle if s.transport is not transport]
        with contextlib.suppress(Exception):
            transport.close()  # first: closing a session on a stalled connection could block
        with self._cond:
            self._sessions = {s for s in self._sessions if s.transport is not transport}
            self._cond.notify_all()

    def reset(self) -> None:
        """Drop the connection now (and abort one being made); the next operation connects again."""
        with self._cond:
            transport = self._transport
        if transport is not None:
            self.drop(transport)
        self.connector.abort()

    def close(self) -> None:
        self.closed = True
        with self._cond:
            transport, self._transport = self._transport, None
            self._idle = []
            self._cond.notify_all()
        if transport is not None:
            transport.close()  # closes its sessions too

    # --- errors -----------------------------------------------------------------------

    @contextlib.contextmanager
    def connection_errors(self, session: Session, action: str, key: str) -> Iterator[None]:
        """Turn a failed connection into Transient (and retire it); Status passes through."""
        try:
            yield
        except TimeoutError as exc:
            session.broken = True
            self.drop(session.transport)
            raise mark_timeout(
                Transient(
                    f"{self.url}: cannot {action} {key!r}: no answer from {self.host_id} within {self.timeout:g}s",
                    key=key,
                )
            ) from exc
        except CONNECTION_ERRORS as exc:
            session.broken = True
            if (
                not session.transport.is_active()
                or isinstance(exc, EOFError)
                or (isinstance(exc, OSError) and exc.errno is not None)
            ):
                self.drop(session.transport)  # the next operation connects again
            error = Transient(
                f"{self.url}: cannot {action} {key!r}: connection to {self.host_id} lost ({describe(exc)})", key=key
            )
            if getattr(session.transport.sock, "gave_up", False):  # the peer stopped reading: it hangs
                mark_timeout(error)
            raise error from exc

    @contextlib.contextmanager
    def mapped(self, session: Session, action: str, key: str) -> Iterator[None]:
        """connection_errors, and error statuses as StorageError subclasses."""
        with self.connection_errors(session, action, key):
            try:
                yield
            except Status as status:
                raise self.status_error(status, action, key) from None

    def status_error(self, status: Status, action: str, key: str) -> StorageError:
        what = f"{self.url}: cannot {action} {key!r}: {status.text}"
        if status.code == SFTP_NO_SUCH_FILE and action in ("read", "stat"):
            return NotFound(f"{self.url}: {key!r} not found", key=key)
        if status.code == SFTP_PERMISSION_DENIED:
            return PermissionDenied(what, key=key)
        if status.code in (SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST):
            return Transient(what, key=key)
        return StorageError(what, key=key)


def lstat(session: Session, path: str) -> SFTPAttributes | None:
    """Attributes of path, None if it does not exist (other statuses raise Status)."""
    try:
        _, msg = session.call(CMD_LSTAT, path)
    except Status as status:
        if status.code == SFTP_NO_SUCH_FILE:
            return None
        raise
    return SFTPAttributes._from_msg(msg)
