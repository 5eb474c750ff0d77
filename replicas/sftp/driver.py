"""SFTPDriver: the Driver operations on files below a directory of an SSH server."""

from __future__ import annotations

import collections
import contextlib
import getpass
import io
import os
import posixpath
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

from paramiko.sftp import (
    CMD_CLOSE,
    CMD_FSTAT,
    CMD_LSTAT,
    CMD_OPEN,
    CMD_READ,
    CMD_REMOVE,
    CMD_RMDIR,
    SFTP_FAILURE,
    SFTP_FLAG_READ,
    SFTP_NO_SUCH_FILE,
    SFTP_PERMISSION_DENIED,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from ..base import Capability, Driver, ObjectInfo, check_page_size, check_range
from ..errors import BadURL, NotFound
from ..keys import validate_key, validate_prefix
from ..resume import ResumingReader, Version
from .config import DEFAULT_PORT, DEFAULT_TIMEOUT, parse_host_key, parse_url
from .connection import Connector
from .listing import walk
from .pool import SessionPool, lstat
from .protocol import Status, is_file
from .reader import Reader
from .upload import Uploader


class SFTPDriver(Driver):
    """Objects stored as files below a directory on an SSH server."""

    scheme = "sftp"
    capabilities = Capability.RANGE_READ | Capability.CONDITIONAL_CREATE | Capability.MULTIPART

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
        self.host_key = parse_host_key(host_key) if host_key is not None else None
        self.timeout = timeout
        self.host_id = f"[{host}]:{port}" if port != DEFAULT_PORT else host
        netloc = f"[{host}]" if ":" in host else host
        if port != DEFAULT_PORT:
            netloc += f":{port}"
        self.url = f"sftp://{urllib.parse.quote(self.user, safe='')}@{netloc}{urllib.parse.quote(self.root)}"
        self._pool = SessionPool(
            Connector(
                url=self.url,
                host=host,
                port=port,
                host_id=self.host_id,
                user=self.user,
                password=password,
                key_path=self.key_path,
                known_hosts_path=self.known_hosts_path,
                host_key=self.host_key,
                timeout=timeout,
            )
        )
        self._uploader = Uploader(self._pool)

    @classmethod
    def from_url(cls, url: str, **options: object) -> SFTPDriver:
        """Open `sftp://[USER[:PASSWORD]@]HOST[:PORT]/ABS/PATH[?option=value&...]`."""
        host, root, port, merged = parse_url(url, options)
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
        return self._uploader.put(key, path, data, size=size, progress=progress, if_absent=if_absent)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        """A stream that re-opens the file and seeks after a dropped connection (see resume.py)."""
        check_range(offset, length)
        path = self._path(validate_key(key))
        reader, version = self._open_range(key, path, offset, length)
        resuming = ResumingReader(
            lambda at, count: self._open_range(key, path, at, count),
            url=self.url,
            key=key,
            offset=offset,
            end=reader.end,
            stream=reader,  # type: ignore[arg-type]
            version=version,
        )
        return io.BufferedReader(resuming, buffer_size=64 << 10)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        path = self._path(validate_key(key))
        pool = self._pool
        with pool.session() as session, pool.mapped(session, "stat", key):
            _, msg = session.call(CMD_LSTAT, path)
        attrs = SFTPAttributes._from_msg(msg)
        if not is_file(attrs):
            raise NotFound(f"{self.url}: {key!r} not found (not a regular file)", key=key)
        return ObjectInfo(key, attrs.st_size or 0, float(attrs.st_mtime or 0))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        # The server decides how many names one READDIR returns; page_size has no say.
        check_page_size(page_size)
        directory, _, name_prefix = validate_prefix(prefix).rpartition("/")
        start = self._path(directory) if directory else self.root
        return walk(self._pool, start, directory + "/" if directory else "", name_prefix)

    def delete(self, key: str) -> None:
        path = self._path(validate_key(key))
        pool = self._pool
        with pool.session() as session, pool.connection_errors(session, "delete", key):
            try:
                session.call(CMD_REMOVE, path)
            except Status as status:
                if status.code == SFTP_NO_SUCH_FILE:
                    return  # no object by that name
                if status.code in (SFTP_FAILURE, SFTP_PERMISSION_DENIED) and not is_file(lstat(session, path)):
                    return  # a folder (or nothing any more): not an object
                raise pool.status_error(status, "delete", key) from None
            # Prune directories left empty, up to (not including) the root. All at once,
            # deepest first: once one is not empty, neither are those above it.
            pending = []
            directory = posixpath.dirname(path)
            while directory != self.root and directory.startswith(self._root_prefix):
                pending.append(session.send(CMD_RMDIR, directory))
                directory = posixpath.dirname(directory)
            for num in pending:
                with contextlib.suppress(Status):
                    session.wait(num)

    def close(self) -> None:
        self._pool.close()

    def reset(self) -> None:
        """Close the connection (and one being opened): blocked calls fail, the next ones reconnect."""
        self._pool.reset()

    def _path(self, key: str) -> str:
        return self._root_prefix + key

    def _open_range(self, key: str, path: str, offset: int, length: int | None) -> tuple[Reader, Version]:
        """Open path for bytes [offset, offset + length), with the file's size and mtime as its Version."""
        pool = self._pool
        session = pool.borrow()
        handle: bytes | None = None
        try:
            with pool.mapped(session, "read", key):
                # lstat before open: opening a FIFO would block the server. Then fstat (the
                # size of what we opened, even if a put renamed a new object over the key
                # meanwhile) and the first read, in one round trip.
                if not is_file(lstat(session, path)):
                    raise NotFound(f"{self.url}: {key!r} not found", key=key)
                _, msg = session.call(CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
                handle = msg.get_binary()
                fstat_num = session.send(CMD_FSTAT, handle)
                first = min(session.read_size, length if length is not None else session.read_size)
                read_num = session.send(CMD_READ, handle, int64(offset), first) if first else None
                _, msg = session.wait(fstat_num)
                attrs = SFTPAttributes._from_msg(msg)
            size = attrs.st_size or 0
            end = size if length is None else min(size, offset + length)
            inflight: collections.deque[tuple[int, int, int]] = collections.deque()
            if read_num is not None:
                inflight.append((read_num, offset, max(0, min(first, end - offset))))
            reader = Reader(pool, session, handle, key, offset, max(offset, end), inflight)
        except BaseException:
            if handle is not None and not session.broken:
                with contextlib.suppress(Exception):
                    session.send_forget(CMD_CLOSE, handle)
            pool.release(session)
            raise
        return reader, Version(size, None, float(attrs.st_mtime) if attrs.st_mtime is not None else None)


def from_url(url: str, **options: object) -> SFTPDriver:
    """Open an sftp replica URL (the registry's entry point)."""
    return SFTPDriver.from_url(url, **options)
