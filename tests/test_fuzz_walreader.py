"""Fuzzing the WAL reader (replicator/walreader.py) against a plain reference reader.

Inputs are real WAL files (tests/fixtures/wal and the shared fixtures) and WALs built here
with correct checksums, both mutated: bit flips, overwritten bytes and fields, truncation,
extension, insertion, deletion, frames copied over others, and headers rewritten with a
valid checksum (other page size, byte order or salts) so that the frame scan runs over
misaligned or foreign data.

Property (the module's docstrings): a header is None (< 32 bytes), a WalHeader, or
WalError; the frames found are exactly those of SQLite's rule (salts, page number != 0,
cumulative checksum; the first invalid frame ends the log), as computed by the reference
below with the plain `wal_checksum`; chunked scans, resumed scans (from a ChainPos) and
bounded scans (end_index) agree with the whole scan; pages read back are the file's
bytes; committed() ends at the last commit frame. Nothing else is ever raised, nothing
hangs (cpu budget) and memory stays bounded (address-space cap).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz_common import LONG_MODE, fuzz_settings, guarded, timeout

from replicator.walreader import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    WAL_VERSION,
    ChainPos,
    PageReader,
    WalError,
    WalFile,
    parse_wal_header,
    scan_frames,
    wal_checksum,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIRS = [ROOT / "tests" / "fixtures" / "wal", Path("/work/shared/fixtures/wal"), ROOT.parent / "shared" / "fixtures" / "wal"]


def _fixtures() -> list[bytes]:
    seen: dict[bytes, None] = {}
    for d in FIXTURE_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.wal")):
                seen.setdefault(p.read_bytes(), None)
    return list(seen)


FIXTURES = _fixtures()
PAGE_SIZES = [512, 1024, 2048, 4096]


# --------------------------------------------------------------------------- the reference


class RefError(Exception):
    pass


def ref_header(data: bytes):
    """(big_endian, page_size, salts, (ck1, ck2), valid), None, or RefError."""
    if len(data) < 32:
        return None
    magic, version, page_size, _ckpt, s1, s2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise RefError("magic")
    if version != WAL_VERSION:
        raise RefError("version")
    if page_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise RefError("page size")
    be = magic == WAL_MAGIC_BE
    return be, page_size, (s1, s2), (c1, c2), wal_checksum(data[:24], be) == (c1, c2)


def ref_frames(data: bytes, header) -> list[tuple[int, int, int, int, tuple[int, int]]]:
    """[(index, pgno, commit, offset, checksum after it)] by SQLite's walDecodeFrame rule."""
    be, page_size, salts, s, valid = header
    if not valid:
        return []
    out = []
    index, off = 1, WAL_HEADER_SIZE
    while off + FRAME_HEADER_SIZE + page_size <= len(data):
        pgno, commit, fs1, fs2, fc1, fc2 = struct.unpack(">6I", data[off : off + FRAME_HEADER_SIZE])
        if (fs1, fs2) != salts or pgno == 0:
            break
        s = wal_checksum(data[off : off + 8], be, *s)
        s = wal_checksum(data[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + page_size], be, *s)
        if s != (fc1, fc2):
            break
        out.append((index, pgno, commit, off, s))
        index += 1
        off += FRAME_HEADER_SIZE + page_size
    return out


# --------------------------------------------------------------------------- inputs


def make_header(page_size: int, big_endian: bool, salts: tuple[int, int], ckpt: int = 0) -> bytes:
    head = struct.pack(">6I", WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE, WAL_VERSION, page_size, ckpt, *salts)
    return head + struct.pack(">2I", *wal_checksum(head, big_endian))


def build_wal(page_size: int, big_endian: bool, salts, frames, stale=()) -> bytes:
    """A WAL whose frames [(pgno, commit, page)] have correct checksums, then stale frames
    (copied with other salts, as an earlier WAL restart leaves them)."""
    hdr = make_header(page_size, big_endian, salts)
    s = struct.unpack(">2I", hdr[24:32])
    out = [hdr]
    for pgno, commit, page in frames:
        head8 = struct.pack(">2I", pgno, commit)
        s = wal_checksum(head8, big_endian, *s)
        s = wal_checksum(page, big_endian, *s)
        out.append(head8 + struct.pack(">4I", *salts, *s) + page)
    for pgno, commit, page in stale:
        out.append(struct.pack(">6I", pgno, commit, salts[0] - 1 & 0xFFFFFFFF, salts[1] ^ 0x5A5A, 0, 0) + page)
    return b"".join(out)


