"""The artefact codec: exact layout, round trips, bounded memory, and every corruption class."""

from __future__ import annotations

import io
import os
import random
import tracemalloc

import cbor2
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import artefact as A
from replicator.artefact import ArtefactError

GEN = "20261122T171656939519Z-ea5f"
PAGE_SIZES = [512, 1024, 4096, 65536]
CODECS = ["zstd", "zstd-frames", "none"]


def make_page(rng: random.Random, page_size: int) -> bytes:
    """Half structured (compressible), half random, like a real b-tree page."""
    half = page_size // 2
    text = (b"row %d alpha beta gamma " % rng.randrange(1000)) * (half // 16 + 1)
    return text[:half] + rng.randbytes(page_size - half)


def make_image(pages: int, page_size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return b"".join(make_page(rng, page_size) for _ in range(pages))


def make_txns(page_size: int, seed: int = 2, count: int = 4) -> list[tuple]:
    """(txid, db_pages, commit_time, db_checksum, pages) tuples for encode_segment."""
    rng = random.Random(seed)
    txns = []
    for i in range(count):
        pgnos = sorted(rng.sample(range(1, 40), rng.randrange(1, 8)))
        pages = [(p, make_page(rng, page_size)) for p in pgnos]
        txns.append((100 + i, 40 + i, 1_700_000_000.25 + i, rng.getrandbits(64), pages))
    return txns


def expected_segment_body(txns: list[tuple]) -> bytes:
    return b"".join(p.to_bytes(4, "big") + data for t in txns for p, data in t[4])


def frame(header_bytes: bytes, payload: bytes) -> bytes:
    """An artefact around arbitrary header bytes, with a correct header checksum."""
    return A.MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes + xxhash.xxh3_64_digest(header_bytes) + payload


def split(art: bytes) -> tuple[dict, bytes]:
    end = A.header_end(art)
    return cbor2.loads(art[A.PREFIX_SIZE : end - 8]), art[end:]


def rebuild(art: bytes, mutate=None, payload: bytes | None = None) -> bytes:
    m, old_payload = split(art)
    if mutate:
        mutate(m)
    return frame(cbor2.dumps(m, canonical=True), old_payload if payload is None else payload)


def stream_decode(art: bytes) -> tuple[A.ArtefactHeader, bytes]:
    """Decode through the streaming API (read_header + iter_body / iter_segment_pages)."""
    f = io.BytesIO(art)
    h = A.read_header(f)
    if h.kind == A.SEGMENT:
        body = b"".join(p.to_bytes(4, "big") + bytes(mv) for _, p, mv in A.iter_segment_pages(f, h))
    else:
        body = b"".join(A.iter_body(f, h, chunk_size=7777))
    return h, body


def parallel_decode(art: bytes, workers: int = 3) -> tuple[A.ArtefactHeader, bytes]:
    """Decode through decode_body_into (a restore's path for snapshots): pieces written at
    their offsets, from several threads for zstd-frames."""
    f = io.BytesIO(art)
    h = A.read_header(f)
    out = bytearray()

    def write_at(off: int, data) -> None:
        end = off + len(data)
        if len(out) < end:
            out.extend(bytes(end - len(out)))
        out[off:end] = data

    A.decode_body_into(f, h, write_at, workers=workers)
    if h.kind == A.SEGMENT:  # the structure of a segment body is checked by the other paths
        A.decode(art)
    return h, bytes(out)


# ---------------------------------------------------------------------------- layout and round trips


def test_exact_byte_layout():
    image = make_image(3, 512)
    art = A.encode_snapshot(GEN, 7, 512, image, commit_time=12.5, codec="none", created=99.0)
    assert art[:8] == b"\x89RPL\r\n\x1a\n" == A.MAGIC
    n = int.from_bytes(art[8:12], "big")
    header_bytes = art[12 : 12 + n]
    assert int.from_bytes(art[12 + n : 20 + n], "big") == xxhash.xxh3_64_intdigest(header_bytes)
    payload = art[20 + n :]
    assert payload == image  # codec none: the body as is, nothing after it
    m = cbor2.loads(header_bytes)
    assert cbor2.dumps(m, canonical=True) == header_bytes
    checksum = A.db_checksum_of_image(image, 512)
    assert m == {
        "v": 1,
        "kind": "snapshot",
        "gen": GEN,
        "txids": [7, 7],
        "psize": 512,
        "codec": "none",
        "level": 0,
        "created": 99.0,
        "plen": len(image),
        "psum": xxhash.xxh3_64_intdigest(payload),
        "rlen": len(image),
        "txns": [[7, 3, 3, 12.5, checksum]],
    }


def test_segment_body_layout_is_pgno_then_page():
    txns = make_txns(1024)
    art = A.encode_segment(GEN, 1024, txns, codec="none")
    h, payload = split(art)
    assert payload == expected_segment_body(txns)
    assert h["txns"] == [[t[0], len(t[4]), t[1], t[2], t[3]] for t in txns]
    assert h["rlen"] == sum(len(t[4]) for t in txns) * (4 + 1024)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_snapshot_round_trip(codec, page_size):
    pages = 1 + (300_000 // page_size)
    image = make_image(pages, page_size)
    w = A.SnapshotWriter(GEN, 5, page_size, codec=codec)
    # uneven whole-page writes
    off = 0
    for n in (1, 3, 2, pages):
        w.write(image[off : off + n * page_size])
        off = min(len(image), off + n * page_size)
    assert w.pages_written == pages
    with w.finish(db_pages=pages, commit_time=1234.5, db_checksum=A.db_checksum_of_image(image, page_size)) as art:
        data = art.to_bytes()
        assert art.size == len(data)
    for h, body in (A.decode(data), stream_decode(data)):
        assert body == image
        assert (h.kind, h.generation, h.first_txid, h.last_txid, h.page_size) == ("snapshot", GEN, 5, 5, page_size)
        assert h.codec == codec and h.level == (0 if codec == "none" else 3)
        assert h.db_pages == pages and h.commit_time == 1234.5
        assert h.db_checksum == A.db_checksum_of_image(image, page_size)
        assert h.txns == (A.TxnInfo(5, pages, pages, 1234.5, h.db_checksum),)
        assert h.raw_length == len(image) and h.payload_length == len(data) - A.header_end(data)
    assert parallel_decode(data)[1] == image
    if codec != "none":
        assert len(data) < len(image)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_segment_round_trip(codec, page_size):
    txns = make_txns(page_size, count=5)
    art = A.encode_segment(GEN, page_size, txns, codec=codec, created=5.0)
    h, body = A.decode(art)
    assert body == expected_segment_body(txns)
    assert (h.kind, h.first_txid, h.last_txid, h.created) == ("segment", 100, 104, 5.0)
    assert h.txns == tuple(A.TxnInfo(t[0], len(t[4]), t[1], t[2], t[3]) for t in txns)
    assert h.db_checksum == txns[-1][3] and h.db_pages == txns[-1][1] and h.commit_time == txns[-1][2]
    assert h.txn(102) == h.txns[2]
    with pytest.raises(KeyError):
        h.txn(105)
    f = io.BytesIO(art)
    h2 = A.read_header(f)
    assert h2 == h
    got = [(t.txid, p, bytes(mv)) for t, p, mv in A.iter_segment_pages(f, h2)]
    assert got == [(t[0], p, d) for t in txns for p, d in t[4]]


def test_encode_segment_accepts_txninfo_and_six_tuples():
    txns = make_txns(512, count=2)
    five = A.encode_segment(GEN, 512, txns, created=1.0)
    six = A.encode_segment(GEN, 512, [(t[0], len(t[4]), *t[1:]) for t in txns], created=1.0)
    info = A.encode_segment(GEN, 512, [(A.TxnInfo(t[0], len(t[4]), t[1], t[2], t[3]), t[4]) for t in txns], created=1.0)
    assert five == six == info
    with pytest.raises(ValueError):
        A.encode_segment(GEN, 512, [(t[0], 99, *t[1:]) for t in txns])


def test_header_encode_is_canonical_and_round_trips():
    art = A.encode_segment(GEN, 4096, make_txns(4096))
    h = A.parse_header_bytes(art)
    assert h.encode() == art[: A.header_end(art)]


def test_parse_header_bytes_for_range_reads():
    art = A.encode_segment(GEN, 4096, make_txns(4096))
    end = A.header_end(art[: A.PREFIX_SIZE])
    assert A.parse_header_bytes(art[:end]) == A.parse_header_bytes(art[: end + 100]) == A.parse_header_bytes(art)
    with pytest.raises(ArtefactError, match=r"^truncated: header has \d+ of \d+ bytes$"):
        A.parse_header_bytes(art[: end - 1])
    with pytest.raises(ArtefactError, match=r"^truncated: prefix has 5 of 12 bytes$"):
        A.header_end(art[:5])


def test_empty_segment_rejected():
    w = A.SegmentWriter(GEN, 4096)
    with pytest.raises(ValueError, match="empty segment"):
        w.finish()
    w.close()
    with pytest.raises(ValueError):
        A.encode_segment(GEN, 4096, [])
    # and a reader refuses a header without txns
    art = A.encode_segment(GEN, 4096, make_txns(4096, count=1))
    with pytest.raises(ArtefactError, match="^header field 'txns' missing or malformed$"):
        A.decode(rebuild(art, lambda m: m.update(txns=[])))


@pytest.mark.parametrize("codec", CODECS)
def test_zero_page_snapshot(codec):
    art = A.encode_snapshot(GEN, 0, 4096, b"", commit_time=1.0, db_checksum=0, codec=codec)
    h, body = A.decode(art)
    assert body == b"" and h.db_pages == 0 and h.db_checksum == 0 and h.raw_length == 0
    assert stream_decode(art) == (h, b"")


def test_zero_page_transaction_in_segment():
    txns = [(1, 2, 1.0, 11, [(1, b"a" * 512)]), (2, 2, 2.0, 11, []), (3, 2, 3.0, 12, [(2, b"b" * 512)])]
    h, body = stream_decode(A.encode_segment(GEN, 512, txns))
    assert [t.page_count for t in h.txns] == [1, 0, 1]
    assert body == expected_segment_body(txns)


def test_snapshot_writer_checks_pages_and_checksum():
    image = make_image(4, 1024)
    w = A.SnapshotWriter(GEN, 1, 1024)
    with pytest.raises(ValueError):
        w.write(image[:1000])  # not whole pages
    w.write(image)
    assert w.db_checksum == A.db_checksum_of_image(image, 1024)
    with pytest.raises(ValueError, match="db_pages"):
        w.finish(db_pages=5, commit_time=1.0)
    with pytest.raises(ValueError, match="db_checksum"):
        w.finish(db_pages=4, commit_time=1.0, db_checksum=w.db_checksum ^ 1)
    with w.finish(db_pages=4, commit_time=1.0) as art:  # checksum defaults to the computed one
        assert art.header.db_checksum == A.db_checksum_of_image(image, 1024)
    with pytest.raises(ValueError):
        w.write(image)  # finished


@pytest.mark.parametrize(
    "pages",
    [
        [(2, b"x" * 512), (1, b"x" * 512)],  # unsorted
        [(1, b"x" * 512), (1, b"x" * 512)],  # duplicate
        [(0, b"x" * 512)],  # page 0
        [(2**32 - 1, b"x" * 512)],  # past SQLite's largest page number
        [(1, b"x" * 511)],  # short page
        [(1, memoryview(b"x" * 1024))],  # long page
        [("1", b"x" * 512)],
    ],
)
def test_segment_writer_rejects_bad_pages_and_fails(pages):
    w = A.SegmentWriter(GEN, 512)
    w.add_txn(1, [(1, b"y" * 512)], db_pages=1, commit_time=1.0, db_checksum=0)
    with pytest.raises(ValueError):
        w.add_txn(2, pages, db_pages=3, commit_time=2.0, db_checksum=0)
    with pytest.raises(ValueError, match="failed"):
        w.finish()  # a half-added transaction poisons the writer
    w.close()


def test_segment_writer_checks_txids_and_positions():
    w = A.SegmentWriter(GEN, 512)
    w.add_txn(10, [(1, bytes(512))], db_pages=1, commit_time=1.0, db_checksum=0)
    for txid in (10, 12, 9):
        with pytest.raises(ValueError, match="does not follow"):
            w.add_txn(txid, [], db_pages=1, commit_time=1.0, db_checksum=0)
    for kw in ({"db_pages": -1}, {"commit_time": float("nan")}, {"db_checksum": 2**64}):
        args = {"db_pages": 1, "commit_time": 1.0, "db_checksum": 0, **kw}
        with pytest.raises(ValueError):
            w.add_txn(11, [], **args)
    w.add_txn(11, [], db_pages=1, commit_time=1.0, db_checksum=0)
    with w.finish() as art:
        assert (art.header.first_txid, art.header.last_txid) == (10, 11)


@pytest.mark.parametrize("kwargs", [{"page_size": 1000}, {"page_size": 256}, {"page_size": 131072}, {"codec": "lz4"}])
def test_writer_rejects_bad_parameters(kwargs):
    args = {"page_size": 4096, **kwargs}
    with pytest.raises(ValueError):
        A.SegmentWriter(GEN, args.pop("page_size"), **args)


# ---------------------------------------------------------------------------- spooling and streams


def test_spool_spills_to_disk_and_temp_file_is_removed(tmp_path):
    rng = random.Random(3)
    w = A.SegmentWriter(GEN, 4096, codec="none", spool_dir=tmp_path, spool_memory=64 << 10)
    expected = []
    for txid in range(1, 6):
        pages = [(p, rng.randbytes(4096)) for p in range(1, 11)]
        expected.append((txid, 20, float(txid), 0, pages))
        w.add_txn(txid, pages, db_pages=20, commit_time=txid, db_checksum=0)
    art = w.finish()
    assert art.spilled
    fd = art._spool._file.fileno()
    # the spool is a real file in spool_dir (unlinked at once, so a crash leaves nothing behind)
    assert os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
    assert os.fstat(fd).st_size == art.header.payload_length > 64 << 10
    whole = art.to_bytes()
    assert len(whole) == art.size
    h, body = A.decode(whole)
    assert body == expected_segment_body(expected)
    out = tmp_path / "copy.segment"
    with open(out, "wb") as f:
        art.write_to(f)
    assert out.read_bytes() == whole
    with art.open() as s:
        assert s.read() == whole
        s.seek(art.size - 10)
        assert s.read() == whole[-10:]
        s.seek(3)
        assert s.read(20) == whole[3:23]
    art.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the temp file is gone
    assert sorted(os.listdir(tmp_path)) == ["copy.segment"]


def test_small_artefact_stays_in_memory(tmp_path):
    w = A.SegmentWriter(GEN, 512, spool_dir=tmp_path)
    w.add_txn(0, [(1, bytes(512))], db_pages=1, commit_time=0.0, db_checksum=0)
    with w.finish() as art:
        assert not art.spilled
        with art.open() as s:
            assert A.decode(s.read())[0] == art.header
    assert os.listdir(tmp_path) == []


def test_abandoned_writer_releases_spool(tmp_path):
    w = A.SnapshotWriter(GEN, 0, 4096, codec="none", spool_dir=tmp_path, spool_memory=4096)
    w.write(bytes(4096 * 4))
    fd = w._spool._file.fileno()
    w.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_large_snapshot_streams_in_bounded_memory(tmp_path):
    page_size, chunk_pages = 4096, 256
    total_pages = (64 << 20) // page_size
    rng = random.Random(9)
    path = tmp_path / "big.snapshot"
    tracemalloc.start()
    try:
        w = A.SnapshotWriter(GEN, 1, page_size, spool_dir=tmp_path)
        checksum = 0
        for first in range(1, total_pages + 1, chunk_pages):
            chunk = b"".join(make_page(rng, page_size) for _ in range(chunk_pages))
            checksum ^= A.db_checksum_of_image(chunk, page_size, first_page=first)
            w.write(chunk)
        with w.finish(db_pages=total_pages, commit_time=1.0, db_checksum=checksum) as art:
            assert art.spilled
            with open(path, "wb") as f:
                art.write_to(f)
        with open(path, "rb") as f:
            h = A.read_header(f)
            got, n, pgno = 0, 0, 1
            for chunk in A.iter_body(f, h):
                got ^= A.db_checksum_of_image(chunk, page_size, first_page=pgno)
                pgno += len(chunk) // page_size
                n += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 64 << 20 and got == checksum == h.db_checksum
    assert peak < 24 << 20, f"peak {peak} bytes for a 64 MiB snapshot"


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_large_framed_snapshot_decodes_in_parallel_in_bounded_memory(tmp_path, workers):
    page_size = 4096
    image = make_image(8 << 20 >> 12, page_size, seed=11)  # 8 MiB
    data = A.encode_snapshot(GEN, 1, page_size, image, commit_time=1.0, frame_size=256 << 10)
    assert len(A.parse_header_bytes(data).frames) == 32
    out = tmp_path / "out.db"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    tracemalloc.start()
    try:
        f = io.BytesIO(data)
        h = A.read_header(f)
        A.decode_body_into(f, h, lambda off, piece: os.pwrite(fd, piece, off), workers=workers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert out.read_bytes() == image
    # at most workers + 1 frames in flight (their stored bytes and their output)
    assert peak < (workers + 2) * 2 * (256 << 10) + (1 << 20), f"peak {peak} bytes"


# ---------------------------------------------------------------------------- zstd-frames


@pytest.mark.parametrize("frame_size", [4096 * 3, 5000, 1 << 20])
def test_framed_snapshot_layout(frame_size):
    """Each frame is an ordinary zstd frame that records its size and decodes on its own to
    its slice of the body; the header lists their stored lengths."""
    image = make_image(20, 4096)
    art = A.encode_snapshot(GEN, 3, 4096, image, commit_time=3.0, frame_size=frame_size)
    m, payload = split(art)
    assert m["codec"] == "zstd-frames" and m["fsize"] == frame_size
    assert len(m["frames"]) == -(-len(image) // frame_size) and sum(m["frames"]) == len(payload) == m["plen"]
    off = 0
    for i, n in enumerate(m["frames"]):
        piece = payload[off : off + n]
        want = image[i * frame_size : (i + 1) * frame_size]
        assert zstandard.frame_content_size(piece) == len(want)
        assert zstandard.ZstdDecompressor().decompress(piece) == want
        off += n
    for decoded in (A.decode(art), stream_decode(art), parallel_decode(art, 2), parallel_decode(art, 1)):
        assert decoded[1] == image
        assert decoded[0].frames == tuple(m["frames"]) and decoded[0].frame_size == frame_size


def test_framed_snapshot_writes_in_any_pieces():
    """Writes that straddle frame boundaries give the same artefact as one write."""
    image = make_image(30, 1024)
    one = A.encode_snapshot(GEN, 3, 1024, image, commit_time=3.0, frame_size=7 * 1024, created=1.0)
    w = A.SnapshotWriter(GEN, 3, 1024, frame_size=7 * 1024)
    off = 0
    for n in (1, 9, 2, 7, 3, 8):
        w.write(image[off : off + n * 1024])
        off += n * 1024
    with w.finish(db_pages=30, commit_time=3.0, created=1.0) as art:
        assert art.to_bytes() == one


def test_framed_snapshot_encrypted_round_trip():
    from replicator.encryption import EncryptionKey

    key = EncryptionKey(bytes(range(32)))
    image = make_image(40, 4096)
    art = A.encode_snapshot(GEN, 3, 4096, image, commit_time=3.0, frame_size=4096 * 6, encryption_key=key, encryption_chunk=10_000)
    h = A.parse_header_bytes(art)
    assert h.format_version == 2 and h.codec == "zstd-frames" and len(h.frames) == 7
    assert A.decode(art, encryption_key=key)[1] == image
    f = io.BytesIO(art)
    h = A.read_header(f)
    out = bytearray(len(image))

    def write_at(off, data):
        out[off : off + len(data)] = data

    A.decode_body_into(f, h, write_at, workers=3, encryption_key=key)
    assert out == image
    # the frame list is bound into the last chunk: a header that moves it is tampering
    forged = _with_payload(art, split(art)[1], frames=[h.frames[1], h.frames[0], *h.frames[2:]])
    for fn in (lambda a: A.decode(a, encryption_key=key),):
        with pytest.raises(ArtefactError, match="authentication failed"):
            fn(forged)
    with pytest.raises(ArtefactError, match="authentication failed"):
        f = io.BytesIO(forged)
        A.decode_body_into(f, A.read_header(f), write_at, workers=3, encryption_key=key)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda m: m.update(frames=m["frames"][:-1]), "header field 'frames' inconsistent: 3 frames"),
        (lambda m: m.update(frames=[*m["frames"], 5]), "header field 'frames' inconsistent: 5 frames"),
        (lambda m: m["frames"].__setitem__(0, m["frames"][0] + 1), "header field 'frames' inconsistent: the frames do not add up"),
        (lambda m: m["frames"].__setitem__(0, 0), "header field 'frames' missing or malformed"),
        (lambda m: m.update(frames="x"), "header field 'frames' missing or malformed"),
        (lambda m: m.pop("frames"), "header field 'frames' missing or malformed"),
        (lambda m: m.pop("fsize"), "header field 'fsize' missing or malformed"),
        (lambda m: m.update(fsize=0), "header field 'fsize' missing or malformed"),
        (lambda m: m.update(fsize=A.MAX_FRAME_SIZE + 1), "header field 'fsize' missing or malformed"),
        (lambda m: m.update(fsize=4096 * 2), "header field 'frames' inconsistent: 4 frames of 8192 bytes"),
        # a frame longer than zstd can make of fsize bytes (plen kept consistent)
        (lambda m: m.update(frames=[A.max_frame_length(m["fsize"]) + 1, *m["frames"][1:]],
                            plen=A.max_frame_length(m["fsize"]) + 1 + sum(m["frames"][1:])),
         "header field 'frames' inconsistent: a frame longer than"),
    ],
)
def test_framed_header_inconsistent(samples, mutate, message):
    both_paths_raise(rebuild(samples["snapshot-frames"], mutate), message)


def test_framed_payload_damage_with_honest_checksum(samples):
    art = samples["snapshot-frames"]
    m, payload = split(art)
    n = m["frames"]
    frames, off = [], 0
    for size in n:
        frames.append(payload[off : off + size])
        off += size
    # the last frame (2 pages) where the first (6) should be, lengths and checksum honest
    swapped = [frames[-1], *frames[1:-1], frames[0]]
    both_paths_raise(
        _with_payload(art, b"".join(swapped), frames=[len(x) for x in swapped]),
        "corrupt zstd payload (a frame does not decode to its size)",
    )
    # a frame with bytes after it, within its length
    padded = [frames[0] + b"\0\0", *frames[1:]]
    both_paths_raise(_with_payload(art, b"".join(padded), frames=[len(x) for x in padded]), "corrupt zstd payload")
    # a streamed frame (no recorded size) of the right content
    image = make_image(20, 4096)
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(image[: 6 * 4096]) + cobj.flush()
    assert zstandard.frame_content_size(streamed) == -1
    other = [streamed, *frames[1:]]
    both_paths_raise(
        _with_payload(art, b"".join(other), frames=[len(x) for x in other]),
        "corrupt zstd payload (a frame does not decode to its size)",
    )
    # garbage in a frame
    junk = [frames[0], b"x" * len(frames[1]), *frames[2:]]
    both_paths_raise(_with_payload(art, b"".join(junk)), "corrupt zstd payload")


def test_decode_body_into_raises_the_writers_error(samples):
    art = A.encode_snapshot(GEN, 3, 4096, make_image(40, 4096), commit_time=3.0, frame_size=4096)
    calls = []

    def write_at(off, data):
        calls.append(off)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")

    f = io.BytesIO(art)
    with pytest.raises(OSError, match="No space left"):
        A.decode_body_into(f, A.read_header(f), write_at, workers=2)
    assert len(calls) < 40  # it stopped


# ---------------------------------------------------------------------------- checksums


def test_page_hash_and_db_checksum_definition():
    image = make_image(5, 512)
    naive = 0
    for p in range(1, 6):
        naive ^= xxhash.xxh3_64_intdigest(image[(p - 1) * 512 : p * 512], seed=p)
    assert A.db_checksum_of_image(image, 512) == naive
    assert A.page_hash(3, image[1024:1536]) == xxhash.xxh3_64(image[1024:1536], seed=3).intdigest()
    assert A.db_checksum_of_image(b"", 4096) == 0
    # pieces XOR together; updating one page is two XORs
    assert A.db_checksum_of_image(image[:1024], 512) ^ A.db_checksum_of_image(image[1024:], 512, first_page=3) == naive
    new_page = b"z" * 512
    updated = image[:512] + new_page + image[1024:]
    assert A.db_checksum_of_image(updated, 512) == naive ^ A.page_hash(2, image[512:1024]) ^ A.page_hash(2, new_page)
    with pytest.raises(ValueError):
        A.db_checksum_of_image(b"x" * 100, 512)


def test_verify_key():
    art = A.encode_segment(GEN, 4096, make_txns(4096))
    h = A.parse_header_bytes(art)
    A.verify_key(h, f"generations/{GEN}/segments/{100:016x}-{103:016x}.1700000003250.segment")
    with pytest.raises(ArtefactError, match="does not match its key"):
        A.verify_key(h, f"generations/{GEN}/segments/{100:016x}-{104:016x}.1.segment")
    with pytest.raises(ArtefactError, match="does not match its key"):
        A.verify_key(h, f"generations/{GEN}/snapshots/{103:016x}.1.snapshot")


# ---------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    return {
        "segment-zstd": A.encode_segment(GEN, 1024, make_txns(1024, count=6)),
        "segment-none": A.encode_segment(GEN, 512, make_txns(512, count=3), codec="none"),
        "snapshot-zstd": A.encode_snapshot(GEN, 3, 4096, make_image(20, 4096), commit_time=3.0, codec="zstd"),
        "snapshot-none": A.encode_snapshot(GEN, 3, 512, make_image(10, 512), commit_time=3.0, codec="none"),
        # zstd-frames, as snapshots are written: 20 pages in frames of 6 pages (the last 2)
        "snapshot-frames": A.encode_snapshot(GEN, 3, 4096, make_image(20, 4096), commit_time=3.0, frame_size=6 * 4096),
    }


def both_paths_raise(art: bytes, match: str | None = None) -> list[str]:
    """Decode with the buffer and the streaming API; both must raise ArtefactError (never another type)."""
    messages = []
    for fn in (A.decode, stream_decode, parallel_decode):
        with pytest.raises(ArtefactError) as e:
            fn(art)
        msg = str(e.value)
        assert "\n" not in msg
        if match is not None:
            assert msg == match or msg.startswith(match), (fn.__name__, msg)
        messages.append(msg)
    return messages


@pytest.mark.parametrize("name", ["segment-zstd", "segment-none", "snapshot-zstd", "snapshot-none", "snapshot-frames"])
def test_every_flipped_bit_is_detected(samples, name):
    art = samples[name]
    end = A.header_end(art)
    rng = random.Random(name)
    regions = {
        "magic": range(0, 8),
        "length": range(8, 12),
        "header": range(12, end - 8),
        "hsum": range(end - 8, end),
        "payload": range(end, len(art)),
    }
    positions = [(r, p) for r in ("magic", "length", "hsum") for p in regions[r]]
    positions += [("header", p) for p in rng.sample(regions["header"], min(60, len(regions["header"])))]
    positions += [("payload", p) for p in rng.sample(regions["payload"], 200 - len(positions))]
    for region, pos in positions:
        bad = bytearray(art)
        bad[pos] ^= 1 << rng.randrange(8)
        msgs = both_paths_raise(bytes(bad))
        expected = {
            "magic": "not a replicator artefact (bad magic)",
            "header": "header checksum mismatch",
            "hsum": "header checksum mismatch",
            "payload": "payload checksum mismatch",
        }.get(region)
        if expected:
            assert msgs == [expected] * 3, (region, pos, msgs)


@pytest.mark.parametrize("name", ["segment-zstd", "snapshot-none", "snapshot-frames"])
def test_every_truncation_is_detected(samples, name):
    art = samples[name]
    end = A.header_end(art)
    lengths = set(range(0, end + 3)) | set(random.Random(4).sample(range(end, len(art)), 100)) | {len(art) - 1}
    for n in sorted(lengths):
        msgs = both_paths_raise(art[:n], "truncated: ")
        if n >= end:
            want = f"truncated: payload has {n - end} of {len(art) - end} bytes"
            assert msgs == [want] * 3


def test_wrong_magic(samples):
    for bad in (b"SQLite format 3\x00" + bytes(100), b"\x89PNG\r\n\x1a\n" + samples["segment-zstd"][8:], b"x"):
        both_paths_raise(bad, "not a replicator artefact (bad magic)")


def test_header_length_out_of_range(samples):
    art = samples["segment-zstd"]
    for n in (0, (64 << 20) + 1, 2**32 - 1):
        both_paths_raise(art[:8] + n.to_bytes(4, "big") + art[12:], f"header length {n} out of range")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff",  # break outside an indefinite container
        b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # byte string claiming 2**64 bytes
        b"\x9f" * 1000,  # deep nesting
        b"\xa1\x61v\x01\x00",  # a valid map followed by junk
        b"\xa1\x62\xff\xfe\x01",  # invalid UTF-8 key
        b"\xc1\x1b\xff\xff\xff\xff\xff\xff\xff\xff",  # absurd epoch datetime
        b"\xd8\x1e\x82\x01\x00",  # fraction with zero denominator
        b"\x1c",  # reserved additional info
    ],
)
def test_garbage_cbor_with_valid_checksum(samples, garbage):
    _, payload = split(samples["segment-zstd"])
    both_paths_raise(frame(garbage, payload), "header is not valid CBOR")


