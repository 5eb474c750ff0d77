"""End to end: damaged or missing artefacts make `replicator restore` fail safely (DESIGN invariant 4).

One real replica is built per module (a writer process, a real agent process, a file
replica, several writer runs so the chain has many segments). Each test copies it and
damages the copy, then runs `replicator restore` as a child process and checks that the
restore fails with one line naming the artefact, leaves nothing at or beside the target,
and never prints a traceback; or, where the damage does not matter for the requested
state, that the restore succeeds with the right rows.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cbor2
import pytest
import xxhash

from harness import AgentProcess, assert_same_pages, checkpoint, cli, integrity, replica_keys, rows, wait_for, write
from replicator import artefact
from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey, parse_key

PREFIX = artefact.PREFIX_SIZE  # magic (8) + header length (4)
RUNS, PER_RUN = 6, 10  # 60 insert transactions: txid k holds row id k


@dataclass(frozen=True)
class Replica:
    root: Path
    generation: str
    snapshot: ArtefactKey
    segments: tuple[ArtefactKey, ...]  # by first txid
    source: Path  # the source database, checkpointed (its final state)
    ids: list[int]  # row ids of the source, txid k inserted id k
    ns: list[int]  # the n column of the source, by id

    @property
    def last_txid(self) -> int:
        return self.segments[-1].last_txid

    def seg_with(self, txid: int) -> ArtefactKey:
        return next(s for s in self.segments if s.first_txid <= txid <= s.last_txid)

    @property
    def middle(self) -> ArtefactKey:
        """A segment well inside the chain holding at least 3 transactions (2 if none)."""
        inner = [s for s in self.segments[1:-1] if s.first_txid >= 3]
        for need in (3, 2, 1):
            cands = [s for s in inner if s.last_txid - s.first_txid + 1 >= need]
            if cands:
                return min(cands, key=lambda s: abs(s.first_txid - self.last_txid // 2))
        raise AssertionError(f"no inner segment in {[s.key for s in self.segments]}")


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Replica:
    tmp = tmp_path_factory.mktemp("damage-src")
    db, root = tmp / "app.db", tmp / "replica"
    write(db, [["schema"]])
    with AgentProcess(str(db), f"file://{root}", log=tmp / "agent.log") as agent:
        wait_for(lambda: any(k.endswith(".snapshot") for k in replica_keys(root)), what="first snapshot")
        for _ in range(RUNS):
            write(db, [["insert", PER_RUN, 300]])
            time.sleep(0.25)  # let the agent ship: the runs end up in different segments
        assert agent.stop() == 0
    checkpoint(db)
    parsed = [parse_key(k) for k in replica_keys(root)]
    assert all(parsed), replica_keys(root)
    gens = {k.generation for k in parsed}
    assert len(gens) == 1, gens
    snaps = [k for k in parsed if k.kind == SNAPSHOT]
    segs = sorted((k for k in parsed if k.kind == SEGMENT), key=lambda k: k.first_txid)
    assert len(snaps) == 1 and snaps[0].last_txid == 0, snaps
    assert len(segs) >= 4, [s.key for s in segs]
    covered = [t for s in segs for t in range(s.first_txid, s.last_txid + 1)]
    assert covered == list(range(1, RUNS * PER_RUN + 1)), [s.key for s in segs]
    ids = rows(db, "SELECT id FROM t ORDER BY id")
    assert ids == list(range(1, RUNS * PER_RUN + 1))
    return Replica(root, gens.pop(), snaps[0], tuple(segs), db, ids, rows(db, "SELECT n FROM t ORDER BY id"))


# ---------------------------------------------------------------------------- helpers


def copy_of(replica: Replica, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(replica.root, dst)
    return dst


def layout(data: bytes) -> tuple[int, int, int]:
    """(header length N, payload offset, payload length) of an artefact's bytes."""
    n = int.from_bytes(data[8:12], "big")
    end = artefact.header_end(data[:PREFIX])
    assert end == PREFIX + n + artefact.CHECKSUM_SIZE
    h = artefact.parse_header_bytes(data)
    assert len(data) == end + h.payload_length
    return n, end, h.payload_length


def flip(path: Path, offset: int, bit: int = 0x10) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= bit
    path.write_bytes(bytes(b))


