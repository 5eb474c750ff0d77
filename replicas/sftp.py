"""The `sftp` driver: objects are files below a directory on an SSH server, through paramiko.

URL: ``sftp://[USER[:PASSWORD]@]HOST[:PORT]/ABS/PATH[?option=value&...]``. The URL path is
the remote root directory, always absolute (``sftp://host/srv/backup`` is /srv/backup on
the server, ``sftp://host/`` its /), percent-decoded; it is created on the first put. As
elsewhere in replicator the last '@' ends the user-info, so write an '@' in the path as %40.

Options (keyword options from the configuration, or the same names in the query; a value
given both ways must agree): `user` (default: the URL user, else the local user name),
`password` (option or URL user-info only, never in the query; also tried as the passphrase
of an encrypted key file), `key_path` (a private key file: Ed25519, ECDSA or RSA),
`known_hosts_path`, `host_key` (a pinned public key line such as "ssh-ed25519 AAAA..."),
`timeout` (seconds, default 30: connecting, authenticating, and waiting for any answer).
With neither key_path nor password the driver tries, like ssh, the agent's keys and then
~/.ssh/id_ed25519, id_ecdsa and id_rsa.

Host keys are always verified, never learned: against host_key when given, else against
known_hosts_path (default ~/.ssh/known_hosts), where a server on a port other than 22 is
listed as "[HOST]:PORT". An unknown or changed key raises PermissionDenied naming the host
and the key the server offered. (``@revoked`` and ``@cert-authority`` lines are not
supported.)

Layout and guarantees match the file driver: a key's segments are directories; a put
streams to ``.<name>.tmp-<16 hex>`` in the target directory (never listed), fsyncs it
(fsync@openssh.com when the server offers it) and renames it over the key with
posix-rename@openssh.com, so readers see the old object or the new one. ``if_absent``
links the temporary file with hardlink@openssh.com, which fails if the key exists.
Delete prunes directories left empty, up to the root. Symlinks are not objects: list skips
them, head and get report NotFound. A put cut off by a lost connection can leave its
temporary file behind; it is never listed.

One SSH connection per driver carries a small pool of SFTP sessions (channels), one per
concurrent operation, so threads do not wait for each other (OpenSSH's MaxSessions, 10 by
default, bounds the concurrency; an operation beyond it waits up to `timeout` for a free
session). A connection found dead is re-established on the next operation. Reads and
writes are pipelined (many requests in flight, large requests when the server announces
limits@openssh.com) with bounded memory. Socket errors, EOF and timeouts raise Transient.

paramiko's SFTPClient is used for the session handshake and its request plumbing
(`_async_request`, `_read_response`, as its own SFTPFile does), not for its file objects:
those drop the errors of pipelined writes and decode names strictly.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import getpass
import hashlib
import io
import logging
import os
import posixpath
import secrets
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_RMDIR,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_CONNECTION_LOST,
    SFTP_DESC,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_CONNECTION,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    SFTPError,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from .base import (
    Capability,
    Driver,
    ObjectInfo,
    check_page_size,
    check_range,
    iter_chunks,
)
from .errors import (
    BadURL,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from .keys import TEMP_NAME, validate_key, validate_prefix
from .registry import redact_url

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
DEFAULT_TIMEOUT = 30.0
WINDOW_SIZE = 16 << 20
"""SSH channel window: how much the server may send before we consume it (bounds memory)."""
MAX_PACKET_SIZE = 256 << 10
"""Largest SSH packet we accept; bigger packets mean fewer to decrypt one by one."""
BASIC_REQUEST_SIZE = 32 << 10
"""Read/write request size every SFTP server accepts."""
MAX_REQUEST_SIZE = 255 << 10
"""Largest read/write request we send when the server's limits allow (OpenSSH: 255 KiB)."""
READ_AHEAD_BYTES = 8 << 20
"""Bytes of read requests kept in flight by a get stream."""
WRITE_BEHIND_BYTES = 8 << 20
"""Bytes of write requests in flight (sent, not yet acknowledged) during a put."""
MAX_IDLE_SESSIONS = 8
"""SFTP sessions kept open for reuse when no operation needs them."""
KEEPALIVE_SECONDS = 30

_OPTIONS = ("user", "password", "key_path", "known_hosts_path", "host_key", "timeout")
_QUERY_OPTIONS = frozenset(_OPTIONS) - {"password"}
_DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
# Errors that mean the session (or the whole connection) can no longer be trusted.
_CONNECTION_ERRORS = (paramiko.SSHException, SFTPError, EOFError, OSError)