def test_header_that_is_not_a_map(samples):
    _, payload = split(samples["segment-zstd"])
    both_paths_raise(frame(cbor2.dumps([1, 2, 3]), payload), "header is not a CBOR map")


WRONG_TYPES = [
    ("v", "1"),
    ("v", 1.0),
    ("v", True),
    ("v", 0),
    ("kind", "journal"),
    ("kind", 1),
    ("gen", b"gen"),
    ("gen", ""),
    ("txids", [100]),
    ("txids", [100, "103"]),
    ("txids", [103, 100]),
    ("txids", [-1, 103]),
    ("psize", 1000),
    ("psize", 256),
    ("psize", "1024"),
    ("psize", 2**17),
    ("codec", 7),
    ("level", "3"),
    ("created", "now"),
    ("created", float("inf")),
    ("created", 10**309),  # past a float's range (found by test_fuzz_rechecksummed_headers)
    ("plen", -1),
    ("plen", 1.5),
    ("psum", 2**64),
    ("psum", None),
    ("rlen", "x"),
    ("txns", {"a": 1}),
    ("txns", [[100, 1, 2, 3.0]]),
    ("txns", "[]"),
]


@pytest.mark.parametrize("field,value", WRONG_TYPES)
def test_header_with_wrong_field_types(samples, field, value):
    art = rebuild(samples["segment-zstd"], lambda m: m.update({field: value}))
    both_paths_raise(art, f"header field '{field}' ")