@st.composite
def pages(draw, page_size: int) -> bytes:
    kind = draw(st.sampled_from(["random", "fill", "zero"]))
    if kind == "random":
        return draw(st.randoms(use_true_random=False)).randbytes(page_size)
    if kind == "fill":
        return bytes([draw(st.integers(0, 255))]) * page_size
    return bytes(page_size)


u32 = st.integers(0, 2**32 - 1)
pgnos = st.one_of(st.integers(1, 50), st.sampled_from([0, 1, 2**31, 2**32 - 1]))


@st.composite
def built_wals(draw) -> bytes:
    page_size = draw(st.sampled_from(PAGE_SIZES if LONG_MODE else PAGE_SIZES[:3]))
    frames = draw(
        st.lists(
            st.tuples(pgnos, st.one_of(st.just(0), st.integers(1, 60), u32), pages(page_size)),
            max_size=40 if LONG_MODE else 10,
        )
    )
    stale = draw(st.lists(st.tuples(pgnos, st.integers(0, 60), pages(page_size)), max_size=2))
    return build_wal(page_size, draw(st.booleans()), (draw(u32), draw(u32)), frames, stale)


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """0..5 mutations of data, each aimed anywhere in the (current) file."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 5))):
        n = len(buf)
        pos = draw(st.integers(0, max(0, n - 1)))
        op = draw(
            st.sampled_from(
                ["flip", "byte", "truncate", "extend", "insert", "delete", "field", "copy_frame", "rehead", "frame_edge"]
            )
        )
        if op == "flip" and n:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, n)) :]
        elif op == "extend":
            buf += draw(st.binary(max_size=600))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and n:
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif op == "field" and n >= 4:
            # a big-endian word of a header or frame header: page number, commit, salts...
            at = draw(st.integers(0, (n - 4) // 4)) * 4
            buf[at : at + 4] = struct.pack(">I", draw(st.one_of(u32, st.sampled_from([0, 1, 512, 4096, 65536]))))
        elif op in ("copy_frame", "frame_edge", "rehead") and n >= 32:
            page_size = struct.unpack(">I", buf[8:12])[0]
            fs = page_size + FRAME_HEADER_SIZE if 512 <= page_size <= 65536 else 4096 + FRAME_HEADER_SIZE
            count = (n - 32) // fs
            if op == "copy_frame" and count >= 2:
                i, j = draw(st.integers(0, count - 1)), draw(st.integers(0, count - 1))
                src = bytes(buf[32 + i * fs : 32 + (i + 1) * fs])
                buf[32 + j * fs : 32 + (j + 1) * fs] = src
            elif op == "frame_edge" and count:
                # cut or damage right at a frame boundary: partial header, header without page
                j = draw(st.integers(0, count))
                cut = 32 + j * fs + draw(st.sampled_from([0, 1, 8, 23, 24, 25, fs - 1]))
                del buf[min(cut, len(buf)) :]
            elif op == "rehead":
                # a valid header checksum over other fields: page size, byte order, salts
                magic = draw(st.sampled_from([WAL_MAGIC_LE, WAL_MAGIC_BE]))
                ps = draw(st.one_of(st.sampled_from(PAGE_SIZES + [8192, 65536]), u32))
                salts = struct.unpack(">2I", buf[16:24]) if draw(st.booleans()) else (draw(u32), draw(u32))
                head = struct.pack(">6I", magic, WAL_VERSION, ps, 0, *salts)
                buf[:32] = head + struct.pack(">2I", *wal_checksum(head, magic == WAL_MAGIC_BE))
    return bytes(buf)


@st.composite
def wal_files(draw) -> bytes:
    if FIXTURES and draw(st.booleans()):
        base = draw(st.sampled_from(FIXTURES))
    else:
        base = draw(built_wals())
    return draw(mutations(base))


# --------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fuzz-wal-") as d:
        yield Path(d)


def test_fixtures_are_present():
    assert len(FIXTURES) >= 4, f"WAL fixtures missing from {FIXTURE_DIRS}"


def check_file(path: Path, data: bytes, *, chunk: int, resume_at: int, end_at: int) -> None:
    try:
        expected = ref_header(data)
    except RefError:
        expected = "error"
    try:
        wal = WalFile(path)
    except WalError:
        assert expected == "error"
        event("header: rejected")
        return
    with wal:
        if expected is None:
            event("header: none")
            assert wal.header is None
            assert wal.frames() == [] and wal.committed() == []
            with pytest.raises(WalError):
                wal.page(1)
            return
        assert expected != "error", "WalFile accepted a header the format rejects"
        h = wal.header
        assert (h.big_endian, h.page_size, h.salts, (h.checksum1, h.checksum2), h.valid) == expected
        want = ref_frames(data, expected)
        frames = wal.frames()
        event(f"header valid={h.valid}, frames: {min(len(frames), 4)}{'+' if len(frames) >= 4 else ''}")
        got = [(f.index, f.pgno, f.commit, f.offset, (f.chain.checksum1, f.chain.checksum2)) for f in frames]
        assert got == want
        assert all(f.chain.index == f.index for f in frames)
        # chunking does not change the result
        assert list(scan_frames(wal.fd, h, ChainPos.start(h), chunk_frames=chunk)) == frames
        # a scan resumed after frame k finds the same frames after it
        k = min(resume_at, len(frames))
        start = frames[k - 1].chain if k else ChainPos.start(h)
        assert list(scan_frames(wal.fd, h, start, chunk_frames=chunk)) == frames[k:]
        # end_index bounds the scan
        assert wal.frames(end_index=end_at) == frames[:end_at]
        # committed(): the frames up to the last commit frame
        committed = wal.committed()
        last_commit = max((i for i, f in enumerate(frames) if f.is_commit), default=-1)
        assert committed == frames[: last_commit + 1]
        # pages are the file's bytes, read directly and through the read-ahead window
        ps = h.page_size
        if frames:
            reader = PageReader(wal.fd, ps, frames[-1].index, window_bytes=3 * (ps + FRAME_HEADER_SIZE))
            reader.cover(1, min(2, frames[-1].index))
        for f in frames:
            page = data[f.offset + FRAME_HEADER_SIZE : f.offset + FRAME_HEADER_SIZE + ps]
            assert wal.page(f.index) == page
            assert reader.page(f.index) == page
        # a frame past the end of the file is a WalError, never a short page
        beyond = (len(data) - WAL_HEADER_SIZE) // (ps + FRAME_HEADER_SIZE) + 1
        with pytest.raises(WalError):
            wal.page(beyond)


@pytest.mark.timeout(timeout(60))
@fuzz_settings(1200)
@given(data=wal_files(), chunk=st.integers(1, 4), resume_at=st.integers(0, 12), end_at=st.integers(0, 12))
def test_fuzz_wal_files(scratch, data, chunk, resume_at, end_at):
    path = scratch / "fuzz-wal"
    path.write_bytes(data)
    with guarded():
        check_file(path, data, chunk=chunk, resume_at=resume_at, end_at=end_at)


header_words = st.one_of(
    u32,
    st.sampled_from([WAL_MAGIC_LE, WAL_MAGIC_BE, WAL_VERSION, 0, 1, 256, 512, 1000, 65536, 131072, 2**31]),
)


@st.composite
def header_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "words", "checksummed"]))
    if kind == "random":
        return draw(st.binary(max_size=40))
    words = [draw(header_words) for _ in range(8)]
    raw = struct.pack(">8I", *words)
    if kind == "checksummed":
        raw = raw[:24] + struct.pack(">2I", *wal_checksum(raw[:24], words[0] == WAL_MAGIC_BE))
    return raw + draw(st.binary(max_size=8))


@pytest.mark.timeout(timeout(60))
@fuzz_settings(1500)
@given(raw=header_bytes())
def test_fuzz_parse_wal_header(raw):
    try:
        expected = ref_header(raw)
    except RefError:
        expected = "error"
    with guarded():
        try:
            h = parse_wal_header(raw)
        except WalError as e:
            assert expected == "error" and "\n" not in str(e)
            return
        for view in (bytearray(raw), memoryview(raw)):  # every buffer type reads the same
            assert parse_wal_header(view) == h
    if expected is None:
        assert h is None
        return
    assert expected != "error"
    assert (h.big_endian, h.page_size, h.salts, (h.checksum1, h.checksum2), h.valid) == expected
    assert h.frame_size == h.page_size + FRAME_HEADER_SIZE