class _Status(Exception):
    """An SFTP status reply other than OK (internal: mapped to StorageError subclasses)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text or (SFTP_DESC[code] if 0 <= code < len(SFTP_DESC) else f"status {code}")


class _Session:
    """One SFTP session on one SSH channel, used by one thread at a time.

    Requests are sent with paramiko's `_async_request` registering this object as the
    receiver, so a reply read while waiting for another request is kept here, never lost.
    """

    def __init__(self, sftp: paramiko.SFTPClient, transport: paramiko.Transport) -> None:
        self.sftp = sftp
        self.transport = transport
        self.replies: dict[int, tuple[int, paramiko.Message]] = {}
        self.broken = False
        self.read_size = BASIC_REQUEST_SIZE
        self.write_size = BASIC_REQUEST_SIZE

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:  # called by paramiko
        self.replies[num] = (t, msg)

    def send(self, t: int, *args: object) -> int:
        return self.sftp._async_request(self, t, *args)

    def send_forget(self, t: int, *args: object) -> None:
        """Send a request whose reply is discarded when it arrives."""
        self.sftp._async_request(type(None), t, *args)

    def wait(self, num: int) -> tuple[int, paramiko.Message | None]:
        """The reply to request num; raises _Status for an error status."""
        replies = self.replies
        while num not in replies:
            self.sftp._read_response()  # one packet, handed to whoever sent its request
        t, msg = replies.pop(num)
        if t == CMD_STATUS:
            code = msg.get_int()
            if code != SFTP_OK:
                raise _Status(code, msg.get_string().decode("utf-8", "replace"))
            return t, None
        return t, msg

    def call(self, t: int, *args: object) -> tuple[int, paramiko.Message | None]:
        return self.wait(self.send(t, *args))

    def usable(self) -> bool:
        return not self.broken and not self.sftp.sock.closed and self.transport.is_active()

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.sftp.close()


class _GuardedSocket(socket.socket):
    """A socket whose send gives up after `stall_timeout` seconds without progress.

    paramiko's packet writer retries a send that times out for as long as the connection
    is open, so a server that stops reading (hung, or a dead link whose TCP buffers are
    full) would block a put forever; this turns that into an error that ends the
    connection.
    """

    stall_timeout = DEFAULT_TIMEOUT
    _stalled_since: float | None = None

    def send(self, data, flags: int = 0) -> int:  # type: ignore[no-untyped-def, override]
        try:
            sent = super().send(data, flags)
        except TimeoutError:
            now = time.monotonic()
            if self._stalled_since is None:
                self._stalled_since = now
            elif now - self._stalled_since > self.stall_timeout:
                # Not ETIMEDOUT: that would be a TimeoutError, which paramiko retries.
                raise ConnectionAbortedError(errno.ECONNABORTED, "the server stopped reading") from None
            raise
        self._stalled_since = None
        return sent


class SFTPDriver(Driver):
    """Objects stored as files below a directory on an SSH server."""

    scheme = "sftp"
    capabilities = Capability.RANGE_READ | Capability.CONDITIONAL_CREATE

    def __init__(
        self,
        host: str,
        root: str,
        *,
        port: int = DEFAULT_PORT,
        user: str | None = None,
        password: str | None = None,
        key_path: str | os.PathLike[str] | None = None,
        known_hosts_path: str | os.PathLike[str] | None = None,
        host_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not host:
            raise BadURL("sftp replica needs a host: sftp://[USER@]HOST[:PORT]/PATH")
        if not isinstance(root, str) or not root.startswith("/"):
            raise BadURL(f"sftp replica root must be an absolute path, not {root!r}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise BadURL(f"invalid port {port!r} for sftp replica on {host}")
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            raise BadURL(f"sftp option timeout must be a number of seconds, not {timeout!r}") from None
        if not timeout > 0:
            raise BadURL(f"sftp option timeout must be positive (got {timeout!r})")
        self.host = host
        self.port = port
        self.root = posixpath.normpath(root)
        self._root_prefix = self.root.rstrip("/") + "/"
        if not user:
            try:
                user = getpass.getuser()
            except (KeyError, OSError):
                raise BadURL(
                    f"sftp replica on {host} needs a user: no user given and the local user name is unknown"
                ) from None
        self.user = user
        self._password = password
        self.key_path = os.fspath(key_path) if key_path is not None else None
        self.known_hosts_path = os.fspath(known_hosts_path) if known_hosts_path is not None else None
        self.host_key = _parse_host_key(host_key) if host_key is not None else None
        self.timeout = timeout
        self.host_id = f"[{host}]:{port}" if port != DEFAULT_PORT else host
        netloc = f"[{host}]" if ":" in host else host
        if port != DEFAULT_PORT:
            netloc += f":{port}"
        self.url = f"sftp://{urllib.parse.quote(self.user, safe='')}@{netloc}{urllib.parse.quote(self.root)}"

        self._transport: paramiko.Transport | None = None
        self._ever_connected = False
        self._connect_attempts = 0
        self._connect_failure: StorageError | None = None
        self._connect_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())  # guards _idle and _transport swaps
        self._idle: list[_Session] = []
        self._sessions: set[_Session] = set()  # every open session, idle or borrowed
        self._session_limit: int | None = None  # sessions the server allows, once it refused one
        self._opening = 0  # sessions being opened
        self._closed = False
        self._no_fsync = False

    # --- construction from a URL ---------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: object) -> SFTPDriver:
        """Open `sftp://[USER[:PASSWORD]@]HOST[:PORT]/ABS/PATH[?option=value&...]`."""
        shown = redact_url(url) if isinstance(url, str) else repr(url)
        if not isinstance(url, str) or url[:7].lower() != "sftp://":
            raise BadURL(f"not an sftp URL: {shown}")
        rest, _, fragment = url[7:].partition("#")
        if fragment:
            raise BadURL(f"sftp URL must not have a #fragment: {shown}")
        rest, _, query = rest.partition("?")
        userinfo, at, location = rest.rpartition("@")
        url_user = url_password = None
        if at:
            name, colon, secret = userinfo.partition(":")
            url_user = urllib.parse.unquote(name) or None
            url_password = urllib.parse.unquote(secret) if colon else None
        hostport, slash, path = location.partition("/")
        host, port = _split_host_port(hostport, shown)
        if not host:
            raise BadURL(f"sftp URL needs a host: sftp://[USER@]HOST[:PORT]/PATH, got {shown}")
        if not slash:
            raise BadURL(f"sftp URL needs the remote directory as an absolute path (sftp://HOST/PATH): {shown}")
        root = urllib.parse.unquote("/" + path)

        merged: dict[str, object] = {}
        for raw_name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            name = raw_name.replace("-", "_")
            if name == "password":
                raise BadURL(
                    f"sftp URL must not carry the password in the query"
                    f" (use the user-info or the password option): {shown}"
                )
            if name not in _QUERY_OPTIONS:
                raise BadURL(f"unknown option {raw_name!r} for sftp replica {shown} (known: {', '.join(_OPTIONS)})")
            if name in merged:
                raise BadURL(f"option {raw_name!r} given twice in {shown}")
            merged[name] = value
        for name, value in options.items():
            if name not in _OPTIONS:
                raise BadURL(f"unknown option {name!r} for sftp replica {shown} (known: {', '.join(_OPTIONS)})")
            if value is None:
                continue
            if name in merged and not _same_option(name, merged[name], value):
                raise BadURL(
                    f"option {name!r} for sftp replica {shown} is given in the URL and as an option, differently"
                )
            merged[name] = value
        for name, from_url in (("user", url_user), ("password", url_password)):
            if from_url is None:
                continue
            if name in merged and merged[name] != from_url:
                what = "the password" if name == "password" else f"user {merged[name]!r}"
                raise BadURL(f"sftp replica {shown}: {what} differs from the one in the URL")
            merged[name] = from_url
        for name in ("user", "password", "host_key"):
            if name in merged and not isinstance(merged[name], str):
                raise BadURL(f"sftp option {name} must be a string")
        return cls(host, root, port=port, **merged)  # type: ignore[arg-type]

    # --- the operations ---------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        path = self._path(validate_key(key))
        directory, name = posixpath.split(path)
        with self._session() as session:
            inflight: collections.deque[int] = collections.deque()
            handle: bytes | None = None
            tmp: str | None = None
            try:
                handle, tmp = self._create_temp(session, directory, name, key)
                written = 0
                step = session.write_size
                depth = max(4, WRITE_BEHIND_BYTES // step)
                for chunk in iter_chunks(data, key=key, size=size, progress=progress):
                    view = memoryview(chunk).cast("B")
                    with self._mapped(session, "write", key):
                        for start in range(0, len(view), step):
                            piece = view[start : start + step]
                            inflight.append(session.send(CMD_WRITE, handle, int64(written), piece))
                            written += len(piece)
                            while len(inflight) > depth:
                                session.wait(inflight.popleft())
                with self._mapped(session, "write", key):
                    # fsync, fstat and close go with the last writes: one round trip in all.
                    sync_num = None if self._no_fsync else session.send(CMD_EXTENDED, "fsync@openssh.com", handle)
                    stat_num = session.send(CMD_FSTAT, handle)
                    close_num = session.send(CMD_CLOSE, handle)
                    handle = None
                    while inflight:
                        session.wait(inflight.popleft())
                    if sync_num is not None:
                        self._wait_fsync(session, sync_num)
                    _, msg = session.wait(stat_num)
                    attrs = SFTPAttributes._from_msg(msg)
                    session.wait(close_num)
                self._commit(session, tmp, path, key, if_absent)
                tmp = None
            except BaseException:
                self._abandon(session, inflight, handle, tmp)
                raise
        modified = attrs.st_mtime if attrs.st_mtime is not None else time.time()
        return ObjectInfo(key, written, float(modified))

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        path = self._path(validate_key(key))
        session = self._borrow()
        handle: bytes | None = None
        try:
            with self._mapped(session, "read", key):
                # lstat before open: opening a FIFO would block the server. Then fstat (the
                # size of what we opened, even if a put renamed a new object over the key
                # meanwhile) and the first read, in one round trip.
                if not _is_file(self._lstat(session, path)):
                    raise NotFound(f"{self.url}: {key!r} not found", key=key)
                _, msg = session.call(CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
                handle = msg.get_binary()
                fstat_num = session.send(CMD_FSTAT, handle)
                first = min(session.read_size, length if length is not None else session.read_size)
                read_num = session.send(CMD_READ, handle, int64(offset), first) if first else None
                _, msg = session.wait(fstat_num)
                size = SFTPAttributes._from_msg(msg).st_size or 0
            end = size if length is None else min(size, offset + length)
            inflight = collections.deque()
            if read_num is not None:
                inflight.append((read_num, offset, max(0, min(first, end - offset))))
            reader = _Reader(self, session, handle, key, offset, max(offset, end), inflight)
        except BaseException:
            if handle is not None and not session.broken:
                with contextlib.suppress(Exception):
                    session.send_forget(CMD_CLOSE, handle)
            self._release(session)
            raise
        return io.BufferedReader(reader, buffer_size=64 << 10)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        path = self._path(validate_key(key))
        with self._session() as session, self._mapped(session, "stat", key):
            _, msg = session.call(CMD_LSTAT, path)
        attrs = SFTPAttributes._from_msg(msg)
        if not _is_file(attrs):
            raise NotFound(f"{self.url}: {key!r} not found (not a regular file)", key=key)
        return ObjectInfo(key, attrs.st_size or 0, float(attrs.st_mtime or 0))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        # The server decides how many names one READDIR returns; page_size has no say.
        check_page_size(page_size)
        directory, _, name_prefix = validate_prefix(prefix).rpartition("/")
        start = self._path(directory) if directory else self.root
        return self._walk(start, directory + "/" if directory else "", name_prefix)

    def delete(self, key: str) -> None:
        path = self._path(validate_key(key))
        with self._session() as session, self._connection_errors(session, "delete", key):
            try:
                session.call(CMD_REMOVE, path)
            except _Status as status:
                if status.code == SFTP_NO_SUCH_FILE:
                    return  # no object by that name
                if status.code in (SFTP_FAILURE, SFTP_PERMISSION_DENIED) and not _is_file(self._lstat(session, path)):
                    return  # a folder (or nothing any more): not an object
                raise self._status_error(status, "delete", key) from None
            # Prune directories left empty, up to (not including) the root. All at once,
            # deepest first: once one is not empty, neither are those above it.
            pending = []
            directory = posixpath.dirname(path)
            while directory != self.root and directory.startswith(self._root_prefix):
                pending.append(session.send(CMD_RMDIR, directory))
                directory = posixpath.dirname(directory)
            for num in pending:
                with contextlib.suppress(_Status):
                    session.wait(num)

    def close(self) -> None:
        self._closed = True
        with self._cond:
            transport, self._transport = self._transport, None
            self._idle = []
            self._cond.notify_all()
        if transport is not None:
            transport.close()  # closes its sessions too

    # --- put helpers ----------------------------------------------------------------------

    def _create_temp(self, session: _Session, directory: str, name: str, key: str) -> tuple[bytes, str]:
        short = name.encode()[:128].decode(errors="ignore")  # keep the temp name short
        attrs = SFTPAttributes()
        attrs.st_mode = _FILE_MODE
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        existed = 0
        with self._connection_errors(session, "write", key):
            for _ in range(8):
                tmp = f"{directory}/.{short}.tmp-{secrets.token_hex(8)}"
                try:
                    _, msg = session.call(CMD_OPEN, tmp, flags, attrs)
                    return msg.get_binary(), tmp
                except _Status as status:
                    if status.code != SFTP_NO_SUCH_FILE or existed >= 2:
                        raise self._status_error(status, "write", key) from None
                # Make the directory, then try again (a delete may prune it meanwhile). If
                # it was there all along, twice, the server just cannot create the file.
                existed = 0 if self._makedirs(session, directory, key) else existed + 1
        raise Transient(f"{self.url}: directory for {key!r} keeps disappearing", key=key)

    def _makedirs(self, session: _Session, directory: str, key: str) -> bool:
        """mkdir -p, mode 0700: True if it made directory, False if it was there already."""
        attrs = SFTPAttributes()
        attrs.st_mode = _DIR_MODE
        try:
            session.call(CMD_MKDIR, directory, attrs)
            return True
        except _Status as status:
            failure = status
        if failure.code == SFTP_NO_SUCH_FILE and posixpath.dirname(directory) != directory:
            self._makedirs(session, posixpath.dirname(directory), key)
            try:
                session.call(CMD_MKDIR, directory, attrs)
                return True
            except _Status as status:
                failure = status
        if failure.code == SFTP_PERMISSION_DENIED:
            raise PermissionDenied(
                f"{self.url}: cannot write {key!r}: cannot create {directory}: {failure.text}", key=key
            )
        attrs = self._lstat(session, directory)  # mkdir fails when it exists: fine if a directory
        if attrs is not None and attrs.st_mode is not None and stat.S_ISDIR(attrs.st_mode):
            return False
        if attrs is None:
            return True  # gone again (a concurrent delete pruned it): the caller retries
        raise StorageError(
            f"{self.url}: cannot write {key!r}: {directory} exists and is not a directory"
            " (a file and a directory share a name)",
            key=key,
        )

    def _wait_fsync(self, session: _Session, num: int) -> None:
        try:
            session.wait(num)
        except _Status as status:
            if status.code != SFTP_OP_UNSUPPORTED:
                raise
            if not self._no_fsync:
                self._no_fsync = True
                log.info("%s: the server does not support fsync@openssh.com; puts are not fsynced", self.url)

    def _commit(self, session: _Session, tmp: str, path: str, key: str, if_absent: bool) -> None:
        """Move the finished temporary file to the key's name (atomically)."""
        with self._connection_errors(session, "write", key):
            if if_absent:
                try:
                    session.call(CMD_EXTENDED, "hardlink@openssh.com", tmp, path)
                except _Status as status:
                    if status.code == SFTP_OP_UNSUPPORTED:
                        raise StorageError(
                            f"{self.url}: cannot write {key!r} if absent: the server lacks hardlink@openssh.com",
                            key=key,
                        ) from None
                    if status.code == SFTP_FAILURE and self._lstat(session, path) is not None:
                        raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key) from None
                    raise self._status_error(status, "write", key) from None
                with contextlib.suppress(_Status):
                    session.call(CMD_REMOVE, tmp)
                return
            try:
                session.call(CMD_EXTENDED, "posix-rename@openssh.com", tmp, path)
                return
            except _Status as status:
                if status.code != SFTP_OP_UNSUPPORTED:
                    raise self._status_error(status, "write", key) from None
            # A server without posix-rename: plain SFTP rename refuses to replace a file.
            try:
                session.call(CMD_RENAME, tmp, path)
                return
            except _Status as status:
                if status.code != SFTP_FAILURE or self._lstat(session, path) is None:
                    raise self._status_error(status, "write", key) from None
            log.warning("%s: no posix-rename@openssh.com; replacing %r is not atomic", self.url, key)
            try:
                with contextlib.suppress(_Status):
                    session.call(CMD_REMOVE, path)
                session.call(CMD_RENAME, tmp, path)
            except _Status as status:
                raise self._status_error(status, "write", key) from None

    def _abandon(
        self, session: _Session, inflight: collections.deque[int], handle: bytes | None, tmp: str | None
    ) -> None:
        """After a failed put: collect the replies, close and remove the temporary file."""
        if session.broken:
            return  # the connection is gone: the temporary file stays (it is never listed)
        try:
            for num in inflight:
                with contextlib.suppress(_Status):
                    session.wait(num)
            if handle is not None:
                with contextlib.suppress(_Status):
                    session.call(CMD_CLOSE, handle)
            if tmp is not None:
                with contextlib.suppress(_Status):
                    session.call(CMD_REMOVE, tmp)
        except BaseException:  # noqa: BLE001 - the put's own error is what the caller gets
            session.broken = True  # leave it to the pool to throw away

    # --- list helpers -----------------------------------------------------------------------

    def _walk(self, directory: str, rel: str, name_prefix: str) -> Iterator[ObjectInfo]:
        listed = []
        for name, attrs in self._listdir(directory, rel):
            if not name.startswith(name_prefix) or attrs.st_mode is None:
                continue
            if stat.S_ISDIR(attrs.st_mode):
                listed.append((name + "/", name, None))
            elif stat.S_ISREG(attrs.st_mode) and not TEMP_NAME.match(name):
                listed.append((name, name, attrs))
        # Sorting a directory as name + '/' makes the depth-first walk come out in key order.
        listed.sort(key=lambda entry: entry[0])
        for token, name, attrs in listed:
            key = rel + name
            if attrs is None:
                yield from self._walk(f"{directory.rstrip('/')}/{name}", key + "/", "")
                continue
            try:
                validate_key(key)
            except InvalidKey:
                log.warning("skipping file with an invalid key name in %s: %r", self.url, key)
                continue
            yield ObjectInfo(key, attrs.st_size or 0, float(attrs.st_mtime or 0))

    def _listdir(self, directory: str, rel: str) -> list[tuple[str, SFTPAttributes]]:
        """The entries of one remote directory ([] if it does not exist); no session is held after."""
        entries: list[tuple[str, SFTPAttributes]] = []
        with self._session() as session, self._connection_errors(session, "list", rel):
            try:
                _, msg = session.call(CMD_OPENDIR, directory)
            except _Status as status:
                if status.code == SFTP_NO_SUCH_FILE:
                    return []
                raise self._status_error(status, "list", rel) from None
            handle = msg.get_binary()
            try:
                while True:
                    try:
                        t, msg = session.call(CMD_READDIR, handle)
                    except _Status as status:
                        if status.code == SFTP_EOF:
                            break
                        raise self._status_error(status, "list", rel) from None
                    if t != CMD_NAME:
                        raise SFTPError(f"expected a name list, got reply type {t}")
                    for _ in range(msg.get_int()):
                        raw = msg.get_string()
                        msg.get_string()  # the ls -l style long name
                        attrs = SFTPAttributes._from_msg(msg)
                        try:
                            name = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            log.warning("skipping a name that is not UTF-8 in %s: %r", self.url, rel + repr(raw))
                            continue
                        if name not in (".", ".."):
                            entries.append((name, attrs))
            finally:
                if not session.broken:
                    session.send_forget(CMD_CLOSE, handle)
        return entries

    # --- sessions and the connection --------------------------------------------------------

    def _path(self, key: str) -> str:
        return self._root_prefix + key

    def _lstat(self, session: _Session, path: str) -> SFTPAttributes | None:
        """Attributes of path, None if it does not exist (other statuses raise _Status)."""
        try:
            _, msg = session.call(CMD_LSTAT, path)
        except _Status as status:
            if status.code == SFTP_NO_SUCH_FILE:
                return None
            raise
        return SFTPAttributes._from_msg(msg)

    @contextlib.contextmanager
    def _session(self) -> Iterator[_Session]:
        session = self._borrow()
        try:
            yield session
        except BaseException as exc:
            if not isinstance(exc, Exception):  # e.g. KeyboardInterrupt mid-reply
                session.broken = True
            raise
        finally:
            self._release(session)

    def _borrow(self) -> _Session:
        """A session for one operation: an idle one, else a new channel on the connection.

        When the server refuses another session (OpenSSH's MaxSessions, 10 by default) the
        number open becomes this connection's limit, and operations beyond it wait up to
        `timeout` for a session another thread gives back.
        """
        reconnected = False
        deadline: float | None = None
        while True:
            if self._closed:
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
                self._drop(transport)
                raise Transient(f"{self.url}: no answer from {self.host_id} within {self.timeout:g}s") from exc
            except (*_CONNECTION_ERRORS, _Status) as exc:
                if transport.is_active():
                    with self._cond:
                        busy = self._busy(transport)
                        if busy + self._opening == 0:  # not a limit: the server will not run sftp for us
                            raise StorageError(
                                f"{self.url}: {self.host_id} refused an SFTP session: {_describe(exc)}"
                            ) from exc
                        if transport is self._transport:
                            self._session_limit = max(1, busy)
                    log.debug("%s: %s refused another session with %d open", self.url, self.host_id, busy)
                    continue
                self._drop(transport)
                if reconnected:
                    raise Transient(
                        f"{self.url}: cannot open an SFTP session on {self.host_id}: {_describe(exc)}"
                    ) from exc
                reconnected = True  # the connection died unnoticed: connect again, once
                continue
            self._opened(session)
            return session

    def _opened(self, session: _Session | None) -> None:
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

    def _discard(self, session: _Session) -> None:
        """Forget a session (hold self._cond); the caller closes it."""
        self._sessions.discard(session)
        self._cond.notify_all()

    def _release(self, session: _Session) -> None:
        session.replies.clear()  # replies to abandoned requests
        with self._cond:
            if (
                not self._closed
                and session.transport is self._transport
                and session.usable()
                and len(self._idle) < MAX_IDLE_SESSIONS
            ):
                self._idle.append(session)
                self._cond.notify()
                return
            self._discard(session)
        session.close()

    def _open_session(self, transport: paramiko.Transport) -> _Session:
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
            session = _Session(paramiko.SFTPClient(channel), transport)
            try:
                t, msg = session.call(CMD_EXTENDED, "limits@openssh.com")
            except _Status:
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
                self._drop(transport)
            if self._closed:
                raise StorageError(f"{self.url}: the driver is closed")
            failure = self._connect_failure
            if failure is not None and self._connect_attempts != attempts:
                # Another thread tried while we queued, and failed: do not wait that long again.
                raise type(failure)(failure.message, key=failure.key)
            self._connect_attempts += 1
            try:
                transport = self._connect()
            except StorageError as exc:
                self._connect_failure = exc
                raise
            self._connect_failure = None
            with self._cond:
                if self._closed:
                    transport.close()
                    raise StorageError(f"{self.url}: the driver is closed")
                self._transport = transport
                self._session_limit = None  # learnt again on this connection
            if self._ever_connected:
                log.info("%s: reconnected to %s", self.url, self.host_id)
            self._ever_connected = True
            return transport

    def _drop(self, transport: paramiko.Transport) -> None:
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

    def _connect(self) -> paramiko.Transport:
        expected, source = self._expected_host_keys()
        try:
            plain = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise Transient(f"{self.url}: cannot connect to {self.host_id}: {_describe(exc)}") from exc
        sock = _GuardedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.stall_timeout = self.timeout
        sock.settimeout(self.timeout)
        try:
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
            )
        except BaseException:
            sock.close()
            raise
        try:
            transport.banner_timeout = self.timeout
            transport.handshake_timeout = self.timeout
            transport.auth_timeout = self.timeout
            transport.channel_timeout = self.timeout
            _prefer_key_types(transport, expected)
            transport.start_client(timeout=self.timeout)
            self._verify_host_key(transport, expected, source)
            self._authenticate(transport)
            transport.set_keepalive(KEEPALIVE_SECONDS)
        except StorageError:
            transport.close()
            raise
        except _CONNECTION_ERRORS as exc:
            transport.close()
            raise Transient(f"{self.url}: SSH connection to {self.host_id} failed: {_describe(exc)}") from exc
        except BaseException:
            transport.close()
            raise
        log.debug("%s: connected to %s", self.url, self.host_id)
        return transport

    def _expected_host_keys(self) -> tuple[list[paramiko.PKey], str]:
        if self.host_key is not None:
            return [self.host_key], "the pinned host_key"
        path = self.known_hosts_path or os.path.expanduser("~/.ssh/known_hosts")
        known = paramiko.HostKeys()
        try:
            known.load(path)
        except FileNotFoundError:
            raise PermissionDenied(
                f"{self.url}: cannot verify the host key of {self.host_id}: {path} does not exist"
            ) from None
        except OSError as exc:
            raise PermissionDenied(f"{self.url}: cannot read {path}: {_describe(exc)}") from exc
        except Exception as exc:  # a malformed line (paramiko's InvalidHostKey and friends)
            raise PermissionDenied(f"{self.url}: {path} is not a valid known_hosts file: {_describe(exc)}") from exc
        entry = known.lookup(self.host_id)
        return (list(entry.values()) if entry is not None else []), path

    def _verify_host_key(self, transport: paramiko.Transport, expected: list[paramiko.PKey], source: str) -> None:
        offered = transport.get_remote_server_key()
        for key in expected:
            if key.get_name() == offered.get_name() and key.asbytes() == offered.asbytes():
                return
        shown = f"{offered.get_name()} {_fingerprint(offered)}"
        if not expected:
            raise PermissionDenied(
                f"{self.url}: host key for {self.host_id} is not in {source} (the server offered {shown});"
                " refusing to connect"
            )
        raise PermissionDenied(
            f"{self.url}: host key for {self.host_id} does not match {source} (the server offered {shown});"
            " refusing to connect"
        )

    def _authenticate(self, transport: paramiko.Transport) -> None:
        tried: list[str] = []
        attempts: list[tuple[str, Callable[[], object]]] = []
        if self.key_path is not None:
            pkey = self._load_key(self.key_path)
            attempts.append((f"key {self.key_path}", lambda: transport.auth_publickey(self.user, pkey)))
        if self._password is not None:
            attempts.append(("password", lambda: transport.auth_password(self.user, self._password)))
        agent = None
        if self.key_path is None and self._password is None:
            agent, defaults = _default_keys()
            for label, key in defaults:
                attempts.append((label, lambda key=key: transport.auth_publickey(self.user, key)))
        try:
            for label, attempt in attempts:
                tried.append(label)
                try:
                    attempt()
                except paramiko.BadAuthenticationType as exc:
                    tried[-1] += f" (server allows only {', '.join(exc.allowed_types)})"
                    continue
                except paramiko.AuthenticationException:
                    continue
                if transport.is_authenticated():
                    return
        finally:
            if agent is not None:
                agent.close()
        if not tried:
            tried = ["nothing: no key_path or password given, no agent and no ~/.ssh/id_* key"]
        raise PermissionDenied(
            f"{self.url}: authentication as {self.user!r} to {self.host_id} failed (tried {', '.join(tried)})"
        )

    def _load_key(self, path: str) -> paramiko.PKey:
        try:
            try:
                return paramiko.PKey.from_path(path)
            except paramiko.PasswordRequiredException:
                if self._password is None:
                    raise PermissionDenied(
                        f"{self.url}: key {path} is encrypted; give its passphrase as the password option"
                    ) from None
                return paramiko.PKey.from_path(path, self._password)
        except StorageError:
            raise
        except OSError as exc:
            raise PermissionDenied(f"{self.url}: cannot read key {path}: {_describe(exc)}") from exc
        except Exception as exc:  # wrong passphrase, not a key, an unsupported type
            raise PermissionDenied(f"{self.url}: cannot load key {path}: {type(exc).__name__}") from exc

    # --- errors ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection_errors(self, session: _Session, action: str, key: str) -> Iterator[None]:
        """Turn a failed connection into Transient (and retire it); _Status passes through."""
        try:
            yield
        except TimeoutError as exc:
            session.broken = True
            self._drop(session.transport)
            raise Transient(
                f"{self.url}: cannot {action} {key!r}: no answer from {self.host_id} within {self.timeout:g}s", key=key
            ) from exc
        except _CONNECTION_ERRORS as exc:
            session.broken = True
            if (
                not session.transport.is_active()
                or isinstance(exc, EOFError)
                or (isinstance(exc, OSError) and exc.errno is not None)
            ):
                self._drop(session.transport)  # the next operation connects again
            raise Transient(
                f"{self.url}: cannot {action} {key!r}: connection to {self.host_id} lost ({_describe(exc)})", key=key
            ) from exc

    @contextlib.contextmanager
    def _mapped(self, session: _Session, action: str, key: str) -> Iterator[None]:
        """_connection_errors, and error statuses as StorageError subclasses."""
        with self._connection_errors(session, action, key):
            try:
                yield
            except _Status as status:
                raise self._status_error(status, action, key) from None

    def _status_error(self, status: _Status, action: str, key: str) -> StorageError:
        what = f"{self.url}: cannot {action} {key!r}: {status.text}"
        if status.code == SFTP_NO_SUCH_FILE and action in ("read", "stat"):
            return NotFound(f"{self.url}: {key!r} not found", key=key)
        if status.code == SFTP_PERMISSION_DENIED:
            return PermissionDenied(what, key=key)
        if status.code in (SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST):
            return Transient(what, key=key)
        return StorageError(what, key=key)