@pytest.mark.parametrize("field", ["v", "kind", "gen", "txids", "psize", "codec", "level", "created", "plen", "psum", "rlen", "txns"])
def test_header_with_missing_field(samples, field):
    art = rebuild(samples["segment-zstd"], lambda m: m.pop(field))
    both_paths_raise(art, f"header field '{field}' missing or malformed")


def test_malformed_txn_entries(samples):
    def bad_entry(i, value):
        def mutate(m):
            m["txns"][1][i] = value

        return mutate

    art = samples["segment-zstd"]
    for i, value in [(0, "x"), (1, -1), (2, 2**32), (3, None), (4, -5), (4, 1.0)]:
        both_paths_raise(rebuild(art, bad_entry(i, value)), "header field 'txns' ")


def test_inconsistent_header(samples):
    art = samples["segment-zstd"]

    def gap(m):
        m["txns"][2][0] += 1

    both_paths_raise(rebuild(art, gap), "header field 'txns' inconsistent")
    both_paths_raise(rebuild(art, lambda m: m["txids"].__setitem__(1, 200)), "header field 'txns' inconsistent")
    both_paths_raise(rebuild(art, lambda m: m.update(rlen=m["rlen"] + 1)), "header field 'rlen' inconsistent")
    snap = samples["snapshot-zstd"]
    both_paths_raise(rebuild(snap, lambda m: m["txns"].append(m["txns"][0])), "header field 'txns' inconsistent")
    both_paths_raise(rebuild(snap, lambda m: m["txns"][0].__setitem__(1, 3)), "header field 'txns' inconsistent")
    both_paths_raise(rebuild(samples["snapshot-none"], lambda m: m.update(plen=5)), "header field 'plen' inconsistent")


