"""Reading the WAL-index header from a database's `-shm` file, without taking locks.

The `-shm` file is memory-mapped by every SQLite connection and updated in place; reading
it with os.pread goes through the same page cache, so it sees what the connections see.
Layout (sqlite3 src/wal.c, native byte order of the machine that wrote it):

    offset  0: WalIndexHdr (48 bytes), first copy
    offset 48: WalIndexHdr, second copy
    offset 96: WalCkptInfo

    WalIndexHdr  { u32 iVersion; u32 unused; u32 iChange; u8 isInit; u8 bigEndCksum;
                   u16 szPage; u32 mxFrame; u32 nPage; u32 aFrameCksum[2];
                   u8 aSalt[8]; u32 aCksum[2]; }
    WalCkptInfo  { u32 nBackfill; u32 aReadMark[5]; u8 aLock[8];
                   u32 nBackfillAttempted; u32 notUsed0; }

A writer updates the second copy, then (after a memory barrier) the first; a reader copies
the first, then the second (walIndexTryHdr). The read is consistent when both copies are
byte-identical, isInit is 1 and aCksum, the WAL checksum in native word order from (0, 0)
over the first 40 bytes, matches. szPage encodes 65536 as 1.

aSalt is a byte copy of the WAL header's salts (SQLite memcpy()s bytes 16..24 of the WAL
header into it), so it is decoded big-endian like the WAL header, not natively: the
decoded values compare equal to `WalHeader.salts`. aFrameCksum holds the checksum
integers themselves (natively) and compares equal to the last frame's checksum fields.

WalCkptInfo is not covered by the header checksum; it is read in the same pread and
reported as seen.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time
from dataclasses import dataclass

__all__ = [
    "WalIndexHeader",
    "WalIndexError",
    "read_wal_index",
    "WalIndexReader",
    "WAL_INDEX_HDR_SIZE",
    "WAL_INDEX_READ_SIZE",
]

WAL_INDEX_HDR_SIZE = 48
CKPT_INFO_OFFSET = 2 * WAL_INDEX_HDR_SIZE
CKPT_INFO_SIZE = 40
WAL_INDEX_READ_SIZE = CKPT_INFO_OFFSET + CKPT_INFO_SIZE  # 136
WAL_NREADER = 5

_NATIVE = "<" if sys.byteorder == "little" else ">"
# iVersion, unused, iChange, isInit, bigEndCksum, szPage, mxFrame, nPage, aFrameCksum[2]
_HDR_HEAD = struct.Struct(_NATIVE + "3I2BH4I")
_HDR_SALT = struct.Struct(">2I")  # aSalt: raw bytes of the WAL header's salts
_HDR_CKSUM = struct.Struct(_NATIVE + "2I")
_HDR_WORDS = struct.Struct(_NATIVE + "10I")  # the 40 checksummed bytes, as native words
_CKPT = struct.Struct(_NATIVE + f"{1 + WAL_NREADER}I8sII")

_MASK32 = 0xFFFFFFFF
_RETRY_SLEEP = 0.0005


class WalIndexError(Exception):
    """The WAL-index header could not be read consistently."""


@dataclass(frozen=True)
class WalIndexHeader:
    change: int  # iChange: incremented by each write transaction
    page_size: int
    mx_frame: int  # index of the last valid (committed) frame in the WAL
    n_page: int  # database size in pages
    frame_checksum: tuple[int, int]  # checksum of frame mx_frame
    salts: tuple[int, int]  # as in the WAL header
    n_backfill: int  # frames already copied back into the database
    read_marks: tuple[int, ...]  # aReadMark[0..4]
    n_backfill_attempted: int


def _native_checksum(data: bytes) -> tuple[int, int]:
    words = _HDR_WORDS.unpack(data)
    s0 = s1 = 0
    for i in range(0, 10, 2):
        s0 = (s0 + words[i] + s1) & _MASK32
        s1 = (s1 + words[i + 1] + s0) & _MASK32
    return s0, s1


def _decode(buf: bytes) -> WalIndexHeader | None | bool:
    """Header from one raw read: None if never initialised, False if inconsistent."""
    h1 = buf[:WAL_INDEX_HDR_SIZE]
    h2 = buf[WAL_INDEX_HDR_SIZE:CKPT_INFO_OFFSET]
    if h1 != h2:
        return False
    _version, _unused, change, is_init, _big_end, sz_page, mx_frame, n_page, fc1, fc2 = (
        _HDR_HEAD.unpack_from(h1, 0)
    )
    if is_init == 0:
        return None if not any(h1) else False
    if is_init != 1 or _native_checksum(h1[:40]) != _HDR_CKSUM.unpack_from(h1, 40):
        return False
    salts = _HDR_SALT.unpack_from(h1, 32)
    ckpt = _CKPT.unpack_from(buf, CKPT_INFO_OFFSET)
    return WalIndexHeader(
        change=change,
        page_size=(sz_page & 0xFE00) + ((sz_page & 0x0001) << 16),
        mx_frame=mx_frame,
        n_page=n_page,
        frame_checksum=(fc1, fc2),
        salts=salts,
        n_backfill=ckpt[0],
        read_marks=tuple(ckpt[1 : 1 + WAL_NREADER]),
        n_backfill_attempted=ckpt[2 + WAL_NREADER],
    )


def _read_fd(fd: int, attempts: int, what: str) -> WalIndexHeader | None:
    for attempt in range(max(1, attempts)):
        buf = os.pread(fd, WAL_INDEX_READ_SIZE, 0)
        if len(buf) < WAL_INDEX_READ_SIZE:
            return None
        hdr = _decode(buf)
        if hdr is not False:
            return hdr
        if attempt + 1 < attempts:
            time.sleep(_RETRY_SLEEP * (attempt + 1))
    raise WalIndexError(f"{what}: WAL-index header inconsistent after {attempts} reads")


def read_wal_index(shm_path: str | os.PathLike, *, attempts: int = 10) -> WalIndexHeader | None:
    """Read the WAL-index header of a `-shm` file, lock-free.

    Returns None if the file is missing, shorter than the header and checkpoint info, or
    was never initialised (an all-zero header). Retries with short sleeps while the two
    header copies differ or the checksum does not match (a writer is updating it); raises
    WalIndexError after `attempts` inconsistent reads.
    """
    path = os.fspath(shm_path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        return _read_fd(fd, attempts, path)
    finally:
        os.close(fd)


class WalIndexReader:
    """Keeps the `-shm` file open for cheap repeated reads.

    read() returns the header or None (see read_wal_index). Each read compares the path's
    inode with the open file's and reopens when the file was replaced (or closes it when
    the file is gone), so a reader never keeps reporting a stale, unlinked shm.
    """

    def __init__(self, shm_path: str | os.PathLike, *, attempts: int = 10):
        self.path = os.fspath(shm_path)
        self.attempts = attempts
        self._fd = -1
        self._ident: tuple[int, int] | None = None

    def _ensure_open(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._close_fd()
            return False
        ident = (st.st_dev, st.st_ino)
        if self._fd >= 0 and ident == self._ident:
            return True
        self._close_fd()
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            raise WalIndexError(f"{self.path}: not a regular file")
        self._fd = fd
        self._ident = (fst.st_dev, fst.st_ino)
        return True

    def read(self) -> WalIndexHeader | None:
        if not self._ensure_open():
            return None
        return _read_fd(self._fd, self.attempts, self.path)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._ident = None

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> "WalIndexReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self._close_fd()
        except Exception:
            pass