def with_header(data: bytes, body: bytes) -> bytes:
    """data with its CBOR header replaced by body, under a valid header checksum."""
    _, end, _ = layout(data)
    return b"".join((artefact.MAGIC, len(body).to_bytes(4, "big"), body, xxhash.xxh3_64_intdigest(body).to_bytes(8, "big"), data[end:]))


def header_map(data: bytes) -> dict:
    n, _, _ = layout(data)
    return cbor2.loads(data[PREFIX : PREFIX + n])


def restore(copy: Path, tmp_path: Path, *extra: str):
    out_dir = tmp_path / "out"
    out = out_dir / "restored.db"
    p = cli("restore", *extra, "-o", str(out), f"file://{copy}", timeout=60)
    return p, out


def assert_fails(p, out: Path, *names: str) -> str:
    """The restore failed safely: exit 1, one 'replicator: ' line naming `names`, nothing left."""
    assert "Traceback" not in p.stdout and "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert line.startswith("replicator: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert not out.exists()
    left = sorted(x.name for x in out.parent.iterdir()) if out.parent.exists() else []
    assert left == [], f"left behind: {left}"
    return line


def assert_restored(p, out: Path, replica: Replica, txid: int) -> None:
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stdout and "Traceback" not in p.stderr, p.stderr
    # checked before opening it: SQLite itself makes -wal/-shm files for a WAL database
    assert sorted(x.name for x in out.parent.iterdir()) == [out.name]
    assert integrity(out) == "ok"
    assert rows(out, "SELECT id FROM t ORDER BY id") == replica.ids[:txid]
    assert rows(out, "SELECT n FROM t ORDER BY id") == replica.ns[:txid]


# ---------------------------------------------------------------------------- damage kinds
# Each takes the path of an artefact file and damages it in place.


