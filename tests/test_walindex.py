"""WAL-index (-shm) header reader: synthetic layouts, and live databases held open by an
app in another process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from replicator.walindex import WalIndexError, WalIndexHeader, WalIndexReader, read_wal_index
from replicator.walreader import WalFile, wal_checksum

NATIVE = "<" if sys.byteorder == "little" else ">"


# --------------------------------------------------------------------------- synthetic shm


def build_hdr(*, change=7, page_size=4096, mx_frame=12, n_page=30, frame_cksum=(0xAABBCCDD, 5),
              salts=(0x1B9A294B, 0x37F91916), is_init=1, corrupt_cksum=False) -> bytes:
    sz = (page_size & 0xFF00) | (page_size >> 16)
    head = struct.pack(NATIVE + "3I2BH4I", 3007000, 0, change, is_init, 0, sz, mx_frame, n_page,
                       *frame_cksum)
    head += struct.pack(">2I", *salts)  # aSalt: the WAL header's bytes, copied verbatim
    ck = wal_checksum(head, sys.byteorder == "big")
    if corrupt_cksum:
        ck = (ck[0] ^ 1, ck[1])
    return head + struct.pack(NATIVE + "2I", *ck)


def build_shm(hdr: bytes | None = None, hdr2: bytes | None = None, *, n_backfill=3,
              read_marks=(0, 12, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), attempted=4,
              size=32768) -> bytes:
    hdr = build_hdr() if hdr is None else hdr
    hdr2 = hdr if hdr2 is None else hdr2
    ckpt = struct.pack(NATIVE + "6I8sII", n_backfill, *read_marks, bytes(8), attempted, 0)
    body = hdr + hdr2 + ckpt
    return body + bytes(size - len(body))


def test_missing_short_and_uninitialised(tmp_path):
    p = tmp_path / "db-shm"
    assert read_wal_index(p) is None
    with WalIndexReader(p) as r:
        assert r.read() is None
        for content in (b"", b"\x00" * 3, build_shm()[:100], bytes(32768)):
            p.write_bytes(content)
            assert read_wal_index(p) is None
            assert r.read() is None


def test_decodes_synthetic_header(tmp_path):
    p = tmp_path / "db-shm"
    p.write_bytes(build_shm())
    h = read_wal_index(p)
    assert h == WalIndexHeader(change=7, page_size=4096, mx_frame=12, n_page=30,
                               frame_checksum=(0xAABBCCDD, 5), salts=(0x1B9A294B, 0x37F91916),
                               n_backfill=3, read_marks=(0, 12, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
                               n_backfill_attempted=4)


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 8192, 32768, 65536])
def test_page_size_decoding(tmp_path, page_size):
    p = tmp_path / "db-shm"
    data = build_shm(build_hdr(page_size=page_size))
    raw_sz = struct.unpack_from(NATIVE + "H", data, 14)[0]
    assert raw_sz == (1 if page_size == 65536 else page_size)
    p.write_bytes(data)
    assert read_wal_index(p).page_size == page_size


def test_inconsistent_copies_raise(tmp_path):
    p = tmp_path / "db-shm"
    p.write_bytes(build_shm(build_hdr(mx_frame=5), build_hdr(mx_frame=6)))
    with pytest.raises(WalIndexError, match="inconsistent after 3 reads"):
        read_wal_index(p, attempts=3)
    p.write_bytes(build_shm(build_hdr(corrupt_cksum=True)))
    with pytest.raises(WalIndexError):
        read_wal_index(p, attempts=2)
    p.write_bytes(build_shm(build_hdr(is_init=0)))  # not zero, yet not initialised
    with pytest.raises(WalIndexError):
        read_wal_index(p, attempts=2)
    with WalIndexReader(p, attempts=2) as r, pytest.raises(WalIndexError):
        r.read()


def test_retries_until_consistent(tmp_path):
    """A writer mid-update (copies differ) is waited out."""
    p = tmp_path / "db-shm"
    p.write_bytes(build_shm(build_hdr(mx_frame=5), build_hdr(mx_frame=6)))
    good = build_shm(build_hdr(mx_frame=6))

    def fix():
        time.sleep(0.003)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, good[:200], 0)
        finally:
            os.close(fd)

    t = threading.Thread(target=fix)
    t.start()
    try:
        h = read_wal_index(p, attempts=60)
    finally:
        t.join()
    assert h.mx_frame == 6


def test_reader_reopens_replaced_file(tmp_path):
    p = tmp_path / "db-shm"
    p.write_bytes(build_shm(build_hdr(mx_frame=1)))
    r = WalIndexReader(p)
    assert r.read().mx_frame == 1
    fd = os.open(p, os.O_WRONLY)  # updated in place: seen through the open fd
    os.pwrite(fd, build_shm(build_hdr(mx_frame=2))[:200], 0)
    os.close(fd)
    assert r.read().mx_frame == 2
    tmp = tmp_path / "new-shm"
    tmp.write_bytes(build_shm(build_hdr(mx_frame=9)))
    os.replace(tmp, p)  # replaced: reopened
    assert r.read().mx_frame == 9
    p.unlink()
    assert r.read() is None
    p.write_bytes(build_shm(build_hdr(mx_frame=10)))
    assert r.read().mx_frame == 10
    r.close()
    r.close()
    assert r.read().mx_frame == 10  # usable again after close: reopens
    r.close()


# --------------------------------------------------------------------------- live databases

# The app: stdlib sqlite3 in its own process, driven by JSON lines on stdin, holding its
# connection open until told to exit (then os._exit, so no close-time checkpoint).
CHILD = r"""
import json, os, sqlite3, sys
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
        rows = []
        for sql in cmd["sql"]:
            rows = con.execute(sql).fetchall()
        wal = path + "-wal"
        out = {"rows": rows, "page_count": con.execute("PRAGMA page_count").fetchone()[0],
               "wal_size": os.path.getsize(wal) if os.path.exists(wal) else 0}
    except Exception as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"""


class App:
    def __init__(self, db_path: Path, page_size: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db_path), str(page_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def exec(self, *sql: str) -> dict:
        self.proc.stdin.write(json.dumps({"op": "exec", "sql": list(sql)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"app process died (rc={self.proc.wait(5)})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

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


def insert_rows(n: int, size: int) -> str:
    return (f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {n}) "
            f"INSERT INTO t(v) SELECT randomblob({size}) FROM n")


def check_against_wal(h: WalIndexHeader, wal: Path, page_size: int, page_count: int) -> None:
    with WalFile(wal) as w:
        committed = w.committed()
        assert h.mx_frame == len(committed)
        assert h.salts == w.header.salts
        assert h.page_size == page_size == w.header.page_size
        assert h.n_page == page_count == committed[-1].commit
        last = committed[-1].chain
        assert h.frame_checksum == (last.checksum1, last.checksum2)


@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_live_header_matches_wal(tmp_path, page_size):
    db = tmp_path / "app.db"
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    with App(db, page_size) as app, WalIndexReader(shm) as reader:
        app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        for i in range(3):
            out = app.exec(f"INSERT INTO t(v) VALUES (randomblob({100 * (i + 1)}))")
        h1 = read_wal_index(shm)
        assert reader.read() == h1
        check_against_wal(h1, wal, page_size, out["page_count"])
        assert h1.n_backfill == 0 and len(h1.read_marks) == 5

        out = app.exec("BEGIN", insert_rows(60, page_size // 2), "COMMIT")
        h2 = reader.read()
        check_against_wal(h2, wal, page_size, out["page_count"])
        assert h2.mx_frame > h1.mx_frame + 20
        assert h2.change != h1.change

        busy, log, done = app.exec("PRAGMA wal_checkpoint(PASSIVE)")["rows"][0]
        assert (busy, log, done) == (0, h2.mx_frame, h2.mx_frame)
        h3 = reader.read()
        assert h3.n_backfill == h3.mx_frame == h2.mx_frame
        assert h3.n_backfill_attempted == h3.mx_frame
        assert h3.salts == h2.salts


def test_live_uncommitted_frames_are_beyond_mx_frame(tmp_path):
    """An open transaction spilling pages writes frames past mxFrame; they are not
    committed until its commit frame is written."""
    db = tmp_path / "app.db"
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    with App(db, 4096) as app:
        app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)",
                 "PRAGMA cache_size=10")
        out = app.exec(insert_rows(5, 1000))
        before = read_wal_index(shm)
        check_against_wal(before, wal, 4096, out["page_count"])

        app.exec("BEGIN", insert_rows(200, 3000))  # left open: spills to the WAL
        during = read_wal_index(shm)
        assert during == before
        with WalFile(wal) as w:
            frames, committed = w.frames(), w.committed()
            assert len(committed) == before.mx_frame
            assert len(frames) > before.mx_frame + 20
            assert not any(f.is_commit for f in frames[before.mx_frame :])

        out = app.exec("COMMIT")
        after = read_wal_index(shm)
        check_against_wal(after, wal, 4096, out["page_count"])
        with WalFile(wal) as w:
            assert after.mx_frame == len(w.frames())


def test_live_truncate_and_restart(tmp_path):
    db = tmp_path / "app.db"
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    with App(db, 4096) as app, WalIndexReader(shm) as reader:
        app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        app.exec(insert_rows(20, 2000))
        h1 = reader.read()
        with WalFile(wal) as w:
            old_salts = w.header.salts
        assert h1.salts == old_salts and h1.mx_frame > 0

        busy, log, done = app.exec("PRAGMA wal_checkpoint(TRUNCATE)")["rows"][0]
        assert busy == 0
        assert wal.stat().st_size == 0
        h2 = reader.read()
        assert h2.mx_frame == 0 and h2.n_backfill == 0

        out = app.exec("INSERT INTO t(v) VALUES (x'01')")
        h3 = reader.read()
        with WalFile(wal) as w:
            assert w.header.salts != old_salts
            assert w.header.salts[0] == (old_salts[0] + 1) & 0xFFFFFFFF
        check_against_wal(h3, wal, 4096, out["page_count"])