@pytest.mark.parametrize("version", [3, 7])
def test_newer_format_version_is_rejected(samples, version):
    art = rebuild(samples["segment-zstd"], lambda m: m.update(v=version, kind="something-new"))
    both_paths_raise(art, f"unsupported format version {version} (this replicator reads 2)")


def test_version_2_needs_enc_and_version_1_refuses_it(samples):
    # version 2 is the encrypted format: its `enc` key is required (tests/test_encryption.py)
    both_paths_raise(rebuild(samples["segment-zstd"], lambda m: m.update(v=2)), "header field 'enc' missing or malformed")
    enc = {"alg": "A256GCM", "kid": "00" * 8, "nonce": bytes(12), "chunk": 1 << 20}
    both_paths_raise(rebuild(samples["segment-zstd"], lambda m: m.update(enc=enc)), "header field 'enc' needs format version 2")


def test_unknown_codec(samples):
    both_paths_raise(rebuild(samples["segment-zstd"], lambda m: m.update(codec="lz4")), "unsupported codec 'lz4'")


def test_unknown_header_keys_are_ignored(samples):
    art = samples["segment-zstd"]
    extended = rebuild(art, lambda m: m.update(future={"x": [1, 2]}, zz=b"\x00"))
    assert A.decode(extended) == A.decode(art)
    assert stream_decode(extended) == stream_decode(art)


