"""Listing: a depth-first walk of the remote directories, in key order.

Symlinks are not objects (skipped), nor are the temporary files of unfinished puts. A
temporary file a day old belongs to a put that is over (an agent killed mid-upload): the
walk removes it, best effort (a read-only login just leaves it).
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Iterator

from paramiko.sftp import (
    CMD_CLOSE,
    CMD_NAME,
    CMD_OPENDIR,
    CMD_READDIR,
    CMD_REMOVE,
    SFTP_EOF,
    SFTP_NO_SUCH_FILE,
    SFTPError,
)
from paramiko.sftp_attr import SFTPAttributes

from ..base import ObjectInfo
from ..errors import InvalidKey
from ..keys import STALE_TEMP_SECONDS, TEMP_NAME, validate_key
from .pool import SessionPool
from .protocol import Status

log = logging.getLogger("replicas.sftp")


def walk(pool: SessionPool, directory: str, rel: str, name_prefix: str) -> Iterator[ObjectInfo]:
    """Objects below directory (whose key starts with rel) whose name starts with name_prefix."""
    listed = []
    stale = []
    too_old = time.time() - STALE_TEMP_SECONDS
    for name, attrs in listdir(pool, directory, rel):
        if attrs.st_mode is None:
            continue
        if stat.S_ISREG(attrs.st_mode) and TEMP_NAME.match(name):
            if attrs.st_mtime is not None and attrs.st_mtime < too_old:
                stale.append(f"{directory.rstrip('/')}/{name}")
            continue
        if not name.startswith(name_prefix):
            continue
        if stat.S_ISDIR(attrs.st_mode):
            listed.append((name + "/", name, None))
        elif stat.S_ISREG(attrs.st_mode):
            listed.append((name, name, attrs))
    if stale:
        remove_stale(pool, stale)
    # Sorting a directory as name + '/' makes the depth-first walk come out in key order.
    listed.sort(key=lambda entry: entry[0])
    for _token, name, attrs in listed:
        key = rel + name
        if attrs is None:
            yield from walk(pool, f"{directory.rstrip('/')}/{name}", key + "/", "")
            continue
        try:
            validate_key(key)
        except InvalidKey:
            log.warning("skipping file with an invalid key name in %s: %r", pool.url, key)
            continue
        yield ObjectInfo(key, attrs.st_size or 0, float(attrs.st_mtime or 0))


def remove_stale(pool: SessionPool, paths: list[str]) -> None:
    """Remove the temporary files of puts long over; failures are only logged."""
    try:
        with pool.session() as session:
            for path in paths:
                try:
                    session.call(CMD_REMOVE, path)
                    log.info("%s: removed %s, a temporary file left by an upload that never finished", pool.url, path)
                except Status as status:
                    if status.code != SFTP_NO_SUCH_FILE:
                        log.info("%s: cannot remove the stale temporary file %s: %s", pool.url, path, status.text)
    except Exception as exc:  # noqa: BLE001 - the listing itself goes on (and reports its own errors)
        log.info("%s: cannot remove stale temporary files: %s", pool.url, exc)


def listdir(pool: SessionPool, directory: str, rel: str) -> list[tuple[str, SFTPAttributes]]:
    """The entries of one remote directory ([] if it does not exist); no session is held after."""
    entries: list[tuple[str, SFTPAttributes]] = []
    with pool.session() as session, pool.connection_errors(session, "list", rel):
        try:
            _, msg = session.call(CMD_OPENDIR, directory)
        except Status as status:
            if status.code == SFTP_NO_SUCH_FILE:
                return []
            raise pool.status_error(status, "list", rel) from None
        handle = msg.get_binary()
        try:
            while True:
                try:
                    t, msg = session.call(CMD_READDIR, handle)
                except Status as status:
                    if status.code == SFTP_EOF:
                        break
                    raise pool.status_error(status, "list", rel) from None
                if t != CMD_NAME:
                    raise SFTPError(f"expected a name list, got reply type {t}")
                for _ in range(msg.get_int()):
                    raw = msg.get_string()
                    msg.get_string()  # the ls -l style long name
                    attrs = SFTPAttributes._from_msg(msg)
                    try:
                        name = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        log.warning("skipping a name that is not UTF-8 in %s: %r", pool.url, rel + repr(raw))
                        continue
                    if name not in (".", ".."):
                        entries.append((name, attrs))
        finally:
            if not session.broken:
                session.send_forget(CMD_CLOSE, handle)
    return entries
