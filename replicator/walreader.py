"""Reading SQLite WAL files: header, frames, salts, checksum chain, commit boundaries.

Format (https://www.sqlite.org/fileformat2.html#walformat). All header and frame-header
integers are big-endian. The 32-byte WAL header holds the magic (0x377f0682: checksums
over little-endian 32-bit words, 0x377f0683: big-endian words), the format version
(3007000), the page size, the checkpoint sequence number, salt-1, salt-2 and a checksum
over its first 24 bytes. Each frame is a 24-byte header (page number, commit field =
database size in pages after a commit or 0, salt-1, salt-2, checksum-1, checksum-2)
followed by one page.

A frame is valid (SQLite's walDecodeFrame) when its salts equal the header's, its page
number is not 0 and its checksum equals the cumulative checksum: the previous frame's
checksum (the header's for frame 1) continued over the first 8 bytes of the frame header
and then the page data. The first frame that is not valid ends the log, whatever follows
(older frames from an earlier WAL restart may remain in the file after it).

The checksum is a linear recurrence over pairs of words (x0, x1)::

    s0 += x0 + s1;  s1 += x1 + s0        (mod 2**32)

i.e. s' = A s + B x with A = [[1, 1], [1, 2]] and B = [[1, 0], [1, 1]]. After n pairs,
s_n = A^n s_0 + sum_k A^(n-1-k) B x_k: a frame's contribution (the sum) does not depend on
the incoming state, so it is a dot product of the frame's words with precomputed
coefficients, and only the cheap A^n s_0 + c chaining is left per frame.
`wal_checksum` is the plain reference.

Capture computes no checksum for frames the WAL index vouches for (scan_frames'
`vouched`): those are the frames SQLite's own readers read without one. The checksum
chain is computed for a WAL file read alone (no index) and for what remains of an
incarnation after a WAL restart (its index is gone).
"""

from __future__ import annotations

import array
import functools
import os
import struct
import sys
from dataclasses import dataclass
from operator import mul
from typing import TYPE_CHECKING, Iterator, NamedTuple

if TYPE_CHECKING:
    from replicator.walindex import WalIndexHeader

__all__ = [
    "WAL_HEADER_SIZE",
    "FRAME_HEADER_SIZE",
    "PageReader",
    "WAL_VERSION",
    "WAL_MAGIC_LE",
    "WAL_MAGIC_BE",
    "WalError",
    "WalHeader",
    "parse_wal_header",
    "ChainPos",
    "FrameInfo",
    "frame_offset",
    "page_offset",
    "scan_frames",
    "read_page",
    "wal_checksum",
    "FrameChecksummer",
    "WalFile",
]

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
WAL_VERSION = 3007000
WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536

_MASK32 = 0xFFFFFFFF
_WAL_HDR = struct.Struct(">8I")
_FRAME_HDR = struct.Struct(">6I")


class WalError(Exception):
    """The file is not a WAL this reader understands, or a page could not be read."""


@dataclass(frozen=True)
class WalHeader:
    big_endian: bool
    page_size: int
    ckpt_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int
    valid: bool  # the header checksum matched

    @property
    def salts(self) -> tuple[int, int]:
        return (self.salt1, self.salt2)

    @property
    def frame_size(self) -> int:
        return self.page_size + FRAME_HEADER_SIZE


def parse_wal_header(buf: bytes | bytearray | memoryview) -> WalHeader | None:
    """Parse the first 32 bytes of a WAL file.

    Returns None when fewer than 32 bytes are given (no WAL yet). Raises WalError for a
    bad magic (including an all-zero header), an unsupported version or page size. A
    header whose checksum does not match is returned with valid=False (SQLite treats
    such a WAL as empty).
    """
    if len(buf) < WAL_HEADER_SIZE:
        return None
    head = bytes(buf[:WAL_HEADER_SIZE])
    magic, version, page_size, ckpt_seq, salt1, salt2, ck1, ck2 = _WAL_HDR.unpack(head)
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise WalError(f"not a WAL file: bad magic 0x{magic:08x}")
    if version != WAL_VERSION:
        raise WalError(f"unsupported WAL format version {version} (expected {WAL_VERSION})")
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size & (page_size - 1):
        raise WalError(f"unsupported WAL page size {page_size}")
    big_endian = magic == WAL_MAGIC_BE
    valid = wal_checksum(head[:24], big_endian) == (ck1, ck2)
    return WalHeader(big_endian, page_size, ckpt_seq, salt1, salt2, ck1, ck2, valid)


# ChainPos and FrameInfo are NamedTuples, not dataclasses: scan_frames makes one of each
# per frame, and a tuple is built several times faster than a frozen dataclass
class ChainPos(NamedTuple):
    """Where a reader stands: `index` frames consumed and the cumulative checksum after
    frame `index` (the header's checksum when index == 0)."""

    index: int
    checksum1: int
    checksum2: int

    @classmethod
    def start(cls, header: WalHeader) -> "ChainPos":
        return cls(0, header.checksum1, header.checksum2)


