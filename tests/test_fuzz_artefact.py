"""Fuzzing the artefact decoder (replicator/artefact.py): read_header, iter_body,
iter_segment_pages, decode and verify_key.

tests/test_artefact.py already covers the fixed corruption classes one by one (every bit
of four samples, every truncation, a list of malformed fields and garbage CBOR) and the
round trip of random segments. Here Hypothesis drives:

- random valid snapshots and segments (both codecs), mutated: bit flips, bytes, runs of
  random bytes, truncation, extension, insertion, deletion and region swaps;
- headers rebuilt with a *valid* checksum from a valid artefact's map with fields
  replaced by arbitrary CBOR values (huge, negative, float, NaN, text, bytes, nested,
  semantic tags), removed or added, optionally with an honest plen/psum for the
  payload, and payloads replaced by random bytes or other valid zstd frames, so that
  the semantic validation and the body checks are what has to object;
- wholly random CBOR documents and random bytes as the header.

Property: the only exception is ArtefactError (one line); the buffer decoder (decode) and
the streaming decoder (read_header + iter_body / iter_segment_pages, in random chunk
sizes and through a stream that returns short reads) agree; when an artefact decodes,
its header satisfies every documented invariant and its body is what the payload
decodes to (so a mutated artefact that passes the checksums decodes to the original);
verify_key accepts exactly the key that names the header. No hang (cpu budget) and no
unbounded memory (address-space cap).
"""

from __future__ import annotations

import inspect
import io
import math
import random
import re

import cbor2
import pytest
import xxhash
import zstandard
from hypothesis import assume, event, given
from hypothesis import strategies as st
from test_fuzz_common import LONG_MODE, fuzz_settings, guarded, timeout

from replicator import artefact as A
from replicator import keys
from replicator.artefact import ArtefactError

GEN = "20261122T171656939519Z-ea5f"

# Client-side encryption (format version 2) where this tree has it: encrypted artefacts are
# fuzzed too, decoded with KEY; OTHER_KEY and no key must always be refused.
try:
    from replicator import encryption as E

    KEY = E.EncryptionKey(bytes(range(32)))
    OTHER_KEY = E.EncryptionKey(bytes(32))
except ImportError:  # a tree without encryption
    E = KEY = OTHER_KEY = None
ENCRYPTS = KEY is not None and "encryption_key" in inspect.signature(A.encode_snapshot).parameters
KEYED = {"encryption_key": KEY} if ENCRYPTS else {}
CODECS = ["zstd", "none"]
FIELDS = ["v", "kind", "gen", "txids", "psize", "codec", "level", "created", "plen", "psum", "rlen", "txns"]


# --------------------------------------------------------------------------- valid artefacts


def _page(rng: random.Random, page_size: int) -> bytes:
    if rng.random() < 0.5:
        return bytes([rng.randrange(256)]) * page_size
    return rng.randbytes(page_size)


@st.composite
def valid_artefacts(draw) -> bytes:
    codec = draw(st.sampled_from(CODECS))
    page_size = draw(st.sampled_from([512, 1024, 4096, 65536] if LONG_MODE else [512, 1024]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    created = draw(st.floats(0, 4e9))
    options = {}
    if ENCRYPTS and draw(st.integers(0, 2)) == 0:
        options = {"encryption_key": KEY, "encryption_chunk": draw(st.sampled_from([7, 64, 1000, 1 << 20]))}
    if draw(st.booleans()):
        n = draw(st.integers(0, 6))
        image = b"".join(_page(rng, page_size) for _ in range(n))
        txid = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 1)))
        return A.encode_snapshot(
            GEN, txid, page_size, image, commit_time=draw(st.floats(0, 4e9)), codec=codec, created=created, **options
        )
    first = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 5)))
    txns = []
    for i in range(draw(st.integers(1, 4))):
        pgnos = sorted(draw(st.sets(st.one_of(st.integers(1, 20), st.integers(1, 2**32 - 2)), max_size=4)))
        pages = [(p, _page(rng, page_size)) for p in pgnos]
        txns.append((first + i, draw(st.integers(0, 2**32 - 2)), draw(st.floats(0, 4e9)), draw(st.integers(0, 2**64 - 1)), pages))
    return A.encode_segment(GEN, page_size, txns, codec=codec, created=created, **options)