def test_trailing_bytes(samples):
    for art in samples.values():
        both_paths_raise(art + b"\x00", "trailing data after payload")


def test_payload_replaced_by_other_valid_zstd(samples):
    art = samples["snapshot-zstd"]
    m, _ = split(art)
    other = zstandard.ZstdCompressor(level=3).compress(make_image(20, 4096, seed=77))
    both_paths_raise(rebuild(art, lambda m: m.update(plen=len(other)), payload=other), "payload checksum mismatch")
    # same payload length, different bytes
    _, payload = split(art)
    same_len = zstandard.ZstdCompressor(level=3).compress(bytes(len(payload)))
    same_len = (same_len + bytes(len(payload)))[: len(payload)]
    both_paths_raise(rebuild(art, payload=same_len), "payload checksum mismatch")


def _with_payload(art: bytes, payload: bytes, **fields) -> bytes:
    """Replace the payload and make plen/psum honest, so only deeper checks can object."""

    def mutate(m):
        m.update(plen=len(payload), psum=xxhash.xxh3_64_intdigest(payload), **fields)

    return rebuild(art, mutate, payload=payload)


def test_corrupt_zstd_with_honest_checksum(samples):
    art = samples["segment-zstd"]
    both_paths_raise(_with_payload(art, b"this is not zstd at all" * 10), "corrupt zstd payload")