class FrameInfo(NamedTuple):
    index: int  # 1-based
    pgno: int
    commit: int  # database size in pages after the commit, 0 if not a commit frame
    offset: int  # byte offset of the frame header in the file
    chain: ChainPos  # the position after this frame (chain.index == index)

    @property
    def is_commit(self) -> bool:
        return self.commit != 0


def frame_offset(index: int, page_size: int) -> int:
    """Byte offset of the header of frame `index` (1-based)."""
    if index < 1:
        raise ValueError(f"frame index must be >= 1, got {index}")
    return WAL_HEADER_SIZE + (index - 1) * (page_size + FRAME_HEADER_SIZE)


def page_offset(index: int, page_size: int) -> int:
    """Byte offset where the page data of frame `index` (1-based) starts."""
    return frame_offset(index, page_size) + FRAME_HEADER_SIZE


# --------------------------------------------------------------------------- checksums


def wal_checksum(
    data: bytes | bytearray | memoryview, big_endian: bool, s0: int = 0, s1: int = 0
) -> tuple[int, int]:
    """Reference (pure Python) WAL checksum of `data` continued from (s0, s1).

    `data` must be a multiple of 8 bytes; words are read in the given byte order.
    """
    n = len(data)
    if n % 8:
        raise ValueError(f"checksummed data must be a multiple of 8 bytes, got {n}")
    words = struct.unpack(f"{'>' if big_endian else '<'}{n // 4}I", data)
    s0 &= _MASK32
    s1 &= _MASK32
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK32
        s1 = (s1 + words[i + 1] + s0) & _MASK32
    return s0, s1


def _matpow(n: int) -> tuple[int, int, int, int]:
    """A**n mod 2**32 as (a00, a01, a10, a11), A = [[1, 1], [1, 2]]."""
    r = (1, 0, 0, 1)
    b = (1, 1, 1, 2)
    while n:
        if n & 1:
            r = _matmul(r, b)
        b = _matmul(b, b)
        n >>= 1
    return r


