"""WAL reader: fixture facts, edge cases, checksums, and WALs written by real SQLite.

Real databases are written by stdlib sqlite3 in a separate process (the `App` helper),
never in the test process (see DESIGN.md, "Hot spots worth knowing").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from replicator import walreader
from replicator.walreader import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_VERSION,
    ChainPos,
    FrameChecksummer,
    FrameInfo,
    WalError,
    WalFile,
    WalHeader,
    frame_offset,
    page_offset,
    parse_wal_header,
    read_page,
    scan_frames,
    wal_checksum,
)

FIXTURES = Path(__file__).parent / "fixtures" / "wal"
OK_WAL = FIXTURES / "ok.wal"
SALT_MISMATCH_WAL = FIXTURES / "salt-mismatch.wal"
CHECKSUM_MISMATCH_WAL = FIXTURES / "frame-checksum-mismatch.wal"
FRAME_SALTS_WAL = FIXTURES / "frame-salts.wal"

MAGIC_LE = 0x377F0682
MAGIC_BE = 0x377F0683


# --------------------------------------------------------------------------- helpers


def raw_frame_headers(path: Path, page_size: int) -> list[tuple[int, ...]]:
    """Every whole frame header in the file, valid or not: (pgno, commit, s1, s2, c1, c2)."""
    data = path.read_bytes()
    out = []
    off = WAL_HEADER_SIZE
    while off + FRAME_HEADER_SIZE + page_size <= len(data):
        out.append(struct.unpack(">6I", data[off : off + FRAME_HEADER_SIZE]))
        off += FRAME_HEADER_SIZE + page_size
    return out


def scan_path(path: Path, **kw) -> list[FrameInfo]:
    with WalFile(path) as w:
        assert w.header is not None
        start = kw.pop("start", None) or ChainPos.start(w.header)
        return list(scan_frames(w.fd, w.header, start, **kw))


def pc(frames: list[FrameInfo]) -> list[tuple[int, int]]:
    return [(f.pgno, f.commit) for f in frames]


def make_header(page_size: int, *, big_endian: bool = False, version: int = WAL_VERSION,
                ckpt_seq: int = 0, salts: tuple[int, int] = (0x11111111, 0x22222222)) -> bytes:
    head = struct.pack(">6I", MAGIC_BE if big_endian else MAGIC_LE, version, page_size,
                       ckpt_seq, *salts)
    return head + struct.pack(">2I", *wal_checksum(head, big_endian))


def build_wal(frames: list[tuple[int, int, bytes]], page_size: int, *, big_endian: bool = False,
              salts: tuple[int, int] = (0x11111111, 0x22222222), ckpt_seq: int = 0) -> bytes:
    """A WAL with correct checksums for frames [(pgno, commit, page), ...] (reference code)."""
    hdr = make_header(page_size, big_endian=big_endian, salts=salts, ckpt_seq=ckpt_seq)
    s = struct.unpack(">2I", hdr[24:32])
    out = [hdr]
    for pgno, commit, page in frames:
        assert len(page) == page_size
        head8 = struct.pack(">2I", pgno, commit)
        s = wal_checksum(head8, big_endian, *s)
        s = wal_checksum(page, big_endian, *s)
        out.append(head8 + struct.pack(">4I", *salts, *s) + page)
    return b"".join(out)


def reference_chain(buf: bytes, n_frames: int, page_size: int, big_endian: bool,
                    s0: int, s1: int) -> list[tuple[int, int]]:
    fs = page_size + FRAME_HEADER_SIZE
    out = []
    for i in range(n_frames):
        frame = buf[i * fs : (i + 1) * fs]
        s0, s1 = wal_checksum(frame[:8], big_endian, s0, s1)
        s0, s1 = wal_checksum(frame[FRAME_HEADER_SIZE:], big_endian, s0, s1)
        out.append((s0, s1))
    return out


def rewrite_wal(data: bytes, *, big_endian: bool) -> bytes:
    """Re-checksum a whole WAL file in the given byte order (frames unchanged otherwise)."""
    page_size = struct.unpack(">I", data[8:12])[0]
    fs = page_size + FRAME_HEADER_SIZE
    head = struct.pack(">I", MAGIC_BE if big_endian else MAGIC_LE) + data[4:24]
    s = wal_checksum(head, big_endian)
    out = [head, struct.pack(">2I", *s)]
    for off in range(WAL_HEADER_SIZE, len(data) - fs + 1, fs):
        frame = data[off : off + fs]
        s = wal_checksum(frame[:8], big_endian, *s)
        s = wal_checksum(frame[FRAME_HEADER_SIZE:], big_endian, *s)
        out.append(frame[:16] + struct.pack(">2I", *s) + frame[FRAME_HEADER_SIZE:])
    return b"".join(out)


# A small "app": stdlib sqlite3 in its own process, driven by JSON lines on stdin. It keeps
# its connection open until told to exit and then leaves with os._exit, so SQLite's
# close-time checkpoint does not delete the WAL under the test.
CHILD = r"""
import hashlib, json, os, sqlite3, sys
path, page_size = sys.argv[1], int(sys.argv[2])
con = sqlite3.connect(path, isolation_level=None)
con.execute(f"PRAGMA page_size={page_size}")
assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
con.execute("PRAGMA wal_autocheckpoint=0")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "exit":
        os._exit(0)
    try:
        out = {}
        if cmd["op"] == "exec":
            rows = []
            for sql in cmd["sql"]:
                rows = con.execute(sql).fetchall()
            out["rows"] = rows
        elif cmd["op"] == "digest":
            h = hashlib.sha256()
            for rid, v in con.execute("SELECT id, v FROM t ORDER BY id"):
                h.update(rid.to_bytes(8, "big") + v)
            out["digest"] = h.hexdigest()
        out["page_count"] = con.execute("PRAGMA page_count").fetchone()[0]
        wal = path + "-wal"
        out["wal_size"] = os.path.getsize(wal) if os.path.exists(wal) else 0
    except Exception as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"""


class App:
    def __init__(self, db_path: Path, page_size: int):
        self.db_path = db_path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db_path), str(page_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def cmd(self, **kw) -> dict:
        self.proc.stdin.write(json.dumps(kw) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"app process died (rc={self.proc.wait(5)})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def exec(self, *sql: str) -> dict:
        return self.cmd(op="exec", sql=list(sql))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def local_digest(db_path: Path) -> str:
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        h = hashlib.sha256()
        for rid, v in con.execute("SELECT id, v FROM t ORDER BY id"):
            h.update(rid.to_bytes(8, "big") + v)
        return h.hexdigest()
    finally:
        con.close()


# --------------------------------------------------------------------------- fixtures: facts


def test_fixture_headers():
    for path in (OK_WAL, SALT_MISMATCH_WAL, CHECKSUM_MISMATCH_WAL):
        h = parse_wal_header(path.read_bytes()[:32])
        assert h == WalHeader(big_endian=False, page_size=4096, ckpt_seq=0, salt1=0x4875A40B,
                              salt2=0xA38DE4F5, checksum1=0xE08B785B, checksum2=0x8E57DDA3,
                              valid=True)
        assert h.salts == (0x4875A40B, 0xA38DE4F5)
        assert h.frame_size == 4096 + 24
    h = parse_wal_header(FRAME_SALTS_WAL.read_bytes())
    assert h.valid and h.page_size == 4096 and h.ckpt_seq == 2
    assert h.salts == (0x1B9A294B, 0x37F91916)


def test_ok_wal_frames_offsets_and_pages():
    data = OK_WAL.read_bytes()
    with WalFile(OK_WAL) as w:
        frames = w.frames()
        assert pc(frames) == [(1, 0), (2, 2), (2, 2)]
        assert [f.index for f in frames] == [1, 2, 3]
        assert [f.offset for f in frames] == [32, 4152, 8272]
        assert [f.is_commit for f in frames] == [False, True, True]
        assert [page_offset(f.index, 4096) for f in frames] == [56, 4176, 8296]
        for f, (lo, hi) in zip(frames, [(56, 4152), (4176, 8272), (8296, 12392)]):
            assert w.page(f.index) == data[lo:hi]
            assert read_page(w.fd, 4096, f.index) == data[lo:hi]
            # the chain position after each frame is the frame's stored checksum
            stored = struct.unpack(">2I", data[f.offset + 16 : f.offset + 24])
            assert f.chain == ChainPos(f.index, *stored)
        assert w.committed() == frames
        with pytest.raises(WalError, match="frame 4"):
            w.page(4)


def test_salt_mismatch_ends_log():
    raw = raw_frame_headers(SALT_MISMATCH_WAL, 4096)
    assert len(raw) == 3
    hdr = parse_wal_header(SALT_MISMATCH_WAL.read_bytes())
    assert (raw[1][2], raw[1][3]) != hdr.salts  # frame 2's salt differs from the header
    with WalFile(SALT_MISMATCH_WAL) as w:
        assert pc(w.frames()) == [(1, 0)]
        assert w.committed() == []  # frame 1 is not a commit: nothing is committed


def test_frame_checksum_mismatch_ends_log():
    raw = raw_frame_headers(CHECKSUM_MISMATCH_WAL, 4096)
    hdr = parse_wal_header(CHECKSUM_MISMATCH_WAL.read_bytes())
    assert (raw[1][2], raw[1][3]) == hdr.salts  # salts fine: it is the checksum
    with WalFile(CHECKSUM_MISMATCH_WAL) as w:
        frames = w.frames()
        assert pc(frames) == [(1, 0)]
        assert frames[0].offset == 32
        assert w.committed() == []


def test_frame_salts_three_pairs():
    raw = raw_frame_headers(FRAME_SALTS_WAL, 4096)
    pairs = []
    for r in raw:
        if (r[2], r[3]) not in pairs:
            pairs.append((r[2], r[3]))
    assert pairs == [(0x1B9A294B, 0x37F91916), (0x1B9A294A, 0x031F195E), (0x1B9A2949, 0x13B3DD67)]
    assert [p[0] for p in pairs] == [pairs[0][0] - i for i in range(3)]  # salt-1 drops by one
    hdr = parse_wal_header(FRAME_SALTS_WAL.read_bytes())
    assert hdr.salts == pairs[0]
    frames = scan_path(FRAME_SALTS_WAL)
    # only the leading frames with the header's salts are the log; stale frames from earlier
    # WAL restarts follow and end it
    n_current = next(i for i, r in enumerate(raw) if (r[2], r[3]) != hdr.salts)
    assert n_current == 2 and len(raw) == 10
    assert pc(frames) == [(2, 2), (2, 2)]
    assert all((r[2], r[3]) == hdr.salts for r in raw[: len(frames)])


def test_stale_frames_after_the_log_are_never_checksummed(tmp_path, monkeypatch):
    """Past the end of a restarted WAL lie an older incarnation's frames. A scan without
    the WAL index (a restart's tail scan) stops at the first of them, and computes the
    checksum only of the frames with the header's salts, not of the whole chunk it read:
    a restart's tail scan at 1,000 tx/s was a tenth of the agent's CPU."""
    ps = 512
    page = lambda b: bytes([b]) * ps
    cur = build_wal([(1, 0, page(1)), (2, 2, page(2))], ps)
    old = build_wal([(p, p if p % 3 == 0 else 0, page(p)) for p in range(1, 41)], ps, salts=(0x11111110, 0x5A5A5A5A))
    stale = old[WAL_HEADER_SIZE + 2 * (FRAME_HEADER_SIZE + ps):]  # old frames 3..40 follow the current two
    path = tmp_path / "db-wal"
    path.write_bytes(cur + stale)
    asked: list[int] = []
    real = walreader.FrameChecksummer.contributions
    monkeypatch.setattr(walreader.FrameChecksummer, "contributions", lambda self, buf, n: asked.append(n) or real(self, buf, n))
    frames = scan_path(path)
    assert pc(frames) == [(1, 0), (2, 2)]
    assert asked == [2]  # the two current frames, not the 40 the chunk held
    asked.clear()
    with WalFile(path) as w:  # the tail scan of a restart: from the last captured frame
        assert list(scan_frames(w.fd, w.header, frames[-1].chain)) == []
    assert asked == [0]


# --------------------------------------------------------------------------- edge cases


def test_empty_file_and_short_header(tmp_path):
    empty = tmp_path / "empty-wal"
    empty.write_bytes(b"")
    assert parse_wal_header(b"") is None
    with WalFile(empty) as w:
        assert w.header is None
        assert w.frames() == [] and w.committed() == []
    short = tmp_path / "short-wal"
    short.write_bytes(OK_WAL.read_bytes()[:31])
    assert parse_wal_header(short.read_bytes()) is None
    with WalFile(short) as w:
        assert w.header is None and w.frames() == []


def test_zero_header_is_bad_magic(tmp_path):
    with pytest.raises(WalError, match="magic"):
        parse_wal_header(bytes(32))
    p = tmp_path / "zero-wal"
    p.write_bytes(bytes(32 + 4120))
    with pytest.raises(WalError, match="magic"):
        WalFile(p)


def test_header_checksum_wrong_is_not_valid(tmp_path):
    data = bytearray(OK_WAL.read_bytes())
    data[31] ^= 0x01
    h = parse_wal_header(bytes(data))
    assert h is not None and h.valid is False
    p = tmp_path / "badhdr-wal"
    p.write_bytes(data)
    with WalFile(p) as w:
        assert w.header.valid is False
        assert w.frames() == [] and w.committed() == []  # no valid WAL: nothing is in it
    # a corrupted salt in the header invalidates it too (the checksum covers it)
    data = bytearray(OK_WAL.read_bytes())
    data[16] ^= 0x80
    assert parse_wal_header(bytes(data)).valid is False


def test_wrong_version_names_it():
    data = bytearray(OK_WAL.read_bytes()[:32])
    data[4:8] = struct.pack(">I", 3007001)
    with pytest.raises(WalError, match="3007001") as ei:
        parse_wal_header(bytes(data))
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("page_size", [0, 256, 1000, 4097, 131072, 1])
def test_unsupported_page_size(page_size):
    with pytest.raises(WalError, match=f"page size {page_size}"):
        parse_wal_header(make_header(page_size))


@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("big_endian", [False, True])
def test_supported_headers(page_size, big_endian):
    h = parse_wal_header(make_header(page_size, big_endian=big_endian, ckpt_seq=7,
                                     salts=(0xDEADBEEF, 5)))
    assert (h.page_size, h.big_endian, h.ckpt_seq, h.salts, h.valid) == (
        page_size, big_endian, 7, (0xDEADBEEF, 5), True)
    assert h.frame_size == page_size + 24
    # the same header checked in the other byte order does not match
    flipped = bytearray(make_header(page_size, big_endian=big_endian))
    flipped[3] ^= 1
    assert parse_wal_header(bytes(flipped)).valid is False


@pytest.mark.parametrize("chunk", [1, 2, 256])
@pytest.mark.parametrize("cut, expect", [
    (32, []),                              # header only
    (32 + 10, []),                         # partial first frame header
    (32 + 4120, [(1, 0)]),                 # exactly one frame
    (32 + 4120 + 10, [(1, 0)]),            # partial frame header
    (32 + 4120 + 24, [(1, 0)]),            # frame header without its page
    (32 + 4120 + 24 + 4095, [(1, 0)]),     # page one byte short
    (32 + 2 * 4120, [(1, 0), (2, 2)]),
    (32 + 3 * 4120, [(1, 0), (2, 2), (2, 2)]),
])
def test_truncated_files_end_log(tmp_path, chunk, cut, expect):
    p = tmp_path / "cut-wal"
    p.write_bytes(OK_WAL.read_bytes()[:cut])
    assert pc(scan_path(p, chunk_frames=chunk)) == expect


def test_pgno_zero_ends_log(tmp_path):
    ps = 512
    pages = [bytes([i]) * ps for i in range(4)]
    p = tmp_path / "pgno0-wal"
    p.write_bytes(build_wal([(1, 0, pages[0]), (2, 2, pages[1]), (0, 0, pages[2]),
                             (3, 3, pages[3])], ps))
    assert pc(scan_path(p)) == [(1, 0), (2, 2)]


def test_offsets():
    assert frame_offset(1, 4096) == 32
    assert frame_offset(3, 4096) == 32 + 2 * 4120
    assert page_offset(1, 4096) == 56
    assert frame_offset(2, 65536) == 32 + 65560
    assert page_offset(2, 512) == 32 + 536 + 24
    with pytest.raises(ValueError):
        frame_offset(0, 4096)


def test_read_page_short(tmp_path):
    p = tmp_path / "cut-wal"
    p.write_bytes(OK_WAL.read_bytes()[: 32 + 4120 + 24 + 100])
    fd = os.open(p, os.O_RDONLY)
    try:
        assert len(read_page(fd, 4096, 1)) == 4096
        with pytest.raises(WalError, match="frame 2"):
            read_page(fd, 4096, 2)
    finally:
        os.close(fd)


def test_end_index_and_chain_on_fixture():
    full = scan_path(OK_WAL)
    for k in range(0, 5):
        assert scan_path(OK_WAL, end_index=k) == full[:k]
    for k in range(len(full)):
        assert scan_path(OK_WAL, start=full[k].chain) == full[k + 1 :]
    # a start past end_index yields nothing
    assert scan_path(OK_WAL, start=full[1].chain, end_index=1) == []
    # a start position with the wrong checksum finds nothing (the chain does not continue)
    bad = ChainPos(1, full[0].chain.checksum1 ^ 1, full[0].chain.checksum2)
    assert scan_path(OK_WAL, start=bad) == []
    with pytest.raises(ValueError):
        scan_path(OK_WAL, chunk_frames=0)


def test_big_endian_wal_scans_the_same(tmp_path):
    p = tmp_path / "be-wal"
    p.write_bytes(rewrite_wal(OK_WAL.read_bytes(), big_endian=True))
    with WalFile(p) as w:
        assert w.header.big_endian and w.header.valid
        assert pc(w.frames()) == [(1, 0), (2, 2), (2, 2)]
    # round trip back to little-endian reproduces the original file byte for byte
    assert rewrite_wal(p.read_bytes(), big_endian=False) == OK_WAL.read_bytes()


def test_scan_is_lazy_and_chunked(tmp_path):
    ps = 512
    rng = random.Random(3)
    frames = [(i % 7 + 1, (i + 1) if i % 5 == 4 else 0, rng.randbytes(ps)) for i in range(40)]
    p = tmp_path / "many-wal"
    p.write_bytes(build_wal(frames, ps))
    expected = [(pg, c) for pg, c, _ in frames]
    for chunk in (1, 3, 7, 40, 41, 256):
        assert pc(scan_path(p, chunk_frames=chunk)) == expected
    with WalFile(p) as w:
        it = scan_frames(w.fd, w.header, ChainPos.start(w.header), chunk_frames=4)
        first = next(it)
        assert first.index == 1 and first.pgno == 1
        assert w.committed()[-1].index == 40
        assert [f.index for f in w.committed()] == list(range(1, 41))


# --------------------------------------------------------------------------- checksums


def test_reference_checksum_basics():
    assert wal_checksum(b"", False) == (0, 0)
    assert wal_checksum(struct.pack("<2I", 1, 2), False) == (1, 3)
    assert wal_checksum(struct.pack(">2I", 1, 2), True) == (1, 3)
    # two pairs: s0 = 1 + 3 + 3 = 7, s1 = 3 + 4 + 7 = 14
    assert wal_checksum(struct.pack("<4I", 1, 2, 3, 4), False) == (7, 14)
    assert wal_checksum(struct.pack("<2I", 3, 4), False, 1, 3) == (7, 14)
    # wraps mod 2**32
    assert wal_checksum(struct.pack("<2I", 0xFFFFFFFF, 0xFFFFFFFF), False, 1, 0) == (0, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        wal_checksum(b"1234", False)
    # the header checksums stored in the fixtures
    for path in (OK_WAL, FRAME_SALTS_WAL):
        head = path.read_bytes()[:32]
        assert wal_checksum(head[:24], False) == struct.unpack(">2I", head[24:32])


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 65536])
@pytest.mark.parametrize("big_endian", [False, True])
def test_linear_form_equals_reference_random(page_size, big_endian):
    rng = random.Random(page_size * 2 + big_endian)
    n = 6 if page_size < 65536 else 3
    buf = rng.randbytes(n * (page_size + 24))
    cs = FrameChecksummer(page_size, big_endian)
    for s0, s1 in [(0, 0), (0xFFFFFFFF, 0xFFFFFFFE), (rng.getrandbits(32), rng.getrandbits(32))]:
        expect = reference_chain(buf, n, page_size, big_endian, s0, s1)
        assert cs.chain(buf, n, s0, s1) == expect
        assert cs.chain(memoryview(buf), n, s0, s1) == expect
        assert cs.chain(buf, n - 1, s0, s1) == expect[:-1]
    # all-ones words exercise the largest products
    ones = b"\xff" * (2 * (page_size + 24))
    assert cs.chain(ones, 2, 0xFFFFFFFF, 0xFFFFFFFF) == reference_chain(
        ones, 2, page_size, big_endian, 0xFFFFFFFF, 0xFFFFFFFF)
    assert cs.chain(b"", 0, 1, 2) == []
    with pytest.raises(ValueError):
        cs.chain(buf[:-1], n, 0, 0)


def test_linear_form_equals_stored_fixture_checksums():
    data = OK_WAL.read_bytes()
    cs = FrameChecksummer(4096, False)
    stored = [r[4:6] for r in raw_frame_headers(OK_WAL, 4096)]
    assert cs.chain(data[32:], 3, 0xE08B785B, 0x8E57DDA3) == stored
    data = FRAME_SALTS_WAL.read_bytes()
    stored = [r[4:6] for r in raw_frame_headers(FRAME_SALTS_WAL, 4096)]
    assert cs.chain(data[32:], 2, *struct.unpack(">2I", data[24:32])) == stored[:2]


def test_checksummer_rejects_bad_page_size():
    with pytest.raises(WalError):
        FrameChecksummer(1000, False)


# --------------------------------------------------------------------------- real WALs


def _big_tx_rows(page_size: int) -> tuple[int, int]:
    """(rows, bytes per row) for a transaction touching many pages."""
    return 120, page_size // 2


@pytest.fixture(scope="module", params=[1024, 4096, 65536], ids=lambda p: f"ps{p}")
def real_wal(request, tmp_path_factory):
    """A database written by SQLite in another process; the WAL is left in place."""
    page_size = request.param
    d = tmp_path_factory.mktemp(f"real{page_size}")
    db = d / "app.db"
    txs = []  # per transaction: the app's view after it (page_count, wal_size)
    with App(db, page_size) as app:
        txs.append(app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)"))
        for i in range(3):
            txs.append(app.exec(f"INSERT INTO t(v) VALUES (randomblob({50 * (i + 1)}))"))
        rows, size = _big_tx_rows(page_size)
        txs.append(app.exec("BEGIN",
                            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
                            f"WHERE i < {rows}) INSERT INTO t(v) SELECT randomblob({size}) FROM n",
                            "COMMIT"))
        txs.append(app.exec("UPDATE t SET v = randomblob(length(v)) WHERE id % 2 = 0"))
        txs.append(app.exec("DELETE FROM t WHERE id % 3 = 0"))
        txs.append(app.exec("INSERT INTO t(v) VALUES (x'00')"))
        final = app.cmd(op="digest")
        page_count = app.exec("PRAGMA page_count")["rows"][0][0]
    return {"dir": d, "db": db, "wal": Path(str(db) + "-wal"), "page_size": page_size,
            "txs": txs, "digest": final["digest"], "page_count": page_count}


def test_real_wal_every_frame_found(real_wal):
    ps = real_wal["page_size"]
    fs = ps + 24
    size = real_wal["wal"].stat().st_size
    assert size == real_wal["txs"][-1]["wal_size"]
    assert (size - 32) % fs == 0
    n_written = (size - 32) // fs
    with WalFile(real_wal["wal"]) as w:
        assert w.header.page_size == ps and w.header.valid and not w.header.big_endian
        frames = w.frames()
        assert [f.index for f in frames] == list(range(1, n_written + 1))
        assert [f.offset for f in frames] == [frame_offset(i, ps) for i in range(1, n_written + 1)]
        assert w.committed() == frames  # nothing after the last commit
    # the big transaction wrote many frames
    sizes = [(t["wal_size"] - 32) // fs for t in real_wal["txs"]]
    assert sizes[4] - sizes[3] >= 40


def test_real_wal_commit_frames_match_transactions(real_wal):
    fs = real_wal["page_size"] + 24
    frames = scan_path(real_wal["wal"])
    commits = [f for f in frames if f.is_commit]
    txs = real_wal["txs"]
    assert len(commits) == len(txs)
    # each transaction's commit frame is the last frame it wrote, and carries the database
    # size in pages after it
    assert [f.index for f in commits] == [(t["wal_size"] - 32) // fs for t in txs]
    assert [f.commit for f in commits] == [t["page_count"] for t in txs]
    assert commits[-1].commit == real_wal["page_count"]
    assert frames[-1] is commits[-1]


def test_real_wal_pages_rebuild_database(real_wal, tmp_path):
    """The main file plus the last copy of each committed page is the app's database."""
    ps = real_wal["page_size"]
    data = bytearray(real_wal["db"].read_bytes())
    with WalFile(real_wal["wal"]) as w:
        committed = w.committed()
        for f in committed:
            end = f.pgno * ps
            if len(data) < end:
                data.extend(bytes(end - len(data)))
            data[end - ps : end] = w.page(f.index)
    n_pages = committed[-1].commit
    data = data[: n_pages * ps] + bytes(max(0, n_pages * ps - len(data)))
    out = tmp_path / "rebuilt.db"
    out.write_bytes(data)
    assert local_digest(out) == real_wal["digest"]


def test_real_wal_chain_continuation(real_wal):
    full = scan_path(real_wal["wal"])
    n = len(full)
    for cut in sorted({1, n // 3, n // 2, n - 1}):
        first = scan_path(real_wal["wal"], end_index=cut)
        assert first == full[:cut]
        rest = scan_path(real_wal["wal"], start=first[-1].chain)
        assert first + rest == full
    for chunk in (1, 5, 64):
        assert scan_path(real_wal["wal"], chunk_frames=chunk) == full
    # end_index past the end is harmless; continuing from the last frame finds nothing
    assert scan_path(real_wal["wal"], end_index=n + 10) == full
    assert scan_path(real_wal["wal"], start=full[-1].chain) == []
    # the chain positions are SQLite's stored frame checksums
    raw = raw_frame_headers(real_wal["wal"], real_wal["page_size"])
    assert [(f.chain.checksum1, f.chain.checksum2) for f in full] == [r[4:6] for r in raw]


def test_real_wal_linear_form_equals_stored(real_wal):
    ps = real_wal["page_size"]
    data = real_wal["wal"].read_bytes()
    raw = raw_frame_headers(real_wal["wal"], ps)
    cs = FrameChecksummer(ps, False)
    s = struct.unpack(">2I", data[24:32])
    assert cs.chain(data[32:], len(raw), *s) == [r[4:6] for r in raw]
    k = min(len(raw), 8)
    assert reference_chain(data[32:], k, ps, False, *s) == [r[4:6] for r in raw[:k]]


def test_real_wal_corrupt_frame_ends_log(real_wal, tmp_path):
    ps = real_wal["page_size"]
    data = bytearray(real_wal["wal"].read_bytes())
    full = scan_path(real_wal["wal"])
    k = len(full) // 2
    data[page_offset(k, ps) + ps // 2] ^= 0x40  # flip a bit in frame k's page
    p = tmp_path / "corrupt-wal"
    p.write_bytes(data)
    assert scan_path(p) == full[: k - 1]


def test_real_wal_big_endian_accepted_by_sqlite(real_wal, tmp_path):
    """Our big-endian checksums are SQLite's: it recovers a WAL we re-checksummed."""
    d = tmp_path / "be"
    d.mkdir()
    shutil.copyfile(real_wal["db"], d / "app.db")
    be = rewrite_wal(real_wal["wal"].read_bytes(), big_endian=True)
    (d / "app.db-wal").write_bytes(be)
    with WalFile(d / "app.db-wal") as w:
        assert w.header.big_endian
        assert pc(w.frames()) == pc(scan_path(real_wal["wal"]))
    assert local_digest(d / "app.db") == real_wal["digest"]


def test_real_wal_restart_leaves_stale_tail(tmp_path):
    """After a RESTART checkpoint the next writer rewrites the WAL from frame 1 with new
    salts; the older frames left behind are not part of the log."""
    db = tmp_path / "app.db"
    wal = Path(str(db) + "-wal")
    with App(db, 4096) as app:
        app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        app.exec("INSERT INTO t(v) SELECT randomblob(3000) FROM "
                 "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 50) "
                 "SELECT i FROM n)")
        before = WalFile(wal)
        old_header, old_frames = before.header, before.frames()
        before.close()
        busy, log, done = app.exec("PRAGMA wal_checkpoint(RESTART)")["rows"][0]
        assert busy == 0 and log == done == len(old_frames)
        after_tx = app.exec("INSERT INTO t(v) VALUES (x'01')")
        assert after_tx["wal_size"] == wal.stat().st_size
        with WalFile(wal) as w:
            assert w.header.salt1 == (old_header.salt1 + 1) & 0xFFFFFFFF
            assert w.header.salt2 != old_header.salt2
            assert w.header.ckpt_seq == old_header.ckpt_seq + 1
            frames = w.frames()
            assert 1 <= len(frames) < len(old_frames)
            assert frames[-1].is_commit and frames[-1].commit == after_tx["page_count"]
            assert w.committed() == frames
            # the file still holds the old frames after them
            assert (wal.stat().st_size - 32) // 4120 == len(old_frames)
        # the old chain position does not continue into the new log
        with WalFile(wal) as w:
            assert list(scan_frames(w.fd, w.header, old_frames[len(frames) - 1].chain)) == []


# --------------------------------------------------------------------------- vouched scans


def _index_of(real_wal):
    from replicator.walindex import read_wal_index

    view = read_wal_index(str(real_wal["db"]) + "-shm")
    assert view is not None and view.mx_frame > 0
    return view


def test_vouched_scan_equals_the_checksummed_scan(real_wal):
    """Frames the WAL index vouches for come out as the checksum chain finds them (same
    frames, same chain positions: the stored checksums), from any start position."""
    view = _index_of(real_wal)
    full = scan_path(real_wal["wal"])
    assert full[-1].index == view.mx_frame
    assert scan_path(real_wal["wal"], vouched=view) == full
    for k in sorted({1, len(full) // 2, len(full) - 1}):
        assert scan_path(real_wal["wal"], start=full[k - 1].chain, vouched=view) == full[k:]
        assert scan_path(real_wal["wal"], end_index=k, vouched=view) == full[:k]
    for chunk in (1, 7):
        assert scan_path(real_wal["wal"], chunk_frames=chunk, vouched=view) == full


def test_vouched_scan_checks_its_anchors(real_wal):
    """Without a checksum, the anchors still hold: a start that is not in this incarnation's
    chain, an index of another incarnation, or a last frame that is not the one the index
    names yields nothing past what is proven."""
    from dataclasses import replace

    view = _index_of(real_wal)
    full = scan_path(real_wal["wal"])
    k = len(full) // 2
    bad_start = ChainPos(k, full[k - 1].chain.checksum1 ^ 1, full[k - 1].chain.checksum2)
    assert scan_path(real_wal["wal"], start=bad_start, vouched=view) == []
    other = replace(view, salts=(view.salts[0] + 1, view.salts[1]))
    assert scan_path(real_wal["wal"], vouched=other) == []
    wrong_last = replace(view, frame_checksum=(view.frame_checksum[0] ^ 1, view.frame_checksum[1]))
    assert scan_path(real_wal["wal"], vouched=wrong_last) == full[:-1]
    # the index bounds the scan: frames past its mx_frame are not taken
    short = replace(view, mx_frame=k, frame_checksum=(full[k - 1].chain.checksum1, full[k - 1].chain.checksum2))
    assert scan_path(real_wal["wal"], vouched=short) == full[:k]
    assert scan_path(real_wal["wal"], end_index=len(full) + 5, vouched=short) == full[:k]


def test_vouched_scan_stops_at_frames_of_another_incarnation(real_wal, tmp_path):
    """A frame whose salts are not the header's ends the log, vouched or not (a restart
    overwriting the WAL while it is read)."""
    ps = real_wal["page_size"]
    view = _index_of(real_wal)
    full = scan_path(real_wal["wal"])
    data = bytearray(real_wal["wal"].read_bytes())
    k = len(full) // 2
    off = frame_offset(k + 1, ps)
    data[off + 8 : off + 12] = struct.pack(">I", view.salts[0] + 1)
    p = tmp_path / "restarted-wal"
    p.write_bytes(data)
    assert scan_path(p, vouched=view) == full[:k]
    assert scan_path(p) == full[:k]


def test_xor_of_u64_equals_a_plain_loop():
    from replicator.artefact import xor_of_u64

    rng = random.Random(5)
    for n in (0, 1, 2, 3, 7, 64, 1000, 4097):
        values = [rng.getrandbits(64) for _ in range(n)]
        expect = 0
        for v in values:
            expect ^= v
        for order in ("little", "big"):
            buf = b"".join(v.to_bytes(8, order) for v in values)
            assert xor_of_u64(buf, order) == expect
            assert xor_of_u64(memoryview(bytearray(buf)), order) == expect
    with pytest.raises(ValueError):
        xor_of_u64(b"123")