def test_body_length_mismatch_with_honest_checksum(samples):
    art = samples["snapshot-zstd"]
    short = zstandard.ZstdCompressor().compress(make_image(19, 4096))
    both_paths_raise(_with_payload(art, short), "snapshot body does not match its header (decoded")
    longer = zstandard.ZstdCompressor().compress(make_image(21, 4096))
    both_paths_raise(_with_payload(art, longer), "snapshot body does not match its header (decoded")


def test_segment_body_mismatch_with_honest_checksum(samples):
    art = samples["segment-none"]
    _, body = split(art)
    rec = 4 + 512
    # swap the first two records' page numbers: no longer increasing
    records = [bytearray(body[i : i + rec]) for i in range(0, len(body), rec)]
    h = A.parse_header_bytes(art)
    assert h.txns[0].page_count >= 2
    records[0][:4], records[1][:4] = records[1][:4], records[0][:4]
    both_paths_raise(_with_payload(art, b"".join(records)), "segment body does not match its header (page number")
    zero = bytearray(body)
    zero[:4] = bytes(4)
    both_paths_raise(_with_payload(art, bytes(zero)), "segment body does not match its header (page number 0")
    # the same records regrouped: the header's per-txn counts no longer fit
    def regroup(m):
        m["txns"][0][1] += 1
        m["txns"][1][1] -= 1

    if h.txns[1].page_count > 0:
        both_paths_raise(rebuild(art, regroup), "segment body does not match its header")