def _matmul(x: tuple[int, int, int, int], y: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (
        (x[0] * y[0] + x[1] * y[2]) & _MASK32,
        (x[0] * y[1] + x[1] * y[3]) & _MASK32,
        (x[2] * y[0] + x[3] * y[2]) & _MASK32,
        (x[2] * y[1] + x[3] * y[3]) & _MASK32,
    )


@functools.lru_cache(maxsize=None)
def _frame_coefficients(page_size: int) -> tuple[int, ...]:
    """One packed coefficient per 32-bit word of a frame, (k0 << 96) | k1, such that the
    frame's checksum contribution is c0 = sum(k0 * w), c1 = sum(k1 * w) (mod 2**32).

    The frame's checksummed input is n = 1 + page_size/8 pairs: words 0-1 (page number
    and commit field), then the page (words 6...). Words 2-5 (salts, stored checksum)
    are not checksummed: their coefficients are 0. Pair k contributes A^(n-1-k) B x_k,
    with A^(n-1-k) B = [[p00 + p01, p01], [p10 + p11, p11]] for A^(n-1-k) = [[p00, p01],
    [p10, p11]]. Packing both coefficients in one integer halves the multiplications:
    each product k1 * w is below 2**64 and a frame has at most 16,390 words, so the c1
    sum stays below 2**96 and never reaches the c0 bits.
    """
    n = 1 + page_size // 8
    coeffs = [0] * ((page_size + FRAME_HEADER_SIZE) // 4)
    # A^j for j = 0, 1, ...: pair k = n-1-j
    p00, p01, p10, p11 = 1, 0, 0, 1
    for j in range(n):
        k = n - 1 - j
        w = 0 if k == 0 else 4 + 2 * k  # pair 0: words 0, 1; pair k: words 4+2k, 5+2k
        coeffs[w] = (((p00 + p01) & _MASK32) << 96) | ((p10 + p11) & _MASK32)
        coeffs[w + 1] = (p01 << 96) | p11
        p00, p01, p10, p11 = (
            (p00 + p01) & _MASK32,
            (p00 + 2 * p01) & _MASK32,
            (p10 + p11) & _MASK32,
            (p10 + 2 * p11) & _MASK32,
        )
    return tuple(coeffs)


class FrameChecksummer:
    """Frame checksums through the linear form: a frame's contribution is one dot product
    of its words with cached coefficients (C-level map and sum), the chaining a few
    multiplications per frame. Used where no WAL index vouches for the frames (a
    standalone WAL file, what remains of an incarnation after a WAL restart)."""

    def __init__(self, page_size: int, big_endian: bool):
        if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size & (page_size - 1):
            raise WalError(f"unsupported WAL page size {page_size}")
        self.page_size = page_size
        self.big_endian = big_endian
        self.frame_size = page_size + FRAME_HEADER_SIZE
        self._swap = big_endian != (sys.byteorder == "big")
        self._coeffs = _frame_coefficients(page_size)
        # A^n for the n pairs of a frame: the state after a frame is A^n s + c.
        self._an = _matpow(1 + page_size // 8)

    def contributions(self, frames_buf: bytes | bytearray | memoryview, n_frames: int) -> list[tuple[int, int]]:
        """Each frame's checksum contribution (independent of the incoming state)."""
        need = n_frames * self.frame_size
        if n_frames < 0 or len(frames_buf) < need:
            raise ValueError(f"need {need} bytes for {n_frames} frames, got {len(frames_buf)}")
        if self._swap:
            words = array.array("I")
            words.frombytes(memoryview(frames_buf).cast("B")[:need])
            words.byteswap()
        else:
            words = memoryview(frames_buf).cast("B")[:need].cast("I")
        per = self.frame_size // 4
        coeffs = self._coeffs
        out = []
        for i in range(0, n_frames * per, per):
            s = sum(map(mul, coeffs, words[i : i + per]))
            out.append(((s >> 96) & _MASK32, s & _MASK32))
        return out

    def chain(
        self, frames_buf: bytes | bytearray | memoryview, n_frames: int, s0: int, s1: int
    ) -> list[tuple[int, int]]:
        """Cumulative checksum after each of `n_frames` consecutive whole frames in
        `frames_buf` (each frame_size bytes, header first), starting from (s0, s1)."""
        a00, a01, a10, a11 = self._an
        result = []
        for c0, c1 in self.contributions(frames_buf, n_frames):
            s0, s1 = (a00 * s0 + a01 * s1 + c0) & _MASK32, (a10 * s0 + a11 * s1 + c1) & _MASK32
            result.append((s0, s1))
        return result


@functools.lru_cache(maxsize=32)
def _checksummer(page_size: int, big_endian: bool) -> FrameChecksummer:
    return FrameChecksummer(page_size, big_endian)


# --------------------------------------------------------------------------- scanning


def scan_frames(
    fd: int,
    header: WalHeader,
    start: ChainPos,
    *,
    end_index: int | None = None,
    chunk_frames: int = 256,
    vouched: WalIndexHeader | None = None,
) -> Iterator[FrameInfo]:
    """Yield each valid frame after `start.index`, in order.

    Reads with os.pread in chunks of `chunk_frames` frames. Stops silently at the end of
    the log: end of file, a partial frame header or page, a salt mismatch, a page number
    of 0, a checksum mismatch, or after frame `end_index`. Nothing is yielded when the
    header itself is not valid. Memory is bounded by chunk_frames.

    vouched: the WAL index's header of this incarnation, read from the -shm that SQLite's
    connections share. It vouches that frames 1..vouched.mx_frame are whole and
    committed: SQLite's own readers take them on its word, without a checksum (SQLite
    verifies the chain only when it rebuilds the index, in recovery). With it, no checksum
    is computed and each frame's stored checksum is its chain position; the scan ends at
    vouched.mx_frame; the frame at start.index must carry start's checksum (the position
    is in this incarnation's chain) and frame vouched.mx_frame the index's aFrameCksum.
    Nothing is yielded when the index's salts are not the header's. A restart that
    overwrites frames while they are read changes the index's salts first: callers that
    do not hold the WAL check the salts again after reading the pages (see capture).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if not header.valid:
        return
    page_size = header.page_size
    frame_size = header.frame_size
    salt1, salt2 = header.salt1, header.salt2
    unpack_hdr = _FRAME_HDR.unpack_from
    new_tuple = tuple.__new__
    index = start.index
    s0, s1 = start.checksum1 & _MASK32, start.checksum2 & _MASK32
    last_cksum = None
    if vouched is not None:
        if vouched.salts != (salt1, salt2):
            return
        end_index = vouched.mx_frame if end_index is None else min(end_index, vouched.mx_frame)
        last_cksum = vouched.frame_checksum
        if index > 0:
            anchor = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(index, page_size))
            if len(anchor) < FRAME_HEADER_SIZE:
                return
            _, _, fs1, fs2, fc1, fc2 = unpack_hdr(anchor, 0)
            if fs1 != salt1 or fs2 != salt2 or fc1 != s0 or fc2 != s1:
                return
    else:
        summer = _checksummer(page_size, header.big_endian)
        a00, a01, a10, a11 = summer._an
    while True:
        want = chunk_frames
        if end_index is not None:
            want = min(want, end_index - index)
        if want <= 0:
            return
        first = index + 1
        off = frame_offset(first, page_size)
        buf = os.pread(fd, want * frame_size, off)
        n = len(buf) // frame_size
        if n == 0:
            return
        if vouched is None:
            # checksum only the frames that carry this incarnation's salts: the scan stops
            # at the first that does not, and past the end of a restarted WAL the file
            # holds a whole chunk of an older incarnation's frames (a restart's tail scan
            # used to checksum 256 such frames, about 1 MiB, to find none)
            m = 0
            while m < n:
                _, _, fs1, fs2, _, _ = unpack_hdr(buf, m * frame_size)
                if fs1 != salt1 or fs2 != salt2:
                    break
                m += 1
            contrib = summer.contributions(buf, m)
        for i in range(n):
            pos = i * frame_size
            pgno, commit, fs1, fs2, fc1, fc2 = unpack_hdr(buf, pos)
            if fs1 != salt1 or fs2 != salt2 or pgno == 0:
                return
            if vouched is None:
                c0, c1 = contrib[i]
                s0, s1 = (a00 * s0 + a01 * s1 + c0) & _MASK32, (a10 * s0 + a11 * s1 + c1) & _MASK32
                if s0 != fc1 or s1 != fc2:
                    return
            else:
                s0, s1 = fc1, fc2
                if index + 1 == vouched.mx_frame and (fc1, fc2) != last_cksum:
                    return
            index += 1
            # FrameInfo(index, pgno, commit, offset, ChainPos(index, s0, s1)), without the
            # Python-level __new__ of a NamedTuple (this runs for every frame)
            yield new_tuple(FrameInfo, (index, pgno, commit, off + pos, new_tuple(ChainPos, (index, s0, s1))))
        if n < want:
            return  # a partial frame (or EOF) follows


def read_page(fd: int, page_size: int, index: int) -> bytes:
    """The page data of frame `index` (1-based). Raises WalError if the file is short."""
    data = os.pread(fd, page_size, page_offset(index, page_size))
    if len(data) != page_size:
        raise WalError(f"short read of frame {index}: got {len(data)} of {page_size} page bytes")
    return data


class PageReader:
    """Page data of WAL frames through a read-ahead window: one pread for many frames.

    Capture reads the pages of a transaction's frames, which lie together in the WAL;
    `cover(lo, hi)` loads frames lo..hi (and what follows, up to window_bytes) in one
    read, so a busy writer's many small transactions cost a few reads per segment instead
    of one per page. Frames outside the window are read one by one.
    """

    def __init__(self, fd: int, page_size: int, last: int, window_bytes: int = 4 << 20):
        self.fd = fd
        self.last = last  # the last frame that will be asked for: never read past it
        self.page_size = page_size
        self.frame_size = page_size + FRAME_HEADER_SIZE
        self.window_frames = max(1, window_bytes // self.frame_size)
        self._first = 0  # frame index of the window's first frame (0: no window)
        self._buf = b""
        self._count = 0

    def cover(self, lo: int, hi: int) -> None:
        """Make frames lo..hi readable from memory when they fit in one window."""
        if self._first and lo >= self._first and hi < self._first + self._count:
            return
        if hi - lo + 1 > self.window_frames:
            return  # too large: page() reads frame by frame
        count = min(self.window_frames, self.last - lo + 1)
        self._buf = os.pread(self.fd, count * self.frame_size, frame_offset(lo, self.page_size))
        self._first = lo
        self._count = len(self._buf) // self.frame_size

    def page(self, index: int) -> bytes:
        """The page data of frame index (1-based); WalError if the file is short."""
        i = index - self._first
        if self._first and 0 <= i < self._count:
            start = i * self.frame_size + FRAME_HEADER_SIZE
            return self._buf[start : start + self.page_size]
        return read_page(self.fd, self.page_size, index)


class WalFile:
    """Convenience for tools and tests: a WAL file opened read-only.

    `header` is None when the file holds fewer than 32 bytes (no WAL yet); a bad magic,
    version or page size raises WalError from the constructor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.header = parse_wal_header(os.pread(self.fd, WAL_HEADER_SIZE, 0))
        except BaseException:
            os.close(self.fd)
            raise

    def frames(self, start: ChainPos | None = None, *, end_index: int | None = None) -> list[FrameInfo]:
        """All valid frames (after `start`, if given)."""
        if self.header is None:
            return []
        if start is None:
            start = ChainPos.start(self.header)
        return list(scan_frames(self.fd, self.header, start, end_index=end_index))

    def committed(self) -> list[FrameInfo]:
        """Valid frames up to and including the last commit frame."""
        frames = self.frames()
        for i in range(len(frames) - 1, -1, -1):
            if frames[i].is_commit:
                return frames[: i + 1]
        return []

    def page(self, index: int) -> bytes:
        if self.header is None:
            raise WalError(f"{self.path}: no WAL header")
        return read_page(self.fd, self.header.page_size, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "WalFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