def flip_payload(path: Path) -> None:
    _, end, plen = layout(path.read_bytes())
    flip(path, end + plen // 2)


def flip_payload_first(path: Path) -> None:
    _, end, _ = layout(path.read_bytes())
    flip(path, end, 0x01)


def flip_payload_last(path: Path) -> None:
    data = path.read_bytes()
    layout(data)
    flip(path, len(data) - 1, 0x80)


def flip_header(path: Path) -> None:
    n, _, _ = layout(path.read_bytes())
    flip(path, PREFIX + n // 2)


def flip_header_checksum(path: Path) -> None:
    _, end, _ = layout(path.read_bytes())
    flip(path, end - 3)


def flip_header_length(path: Path) -> None:
    flip(path, 11, 0x01)  # low byte of the header length


def wrong_magic(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[1:4] = b"XYZ"
    path.write_bytes(bytes(b))


def not_an_artefact(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes(4096))


def trailing_garbage(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\x00junk")


def truncate_to(where: Callable[[bytes], int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        n = where(data)
        assert 0 <= n < len(data)
        path.write_bytes(data[:n])

    return damage


def _n(data: bytes) -> int:
    return layout(data)[0]


def _end(data: bytes) -> int:
    return layout(data)[1]


TRUNCATIONS = {
    "empty": lambda d: 0,
    "in-magic": lambda d: 5,
    "in-length": lambda d: 10,
    "after-prefix": lambda d: PREFIX,
    "in-header": lambda d: PREFIX + _n(d) // 2,
    "in-header-checksum": lambda d: _end(d) - 3,
    "no-payload": lambda d: _end(d),
    "in-payload": lambda d: _end(d) + layout(d)[2] // 2,
    "last-byte": lambda d: len(d) - 1,
}


def garbage_header(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace the CBOR header by make(original bytes), with a valid header checksum."""

    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(with_header(data, make(data)))

    return damage


def _edited(**changes) -> Callable[[bytes], bytes]:
    def make(data: bytes) -> bytes:
        m = header_map(data)
        m.update(changes)
        return cbor2.dumps(m, canonical=True)

    return make


def _shifted_txids(data: bytes) -> bytes:
    """A self-consistent header one txid later than its key says."""
    m = header_map(data)
    a, b = m["txids"]
    m["txids"] = [a + 1, b + 1]
    m["txns"] = [[t[0] + 1, *t[1:]] for t in m["txns"]]
    return cbor2.dumps(m, canonical=True)


def _other_psum(data: bytes) -> bytes:
    m = header_map(data)
    m["psum"] ^= 1
    return cbor2.dumps(m, canonical=True)


def _other_plen(data: bytes) -> bytes:
    m = header_map(data)
    m["plen"] -= 1
    return cbor2.dumps(m, canonical=True)


def _other_db_checksum(data: bytes) -> bytes:
    m = header_map(data)
    m["txns"][-1][4] ^= 1
    return cbor2.dumps(m, canonical=True)


GARBAGE_HEADERS = {
    "invalid-cbor": lambda d: b"\xff\x00garbage\x1c",
    "random-bytes": lambda d: bytes((i * 37 + 11) % 256 for i in range(_n(d))),
    "truncated-cbor": lambda d: d[PREFIX : PREFIX + _n(d) - 1],
    "trailing-cbor": lambda d: d[PREFIX : PREFIX + _n(d)] + b"\x00",
    "not-a-map": lambda d: cbor2.dumps([1, 2, 3]),
    "empty-map": lambda d: cbor2.dumps({}),
    "deep-nesting": lambda d: b"\x81" * 5000 + b"\x00",
    "huge-string": lambda d: b"\x5b" + (1 << 62).to_bytes(8, "big"),
    "future-version": _edited(v=99),
    "unknown-codec": _edited(codec="lz77"),
    "bad-page-size": _edited(psize=1000),
    "other-generation": _edited(gen="20000101T000000000000Z-0000"),
    "wrong-kind": _edited(kind="snapshot"),
    "shifted-txids": _shifted_txids,
    "payload-checksum": _other_psum,
    "payload-length": _other_plen,
}


# ---------------------------------------------------------------------------- segment damage


SEGMENT_DAMAGE = {
    "payload-bit": flip_payload,
    "payload-first-byte": flip_payload_first,
    "payload-last-byte": flip_payload_last,
    "header-bit": flip_header,
    "header-checksum-bit": flip_header_checksum,
    "header-length": flip_header_length,
    "wrong-magic": wrong_magic,
    "not-an-artefact": not_an_artefact,
    "trailing-garbage": trailing_garbage,
    **{f"truncated-{k}": truncate_to(v) for k, v in TRUNCATIONS.items()},
    **{f"cbor-{k}": garbage_header(v) for k, v in GARBAGE_HEADERS.items()},
}


@pytest.mark.parametrize("damage", SEGMENT_DAMAGE.values(), ids=SEGMENT_DAMAGE.keys())
def test_damaged_segment_fails_naming_it(replica, tmp_path, damage):
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    damage(copy / seg.key)
    p, out = restore(copy, tmp_path)
    assert_fails(p, out, seg.key)


@pytest.mark.parametrize("damage", [flip_payload, truncate_to(TRUNCATIONS["in-payload"]), flip_header_checksum, _other_db_checksum],
                         ids=["payload-bit", "truncated", "header-checksum", "recorded-db-checksum"])
def test_damaged_last_segment_fails(replica, tmp_path, damage):
    copy = copy_of(replica, tmp_path)
    seg = replica.segments[-1]
    if damage is _other_db_checksum:
        garbage_header(_other_db_checksum)(copy / seg.key)
        # the header is valid: the mismatch shows only once the database is rebuilt
        p, out = restore(copy, tmp_path)
        assert_fails(p, out, replica.generation, f"txid {replica.last_txid}")
        return
    damage(copy / seg.key)
    p, out = restore(copy, tmp_path)
    assert_fails(p, out, seg.key)


# ---------------------------------------------------------------------------- snapshot damage


SNAPSHOT_DAMAGE = {
    "payload-bit": flip_payload,
    "payload-last-byte": flip_payload_last,
    "header-bit": flip_header,
    "header-checksum-bit": flip_header_checksum,
    "wrong-magic": wrong_magic,
    "truncated-empty": truncate_to(TRUNCATIONS["empty"]),
    "truncated-in-header": truncate_to(TRUNCATIONS["in-header"]),
    "truncated-in-payload": truncate_to(TRUNCATIONS["in-payload"]),
    "cbor-invalid": garbage_header(GARBAGE_HEADERS["invalid-cbor"]),
    "cbor-wrong-kind": garbage_header(_edited(kind="segment")),
    "cbor-payload-checksum": garbage_header(_other_psum),
}


@pytest.mark.parametrize("damage", SNAPSHOT_DAMAGE.values(), ids=SNAPSHOT_DAMAGE.keys())
def test_damaged_snapshot_fails_naming_it(replica, tmp_path, damage):
    copy = copy_of(replica, tmp_path)
    damage(copy / replica.snapshot.key)
    p, out = restore(copy, tmp_path)
    assert_fails(p, out, replica.snapshot.key)
    # every restore point of the generation needs the snapshot
    p, out = restore(copy, tmp_path, "--txid", "5")
    assert_fails(p, out, replica.snapshot.key)


def test_snapshot_deleted_nothing_restorable(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    (copy / replica.snapshot.key).unlink()
    p, out = restore(copy, tmp_path)
    line = assert_fails(p, out, replica.generation)
    assert "snapshot" in line
    p, out = restore(copy, tmp_path, "--txid", "3")
    assert_fails(p, out, replica.generation)


def _forge_snapshot(path: Path, corrupt: Callable[[bytearray, int], None]) -> None:
    """Rewrite the snapshot as a valid artefact (its checksums agree) of a corrupt database."""
    h, body = artefact.decode(path.read_bytes())
    image = bytearray(body)
    corrupt(image, h.page_size)
    path.write_bytes(
        artefact.encode_snapshot(h.generation, h.last_txid, h.page_size, bytes(image), commit_time=h.commit_time, created=h.created)
    )


def _zero_everything(image: bytearray, page_size: int) -> None:
    image[:] = bytes(len(image))


def _garbage_btree_page(image: bytearray, page_size: int) -> None:
    assert len(image) >= 2 * page_size, "the snapshot should hold the schema and table t"
    image[page_size : 2 * page_size] = b"\x0d" + b"\xff" * (page_size - 1)


@pytest.mark.parametrize("corrupt", [_zero_everything, _garbage_btree_page], ids=["not-a-database", "corrupt-btree"])
def test_self_consistent_but_corrupt_snapshot(replica, tmp_path, corrupt):
    """A snapshot whose checksums all agree but whose database is corrupt: restored alone,
    integrity_check catches it (a failed check, never a traceback)."""
    copy = copy_of(replica, tmp_path)
    _forge_snapshot(copy / replica.snapshot.key, corrupt)
    p, out = restore(copy, tmp_path, "--txid", "0")
    line = assert_fails(p, out, replica.snapshot.key)
    assert "integrity" in line
    # Later transactions may rewrite every page the snapshot holds; then the database
    # checksum recorded at the end proves the result right. Either way: never a wrong file.
    p, out = restore(copy, tmp_path)
    if p.returncode == 0:
        assert_restored(p, out, replica, replica.last_txid)
        assert_same_pages(out, replica.source)
    else:
        assert_fails(p, out, replica.generation)


# ---------------------------------------------------------------------------- missing / swapped


def test_missing_segment_in_the_middle(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    (copy / seg.key).unlink()
    p, out = restore(copy, tmp_path)
    lo, hi = seg.first_txid, seg.last_txid
    rng = f"txid {lo}" if lo == hi else f"txids {lo}..{hi}"
    line = assert_fails(p, out, replica.generation, rng)
    assert "missing" in line
    # a point before the hole is still restorable; one inside or after it is not
    p, out = restore(copy, tmp_path, "--txid", str(lo - 1))
    assert_restored(p, out, replica, lo - 1)
    shutil.rmtree(out.parent)
    for target in (lo, hi, replica.last_txid):
        p, out = restore(copy, tmp_path, "--txid", str(target))
        assert_fails(p, out, replica.generation, rng)


def test_missing_first_segment(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    seg = replica.segments[0]
    (copy / seg.key).unlink()
    p, out = restore(copy, tmp_path)
    lo, hi = seg.first_txid, seg.last_txid
    assert_fails(p, out, replica.generation, f"txid {lo}" if lo == hi else f"txids {lo}..{hi}")
    p, out = restore(copy, tmp_path, "--txid", "0")  # the snapshot alone
    assert_restored(p, out, replica, 0)


def test_segment_replaced_by_another_segments_file(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    i = replica.segments.index(seg)
    other = replica.segments[i + 1]
    shutil.copyfile(copy / other.key, copy / seg.key)
    p, out = restore(copy, tmp_path)
    line = assert_fails(p, out, seg.key)
    assert f"txids {other.first_txid}..{other.last_txid}" in line  # what the header really says
    # and by the previous one (the header's txids start before the key's)
    copy2 = tmp_path / "copy2"
    shutil.copytree(replica.root, copy2)
    prev = replica.segments[i - 1]
    shutil.copyfile(copy2 / prev.key, copy2 / seg.key)
    shutil.rmtree(out.parent, ignore_errors=True)
    p, out = restore(copy2, tmp_path)
    assert_fails(p, out, seg.key)


def test_segment_replaced_by_the_snapshot(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    shutil.copyfile(copy / replica.snapshot.key, copy / seg.key)
    p, out = restore(copy, tmp_path)
    assert_fails(p, out, seg.key)


# ---------------------------------------------------------------------------- point in time around damage


@pytest.mark.parametrize(
    "damage",
    [flip_payload, flip_payload_last, truncate_to(TRUNCATIONS["in-header"]), wrong_magic, garbage_header(_shifted_txids)],
    ids=["payload-bit", "payload-last-byte", "truncated", "wrong-magic", "shifted-txids"],
)
def test_point_in_time_before_damage_succeeds_overlapping_fails(replica, tmp_path, damage):
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    lo, hi = seg.first_txid, seg.last_txid
    damage(copy / seg.key)
    # damage after the target does not matter
    for target in (lo - 1, 1):
        p, out = restore(copy, tmp_path, "--txid", str(target))
        assert_restored(p, out, replica, target)
        shutil.rmtree(out.parent)
    # a segment holding the target is verified whole, even where the damage lies past the target
    for target in sorted({lo, (lo + hi) // 2, hi}):
        p, out = restore(copy, tmp_path, "--txid", str(target))
        assert_fails(p, out, seg.key)
    p, out = restore(copy, tmp_path, "--txid", str(replica.last_txid))
    assert_fails(p, out, seg.key)


def test_point_in_time_with_damaged_last_segment(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    last = replica.segments[-1]
    flip_payload(copy / last.key)
    target = last.first_txid - 1
    p, out = restore(copy, tmp_path, "--txid", str(target))
    assert_restored(p, out, replica, target)
    shutil.rmtree(out.parent)
    p, out = restore(copy, tmp_path, "--txid", str(last.first_txid))
    assert_fails(p, out, last.key)


# ---------------------------------------------------------------------------- strays, existing target


def test_stray_files_are_ignored(replica, tmp_path):
    copy = copy_of(replica, tmp_path)
    gen = copy / "generations" / replica.generation
    (copy / "generations" / "notes.txt").write_text("not an artefact\n")
    (copy / "README").write_text("stray at the root\n")
    (gen / "segments" / "garbage").write_bytes(b"\x00\xff garbage")
    (gen / "snapshots" / "garbage.snapshot").write_bytes(b"garbage")
    (gen / "segments" / "0000000000000001-0000000000000002.segment").write_bytes(b"no time: not a key")
    (gen / "notes.txt").write_text("stray in the generation\n")
    (copy / "generations" / "not-a-generation" / "snapshots").mkdir(parents=True)
    (copy / "generations" / "not-a-generation" / "snapshots" / "0000000000000000.1.snapshot").write_bytes(b"junk")
    p, out = restore(copy, tmp_path)
    assert_restored(p, out, replica, replica.last_txid)
    assert_same_pages(out, replica.source)
    shutil.rmtree(out.parent)
    p, out = restore(copy, tmp_path, "--txid", "17")
    assert_restored(p, out, replica, 17)


def test_pristine_copy_restores(replica, tmp_path):
    """The control: the undamaged replica restores to the source, page for page."""
    copy = copy_of(replica, tmp_path)
    p, out = restore(copy, tmp_path)
    assert_restored(p, out, replica, replica.last_txid)
    assert_same_pages(out, replica.source)


def test_force_over_existing_file_with_damaged_replica_keeps_it(replica, tmp_path):
    """--force replaces the target only after a verified restore: a damaged replica leaves
    the existing database (and its -wal) untouched."""
    copy = copy_of(replica, tmp_path)
    seg = replica.middle
    flip_payload(copy / seg.key)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "restored.db"
    out.write_bytes(b"precious")
    Path(f"{out}-wal").write_bytes(b"precious wal")
    p = cli("restore", "--force", "-o", str(out), f"file://{copy}", timeout=60)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replicator: ") and seg.key in lines[0], p.stderr
    assert out.read_bytes() == b"precious"
    assert Path(f"{out}-wal").read_bytes() == b"precious wal"
    assert sorted(x.name for x in out_dir.iterdir()) == ["restored.db", "restored.db-wal"]
    # without --force the existing file is refused before anything is fetched
    p = cli("restore", "-o", str(out), f"file://{copy}", timeout=60)
    assert p.returncode != 0 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert out.read_bytes() == b"precious"