def test_iter_segment_pages_rejects_a_snapshot(samples):
    f = io.BytesIO(samples["snapshot-zstd"])
    h = A.read_header(f)
    with pytest.raises(ValueError):
        A.iter_segment_pages(f, h)


def test_short_reads_from_a_stream(samples):
    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self._b = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self._b.read(min(len(b), 3))
            b[: len(chunk)] = chunk
            return len(chunk)

    art = samples["segment-none"]
    f = Trickle(art)
    h = A.read_header(f)
    pages = list(A.iter_segment_pages(f, h))
    assert b"".join(p.to_bytes(4, "big") + bytes(mv) for _, p, mv in pages) == split(art)[1]


# ---------------------------------------------------------------------------- property


@st.composite
def segments(draw):
    page_size = draw(st.sampled_from([512, 1024, 4096]))
    codec = draw(st.sampled_from(CODECS))
    first = draw(st.integers(0, 2**64 - 10))
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    txns = []
    for i in range(n):
        pgnos = draw(
            st.lists(st.one_of(st.integers(1, 64), st.integers(1, 2**32 - 2)), max_size=12, unique=True).map(sorted)
        )
        pages = [(p, rng.randbytes(page_size) if rng.random() < 0.5 else bytes([p % 251]) * page_size) for p in pgnos]
        txns.append(
            (
                first + i,
                draw(st.integers(0, 2**32 - 2)),
                draw(st.floats(0, 4e9, allow_nan=False)),
                draw(st.integers(0, 2**64 - 1)),
                pages,
            )
        )
    return page_size, codec, txns


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments())
def test_random_segments_round_trip(seg):
    page_size, codec, txns = seg
    art = A.encode_segment(GEN, page_size, txns, codec=codec)
    h, body = A.decode(art)
    assert body == expected_segment_body(txns)
    assert h.txns == tuple(A.TxnInfo(t[0], len(t[4]), t[1], float(t[2]), t[3]) for t in txns)
    f = io.BytesIO(art)
    got = [(t.txid, p, bytes(mv)) for t, p, mv in A.iter_segment_pages(f, A.read_header(f))]
    assert got == [(t[0], p, d) for t in txns for p, d in t[4]]
