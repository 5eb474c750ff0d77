"""The `file` driver: objects are files under a root directory.

A key's segments are directories and a file name. Writes go to a temporary file in the
target directory (`.<name>.tmp-<random>`), are fsynced, then renamed into place and the
directory fsynced, so a crash leaves the old object or the new one. No path below the
root may be a symlink: the driver refuses to follow one (PermissionDenied) and list skips
them. Unlike object stores, a key cannot also be a "folder" of other keys ('a' and 'a/b').
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .base import Capability, Driver, ObjectInfo, check_page_size, check_range, iter_chunks
from .errors import (
    BadURL,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from .keys import STALE_TEMP_SECONDS, TEMP_NAME, validate_key, validate_prefix

log = logging.getLogger(__name__)

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}


class FileDriver(Driver):
    """Objects stored as files below a local directory (created on first put)."""

    scheme = "file"
    capabilities = Capability.RANGE_READ | Capability.CONDITIONAL_CREATE | Capability.LOCAL

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(os.path.abspath(os.fspath(root)))
        self.url = "file://" + urllib.parse.quote(self.root)
        # folders puts went to lately, already made and checked to resolve to themselves
        # (no symlink on the way): a put to one opens it and creates, fsyncs and renames
        # relative to it, without resolving the path or making it again. No descriptor is
        # kept between puts (hundreds of idle databases would hold hundreds)
        self._dirs: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **options: object) -> FileDriver:
        """Open `file:///abs/path` or a plain absolute or relative path; takes no options."""
        if url[:7].lower() != "file://":
            path = url
        else:
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise BadURL(f"file URL must not name a host ({parts.netloc!r}) in {url}")
            if parts.fragment:
                raise BadURL(f"file URL must not have a fragment in {url}")
            for name in urllib.parse.parse_qs(parts.query, keep_blank_values=True):
                raise BadURL(f"unknown option {name!r} for file replica {url}")
            path = urllib.parse.unquote(parts.path)
        if options:
            raise BadURL(f"unknown option {sorted(options)[0]!r} for file replica {url}")
        if not path:
            raise BadURL(f"file replica URL has no path: {url!r}")
        return cls(path)

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        validate_key(key)
        directory, _, name = key.rpartition("/")
        dirfd, fd, tmp = self._create_temp(directory, name, key)
        try:
            try:
                for chunk in iter_chunks(data, key=key, size=size, progress=progress):
                    with self._mapped("write", key):
                        _write_all(fd, chunk)
                with self._mapped("write", key):
                    os.fsync(fd)
                    st = os.fstat(fd)
            finally:
                os.close(fd)
            with self._mapped("write", key):
                if if_absent:
                    try:
                        os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)  # atomic: fails if name exists
                    except FileExistsError:
                        raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key) from None
                else:
                    os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                    tmp = ""
                os.fsync(dirfd)
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dirfd)
            os.close(dirfd)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        path = self._path(validate_key(key))
        with self._mapped("read", key):
            # O_NONBLOCK: a FIFO planted at the path must not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            with self._mapped("read", key):
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise NotFound(f"{self.url}: {key!r} not found (not a regular file)", key=key)
                os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        stream = os.fdopen(fd, "rb")
        if length is None:
            return stream
        return io.BufferedReader(_Window(stream, length))  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        path = self._path(validate_key(key))
        with self._mapped("stat", key):
            st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{self.url}: {key!r} not found (not a regular file)", key=key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        check_page_size(page_size)
        directory, _, name_prefix = validate_prefix(prefix).rpartition("/")
        start = os.path.join(self.root, *directory.split("/")) if directory else self.root
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise StorageError(f"{self.url}: the replica root is not a directory")
        if os.path.realpath(start) != start:
            return iter(())  # below a symlink: nothing the walk would list either
        return self._walk(start, directory + "/" if directory else "", name_prefix)

    def delete(self, key: str) -> None:
        path = self._path(validate_key(key))
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # no object by that name
        except OSError as exc:
            raise self._error(exc, "delete", key) from exc
        # Prune directories left empty, up to (not including) the root.
        directory = os.path.dirname(path)
        while directory != self.root and directory.startswith(self.root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (or gone): stop
            self._dirs.discard(os.path.relpath(directory, self.root).replace(os.sep, "/"))
            directory = os.path.dirname(directory)

    def _path(self, key: str) -> str:
        path = os.path.join(self.root, *key.split("/"))
        if os.path.realpath(path) != path:
            raise PermissionDenied(f"{self.url}: {key!r} resolves through a symlink", key=key)
        return path

    def _create_temp(self, directory: str, name: str, key: str) -> tuple[int, int, str]:
        """(the folder's descriptor, the new temporary file's descriptor, its name); the
        caller closes both."""
        short = name.encode()[:128].decode(errors="ignore")  # keep the temp name short
        for _ in range(8):
            tmp = f".{short}.tmp-{os.urandom(8).hex()}"
            try:
                dirfd = self._open_dir(directory, key)
            except FileNotFoundError:
                self._dirs.discard(directory)  # a delete pruned the folder: make it again
                continue
            except OSError as exc:
                raise self._error(exc, "write", key) from exc
            try:
                return dirfd, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dirfd), tmp
            except FileNotFoundError:
                self._dirs.discard(directory)  # pruned (and unlinked) since it was opened
                os.close(dirfd)
                continue
            except OSError as exc:
                os.close(dirfd)
                raise self._error(exc, "write", key) from exc
        raise Transient(f"{self.url}: directory for {key!r} keeps disappearing", key=key)

    def _open_dir(self, directory: str, key: str) -> int:
        """Open a key's folder ("" for the root), made if missing; PermissionDenied when
        its path goes through a symlink."""
        path = os.path.join(self.root, *directory.split("/")) if directory else self.root
        known = directory in self._dirs
        if not known:
            if os.path.realpath(path) != path:
                raise PermissionDenied(f"{self.url}: {key!r} resolves through a symlink", key=key)
            _makedirs(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not known:
            if os.path.realpath(path) != path:  # swapped for a symlink meanwhile
                os.close(fd)
                raise PermissionDenied(f"{self.url}: {key!r} resolves through a symlink", key=key)
            if len(self._dirs) >= 1024:
                self._dirs.clear()
            self._dirs.add(directory)
        return fd

    def _walk(self, directory: str, rel: str, name_prefix: str) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._error(exc, "list", rel) from exc
        self._sweep_stale_temps(entries)
        entries = [e for e in entries if e.name.startswith(name_prefix)]
        # Sorting a directory as name + '/' makes the depth-first walk come out in key order.
        listed = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                listed.append((entry.name + "/", entry))
            elif entry.is_file(follow_symlinks=False) and not TEMP_NAME.match(entry.name):
                listed.append((entry.name, entry))
        listed.sort(key=lambda pair: pair[0])
        for token, entry in listed:
            key = rel + entry.name
            if token.endswith("/"):
                yield from self._walk(entry.path, key + "/", "")
                continue
            try:
                validate_key(key)
                st = entry.stat(follow_symlinks=False)
            except InvalidKey:
                log.warning("skipping file with an invalid key name in %s: %r", self.url, key)
                continue
            except FileNotFoundError:
                continue  # deleted while listing
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def _sweep_stale_temps(self, entries: list[os.DirEntry]) -> None:
        """Remove temporary files a day old: their put is over (its agent was killed mid-put)."""
        too_old = time.time() - STALE_TEMP_SECONDS
        for entry in entries:
            if not TEMP_NAME.match(entry.name):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < too_old:
                    os.unlink(entry.path)
                    log.info("%s: removed %s, a temporary file left by a put that never finished", self.url, entry.path)
            except OSError:
                pass  # gone already, or a read-only replica: leave it

    @contextlib.contextmanager
    def _mapped(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise self._error(exc, action, key) from exc

    def _error(self, exc: OSError, action: str, key: str) -> StorageError:
        what = f"{self.url}: cannot {action} {key!r}: {exc.strerror or exc}"
        if action in ("read", "stat") and isinstance(
            exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)
        ):
            return NotFound(f"{self.url}: {key!r} not found", key=key)
        if exc.errno == errno.ELOOP:
            return PermissionDenied(f"{self.url}: {key!r} is a symlink", key=key)
        if isinstance(exc, PermissionError):
            return PermissionDenied(what, key=key)
        if exc.errno == errno.ENAMETOOLONG:
            return InvalidKey(what, key=key)
        if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
            return StorageError(what + " (a file and a directory share a name)", key=key)
        if exc.errno in _TRANSIENT_ERRNOS:
            return Transient(what, key=key)
        return StorageError(what, key=key)


class _Window(io.RawIOBase):
    """At most `length` bytes of an already positioned stream."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self._stream = stream
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        view = memoryview(buffer).cast("B")[: self._left]
        n = self._stream.readinto(view) if view else 0  # type: ignore[attr-defined]
        self._left -= n
        return n

    def close(self) -> None:
        self._stream.close()
        super().close()


def _makedirs(directory: str) -> None:
    """Create directory and missing parents (mode 0700), fsyncing each new entry's parent."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        _makedirs(os.path.dirname(directory))
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            return
    _fsync_dir(os.path.dirname(directory))


def _write_all(fd: int, chunk: bytes | memoryview) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