def split(art: bytes) -> tuple[dict, bytes]:
    end = A.header_end(art)
    return cbor2.loads(art[A.PREFIX_SIZE : end - A.CHECKSUM_SIZE]), art[end:]


def frame(header_body: bytes, payload: bytes) -> bytes:
    """An artefact around arbitrary header bytes, with a correct header checksum."""
    return A.MAGIC + len(header_body).to_bytes(4, "big") + header_body + xxhash.xxh3_64_digest(header_body) + payload


# --------------------------------------------------------------------------- decoding both ways


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes per read, as a network stream may."""

    def __init__(self, data: bytes, step: int):
        self._b = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._b.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


def stream_decode(art: bytes, chunk: int, step: int | None, keyed: dict) -> tuple[A.ArtefactHeader, bytes]:
    f = io.BytesIO(art) if step is None else Trickle(art, step)
    h = A.read_header(f)
    if h.kind == A.SEGMENT:
        records = []
        for txn, pgno, page in A.iter_segment_pages(f, h, **keyed):
            assert len(page) == h.page_size
            records.append((txn.txid, pgno, bytes(page)))
        check_segment_records(h, records)
        return h, b"".join(p.to_bytes(4, "big") + data for _, p, data in records)
    parts = []
    for part in A.iter_body(f, h, chunk_size=chunk, **keyed):
        assert 0 < len(part) <= chunk
        parts.append(part)
    return h, b"".join(parts)


def check_segment_records(h: A.ArtefactHeader, records: list[tuple[int, int, bytes]]) -> None:
    """The pages of a segment as the header describes them: per txn page_count pages in
    strictly increasing page order, transactions in txid order."""
    counts: dict[int, int] = {}
    prev: dict[int, int] = {}
    order = []
    for txid, pgno, _ in records:
        assert 1 <= pgno <= A.MAX_PAGE_NUMBER and pgno > prev.get(txid, 0)
        prev[txid] = pgno
        counts[txid] = counts.get(txid, 0) + 1
        if not order or order[-1] != txid:
            order.append(txid)
    assert order == sorted(set(order))
    assert counts == {t.txid: t.page_count for t in h.txns if t.page_count}


def decode_both(art: bytes, chunk: int, step: int | None, keyed: dict = KEYED):
    """(header, body), or None for an ArtefactError; the two decoders must agree."""
    outcomes = []
    for fn in (lambda: A.decode(art, **keyed), lambda: stream_decode(art, chunk, step, keyed)):
        try:
            outcomes.append(fn())
        except ArtefactError as e:
            msg = str(e)
            assert msg and "\n" not in msg
            event("ArtefactError: " + re.sub(r"'[^']*'|[0-9a-f]{16}|\d+", "_", msg)[:70])
            outcomes.append(None)
    buffered, streamed = outcomes
    assert (buffered is None) == (streamed is None), ("the decoders disagree", buffered, streamed)
    if buffered is not None:
        assert buffered == streamed
    return buffered


def check_header_invariants(h: A.ArtefactHeader) -> None:
    """Everything docs/format.md and _header_from_map promise about an accepted header."""
    assert 1 <= h.format_version <= A.FORMAT_VERSION
    assert h.kind in A.KINDS and h.codec in A.CODECS
    assert type(h.generation) is str and 0 < len(h.generation) <= 256 and "/" not in h.generation
    assert 0 <= h.first_txid <= h.last_txid <= A.MAX_UINT64
    assert A.MIN_PAGE_SIZE <= h.page_size <= A.MAX_PAGE_SIZE and h.page_size & (h.page_size - 1) == 0
    assert -(1 << 20) <= h.level <= 1 << 20
    assert type(h.created) is float and math.isfinite(h.created)
    for v in (h.payload_length, h.payload_checksum, h.raw_length):
        assert type(v) is int and 0 <= v <= A.MAX_UINT64
    assert h.txns
    for t in h.txns:
        assert 0 <= t.txid <= A.MAX_UINT64 and 0 <= t.page_count <= A.MAX_PAGE_NUMBER
        assert 0 <= t.db_pages <= A.MAX_PAGE_NUMBER and 0 <= t.db_checksum <= A.MAX_UINT64
        assert type(t.commit_time) is float and math.isfinite(t.commit_time)
    if h.kind == A.SNAPSHOT:
        (t,) = h.txns
        assert h.first_txid == h.last_txid == t.txid and t.page_count == t.db_pages
        assert h.raw_length == t.db_pages * h.page_size
    else:
        assert [t.txid for t in h.txns] == list(range(h.first_txid, h.last_txid + 1))
        assert h.raw_length == sum(t.page_count for t in h.txns) * (4 + h.page_size)
    enc = getattr(h, "encryption", None)
    if enc is None:
        assert h.format_version == getattr(A, "PLAIN_VERSION", 1)
        if h.codec == "none":
            assert h.payload_length == h.raw_length
    else:  # encrypted: version 2, a well-formed `enc`, a stored length of whole sealed chunks
        assert h.format_version == A.ENCRYPTED_VERSION and enc.alg == E.ALG
        assert len(enc.kid) == 16 and not enc.kid.strip("0123456789abcdef")
        assert type(enc.nonce) is bytes and len(enc.nonce) == E.NONCE_SIZE and 1 <= enc.chunk <= E.MAX_CHUNK
        assert E.valid_stored_length(h.payload_length, enc.chunk)
        if h.codec == "none":
            assert h.payload_length == E.stored_length(h.raw_length, enc.chunk)


def check_verify_key(h: A.ArtefactHeader) -> None:
    """verify_key accepts the key naming the header, and nothing else."""
    own = (
        keys.snapshot_key(h.generation, h.last_txid, 1)
        if h.kind == A.SNAPSHOT
        else keys.segment_key(h.generation, h.first_txid, h.last_txid, 1)
    )
    if keys.parse_key(own) is None:  # the header's generation is not an id: no key names it
        with pytest.raises(ArtefactError):
            A.verify_key(h, own)
        return
    A.verify_key(h, own)
    others = [
        "not/a/key",
        keys.snapshot_key("20200101T000000000000Z-0000", h.last_txid, 1),
        keys.segment_key(h.generation, h.first_txid, h.last_txid + 1, 1)
        if h.last_txid < A.MAX_UINT64
        else keys.segment_key(h.generation, 0, 0, 1),
        keys.snapshot_key(h.generation, h.last_txid, 1) if h.kind == A.SEGMENT else keys.segment_key(h.generation, h.first_txid, h.last_txid, 1),
    ]
    for other in others:
        if other == own:
            continue
        with pytest.raises(ArtefactError):
            A.verify_key(h, other)


def expected_body(h: A.ArtefactHeader, payload: bytes) -> bytes | None:
    """What the payload decodes to: the stored bytes, or the first zstd frame's content
    (bytes after the first frame are covered by the checksum but not decoded)."""
    if h.codec == "none":
        return payload
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    except zstandard.ZstdError:
        return None


# --------------------------------------------------------------------------- known bugs


def known_bug(exc: BaseException, header_map: object = None) -> bool:
    """Exceptions of known, unfixed bugs the fuzz tests let through (none now: BUG 1, a
    bignum version breaking the error message, is fixed and kept as a regression test)."""
    return False


def test_regression_huge_version_number_is_an_artefact_error():
    art = frame(cbor2.dumps({"v": 10**5000}), b"")
    with pytest.raises(ArtefactError):
        A.parse_header_bytes(art)
    with pytest.raises(ArtefactError):
        A.read_header(io.BytesIO(art))


# --------------------------------------------------------------------------- mutated artefacts


@st.composite
def mutated(draw, art: bytes) -> bytes:
    buf = bytearray(art)
    end = A.header_end(art)
    regions = [(0, 8), (8, 12), (12, end - 8), (end - 8, end), (end, max(end + 1, len(art)))]
    for _ in range(draw(st.integers(1, 4))):
        n = len(buf)
        lo, hi = draw(st.sampled_from(regions))
        pos = draw(st.integers(min(lo, max(0, n - 1)), max(0, min(hi, n) - 1)))
        op = draw(st.sampled_from(["flip", "byte", "run", "truncate", "extend", "insert", "delete", "swap"]))
        if op == "flip" and n:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "run" and n:
            run = draw(st.binary(min_size=1, max_size=16))
            buf[pos : pos + len(run)] = run
        elif op == "truncate":
            del buf[pos:]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif op == "swap" and n > 2:
            a, b = sorted((pos, draw(st.integers(0, n - 1))))
            k = min(draw(st.integers(1, 32)), b - a)
            if k:
                buf[a : a + k], buf[b : b + k] = buf[b : b + k], buf[a : a + k]
    return bytes(buf)


@pytest.mark.timeout(timeout(60))
@fuzz_settings(800)
@given(data=st.data(), chunk=st.sampled_from([1, 7, 512, 4096, 1 << 20]), step=st.sampled_from([None, 1, 5, 4096]))
def test_fuzz_mutated_artefacts_decode_to_the_original_or_fail(data, chunk, step):
    art = data.draw(valid_artefacts())
    original = A.decode(art, **KEYED)
    encrypted = getattr(original[0], "encryption", None) is not None
    if encrypted and data.draw(st.booleans()):  # an encrypted artefact needs its own key
        for keyed in ({"encryption_key": None}, {"encryption_key": OTHER_KEY}):
            assert decode_both(art, chunk, step, keyed) is None
    bad = data.draw(mutated(art))
    with guarded():
        got = decode_both(bad, chunk, step)
    if got is None:
        event(f"mutated{' encrypted' if encrypted else ''}: rejected")
        return
    event("mutated: decoded" + (" (unchanged)" if bad == art else ""))
    assert got == original, "a mutated artefact passed every check but decodes to something else"
    check_verify_key(got[0])


# --------------------------------------------------------------------------- re-checksummed headers

_BIG = st.integers(0, 6000).map(lambda k: 10**k)  # CBOR bignums (tag 2/3) of up to 6000 digits
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 + 1),
    st.sampled_from([0, 1, -1, 512, 4096, 65536, 2**32 - 2, 2**32 - 1, 2**63, 2**64 - 1, 2**64, -(2**64)]),
    _BIG,
    _BIG.map(lambda v: -v),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), -0.0, 1.5]),
    st.text(max_size=40),
    st.sampled_from(["snapshot", "segment", "zstd", "none", "lz4", GEN, "", "a/b", "x" * 257]),
    st.binary(max_size=40),
)
TAGS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 100, 256, 258, 260, 261, 1001, 55799]


def _tagged(inner):
    return st.builds(cbor2.CBORTag, st.sampled_from(TAGS), inner)


cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), inner, max_size=5),
        _tagged(inner),
    ),
    max_leaves=20,
)


def _near(value):
    """Values close to a valid one: off by one, or the same number as another type."""
    out = [value]
    if type(value) is int:
        out += [value + 1, value - 1, str(value), -value, value * 2**32]
        if abs(value) < 2**1023:  # (past that, no float has the same value)
            out.append(float(value))
    elif type(value) is float:
        out += [int(value) if math.isfinite(value) else 0, value + 1, -value, float("nan")]
    elif type(value) is list:
        out += [value[:-1], value + value[-1:], list(reversed(value)), tuple(value)]
    return st.integers(0, len(out) - 1).map(out.__getitem__)  # (values may be unhashable)


@st.composite
def header_edits(draw, m: dict) -> dict:
    m = dict(m)
    for _ in range(draw(st.integers(1, 3))):
        # mostly near misses (off by one, another type), which get past the type checks to
        # the consistency checks and the body; sometimes anything at all
        op = draw(st.sampled_from(["near"] * 4 + ["txn"] * 3 + ["txids"] * 2 + ["random", "delete", "add"]))
        field = draw(st.sampled_from(FIELDS))
        if op == "random":
            m[field] = draw(cbor_values)
        elif op == "near" and field in m:
            m[field] = draw(_near(m[field]))
        elif op == "delete":
            m.pop(field, None)
        elif op == "add":
            m[draw(st.text(max_size=6))] = draw(cbor_values)
        elif op == "txn" and isinstance(m.get("txns"), list) and m["txns"]:
            txns = [list(t) if isinstance(t, list) else t for t in m["txns"]]
            i = draw(st.integers(0, len(txns) - 1))
            if isinstance(txns[i], list) and txns[i]:
                j = draw(st.integers(0, len(txns[i]) - 1))
                txns[i][j] = draw(st.one_of(_near(txns[i][j]), cbor_values))
            else:
                txns[i] = draw(cbor_values)
            m["txns"] = txns
        elif op == "txids" and isinstance(m.get("txids"), list) and len(m["txids"]) == 2:
            m["txids"] = [draw(_near(m["txids"][0])), draw(_near(m["txids"][1]))]
    return m


@st.composite
def payloads(draw, payload: bytes, m: dict) -> bytes:
    kind = draw(st.sampled_from(["same", "same", "random", "zstd", "zstd-bomb", "truncated"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "zstd":
        raw = draw(st.binary(max_size=3000))
        if draw(st.booleans()):  # a body of whole records, as a segment's
            rec = 4 + (m.get("psize") if type(m.get("psize")) is int and 512 <= m.get("psize") <= 4096 else 512)
            raw = raw[: len(raw) // rec * rec] or bytes(rec)
        return zstandard.ZstdCompressor(level=1).compress(raw) + (draw(st.binary(max_size=8)) if draw(st.booleans()) else b"")
    if kind == "zstd-bomb":  # a small payload that inflates far past what the header allows
        return zstandard.ZstdCompressor(level=3).compress(bytes(draw(st.sampled_from([1 << 20, 8 << 20]))))
    if kind == "truncated":
        return payload[: draw(st.integers(0, len(payload)))]
    return payload


@pytest.mark.timeout(timeout(60))
@fuzz_settings(1000)
@given(data=st.data(), chunk=st.sampled_from([3, 1000, 1 << 20]), step=st.sampled_from([None, 7]))
def test_fuzz_rechecksummed_headers(data, chunk, step):
    art = data.draw(valid_artefacts())
    original = A.decode(art, **KEYED)
    m, payload = split(art)
    m = data.draw(header_edits(m))
    payload = data.draw(payloads(payload, m))
    if data.draw(st.booleans()):  # an honest plen/psum: only deeper checks can object
        m["plen"], m["psum"] = len(payload), xxhash.xxh3_64_intdigest(payload)
    try:
        body = cbor2.dumps(m, canonical=data.draw(st.booleans()))
    except (TypeError, ValueError, OverflowError, cbor2.CBOREncodeError):
        assume(False)  # not encodable as CBOR: not an input a file can hold
    candidate = frame(body, payload)
    with guarded():
        try:
            got = decode_both(candidate, chunk, step)
        except Exception as e:
            if known_bug(e):
                event("known bug")
                return
            raise
    if got is None:
        event("rechecksummed: rejected")
        return
    event("rechecksummed: decoded")
    h, raw = got
    check_header_invariants(h)
    assert len(raw) == h.raw_length
    if getattr(h, "encryption", None) is None:
        assert raw == expected_body(h, payload)
    else:  # authenticated: only the artefact the key's holder wrote (header and body) opens
        assert got == original
    check_verify_key(h)


header_maps = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), cbor_values, max_size=14)


@st.composite
def raw_headers(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "map", "value"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200))
    try:
        return cbor2.dumps(draw(header_maps) if kind == "map" else draw(cbor_values))
    except (TypeError, ValueError, OverflowError, cbor2.CBOREncodeError):
        return b"\xff"


@pytest.mark.timeout(timeout(60))
@fuzz_settings(600)
@given(header=raw_headers(), payload=st.binary(max_size=64), truncate=st.one_of(st.none(), st.integers(0, 300)))
def test_fuzz_random_headers(header, payload, truncate):
    art = frame(header, payload)
    if truncate is not None:
        art = art[:truncate]
    with guarded():
        try:
            got = decode_both(art, 64, None)
        except Exception as e:
            if known_bug(e):
                return
            raise
        for prefix in (art[:8], art[:12], art[:A.PREFIX_SIZE - 1]):  # header_end on short prefixes
            try:
                A.header_end(prefix)
            except ArtefactError:
                pass
    if got is not None:
        check_header_invariants(got[0])
        assert len(got[1]) == got[0].raw_length


@pytest.mark.timeout(timeout(60))
@fuzz_settings(200)
@given(art=valid_artefacts(), cut=st.integers(0, 2**32 - 1))
def test_fuzz_header_length_field(art, cut):
    """Any value in the header-length field: a short or absurd length is an ArtefactError,
    never a huge read or allocation."""
    bad = art[:8] + cut.to_bytes(4, "big") + art[12:]
    with guarded():
        got = decode_both(bad, 4096, None)
    if got is not None:
        assert bad == art