class _Reader(io.RawIOBase):
    """A get stream: bytes [pos, end) of an open remote file, read ahead in pipelined requests."""

    def __init__(
        self,
        driver: SFTPDriver,
        session: _Session,
        handle: bytes,
        key: str,
        pos: int,
        end: int,
        inflight: collections.deque[tuple[int, int, int]],
    ) -> None:
        super().__init__()
        self._driver = driver
        self._session: _Session | None = session
        self._handle = handle
        self._key = key
        self._pos = pos
        self._end = end
        self._inflight = inflight  # (request number, offset, length), in offset order
        self._next = pos + sum(length for _, _, length in inflight)
        self._depth = max(4, READ_AHEAD_BYTES // session.read_size)
        self._pending = memoryview(b"")

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
        driver, key = self._driver, self._key
        with driver._connection_errors(session, "read", key):
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
            except _Status as status:
                if status.code == SFTP_EOF:  # shorter than when opened: end here
                    self._end = self._pos
                    return
                raise driver._status_error(status, "read", key) from None
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
                                with contextlib.suppress(_Status):
                                    session.wait(num)
                            session.send_forget(CMD_CLOSE, self._handle)
                    except BaseException:  # noqa: BLE001 - closing must not fail
                        session.broken = True
                self._inflight.clear()
                self._driver._release(session)
        finally:
            super().close()


# --- helpers --------------------------------------------------------------------------------


def from_url(url: str, **options: object) -> SFTPDriver:
    """Open an sftp replica URL (the registry's entry point)."""
    return SFTPDriver.from_url(url, **options)


def _same_option(name: str, a: object, b: object) -> bool:
    if name == "timeout":
        with contextlib.suppress(TypeError, ValueError):
            return float(a) == float(b)  # type: ignore[arg-type]
    return str(a) == str(b)


def _split_host_port(hostport: str, shown: str) -> tuple[str, int]:
    if hostport.startswith("["):  # an IPv6 literal
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise BadURL(f"malformed host {hostport!r} in {shown}")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = hostport.partition(":")
    host = urllib.parse.unquote(host).lower()  # as ssh matches known_hosts names
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadURL(f"invalid port {port_text!r} in {shown}")
    return host, int(port_text)


def _parse_host_key(line: str) -> paramiko.PKey:
    """A pinned host key: "TYPE BASE64 [comment]", optionally with known_hosts' host field first."""
    if not isinstance(line, str):
        raise BadURL(f"sftp option host_key must be a string like 'ssh-ed25519 AAAA...', not {type(line).__name__}")
    tokens = line.split()
    for index, token in enumerate(tokens[:-1]):
        if token.startswith(("ssh-", "ecdsa-", "rsa-", "sk-")):
            try:
                blob = base64.b64decode(tokens[index + 1], validate=True)
                key = paramiko.PKey.from_type_string(token, blob)
            except Exception as exc:  # noqa: BLE001 - binascii.Error, paramiko's key errors, ...
                raise BadURL(f"sftp option host_key is not a valid {token} public key: {_describe(exc)}") from None
            return key
    raise BadURL(f"sftp option host_key must be a public key line like 'ssh-ed25519 AAAA...', got {line[:40]!r}")


def _prefer_key_types(transport: paramiko.Transport, expected: list[paramiko.PKey]) -> None:
    """Ask first for the host key types we can verify (as ssh does with known_hosts)."""
    wanted: list[str] = []
    for key in expected:
        name = key.get_name()
        wanted += ["rsa-sha2-512", "rsa-sha2-256"] if name == "ssh-rsa" else [name]
    options = transport.get_security_options()
    available = list(options.key_types)
    first = [name for name in dict.fromkeys(wanted) if name in available]
    if first:
        options.key_types = first + [name for name in available if name not in first]


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _default_keys() -> tuple[paramiko.Agent | None, list[tuple[str, paramiko.PKey]]]:
    """The SSH agent's keys, then unencrypted ~/.ssh/id_* keys (what ssh would try)."""
    keys: list[tuple[str, paramiko.PKey]] = []
    agent = None
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent = paramiko.Agent()
            keys += [(f"agent key {key.get_name()}", key) for key in agent.get_keys()]
        except Exception:  # noqa: BLE001 - no usable agent: go on without
            agent = None
    for name in _DEFAULT_KEY_FILES:
        path = os.path.expanduser(f"~/.ssh/{name}")
        if os.path.exists(path):
            try:
                keys.append((f"key {path}", paramiko.PKey.from_path(path)))
            except Exception:  # noqa: BLE001, S112 - encrypted or unreadable: ssh would ask; we cannot
                continue
    return agent, keys


def _is_file(attrs: SFTPAttributes | None) -> bool:
    return attrs is not None and attrs.st_mode is not None and stat.S_ISREG(attrs.st_mode)


def _describe(exc: BaseException) -> str:
    """A short one-line reason for an exception (never a secret: these come from sockets/paramiko)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
