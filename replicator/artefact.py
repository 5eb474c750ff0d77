"""Artefact codec: the immutable, self-describing files a replica holds (DESIGN invariant 5).

Pure bytes in, bytes out: no driver, no SQLite. The byte layout is specified in
docs/format.md; in short::

    MAGIC (8) | header length N (4, BE) | CBOR header (N) | xxh3_64(header) (8, BE) | payload

A SNAPSHOT's body is the raw database image; a SEGMENT's body is, per transaction and
page, a 4-byte big-endian page number followed by the page image. Writers and readers
stream in large chunks, so memory stays bounded whatever the artefact size (invariant 7).
Snapshots are compressed as a sequence of independent zstd frames (codec `zstd-frames`)
so that a restore decodes them on every core (decode_body_into).
With an encryption key, the compressed payload is then encrypted in AES-256-GCM chunks
(replicator.encryption; format version 2, `enc` header key); without one, nothing changes.
"""

from __future__ import annotations

import io
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import cbor2
import xxhash
import zstandard

from replicator import encryption, keys
from replicator.encryption import EncryptionKey

MAGIC = b"\x89RPL\r\n\x1a\n"
FORMAT_VERSION = 2  # the newest version this module reads
PLAIN_VERSION = 1  # what writers write for an unencrypted artefact (readable by every reader)
ENCRYPTED_VERSION = 2  # what writers write for an encrypted one (the `enc` key is required)
PREFIX_SIZE = 12  # magic + header length
CHECKSUM_SIZE = 8  # the header checksum after the CBOR header
MAX_HEADER_LENGTH = 64 << 20
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 65536
MAX_PAGE_NUMBER = 2**32 - 2  # SQLite's largest page number
MAX_UINT64 = 2**64 - 1
PAGE_NUMBER_SIZE = 4
SNAPSHOT, SEGMENT = keys.SNAPSHOT, keys.SEGMENT
KINDS = (SNAPSHOT, SEGMENT)
ZSTD, FRAMED, NONE = "zstd", "zstd-frames", "none"
CODECS = (ZSTD, FRAMED, NONE)
FRAME_SIZE = 4 << 20  # raw bytes per frame that writers of zstd-frames use
MAX_FRAME_SIZE = 16 << 20  # the largest a reader accepts: a restore holds up to 5 frames and their output

_BATCH = 1 << 20  # bytes handed to the compressor / spool per call
_COPY_CHUNK = 1 << 20
_PGNO = struct.Struct(">I")


class ArtefactError(Exception):
    """A damaged, foreign or unsupported artefact. One line, no key or path in it."""


# ---------------------------------------------------------------------------- checksums


def page_hash(pgno: int, data: bytes | bytearray | memoryview) -> int:
    """64-bit hash of one page: xxh3_64 of its bytes, seeded with its page number."""
    return xxhash.xxh3_64_intdigest(data, pgno)


def db_checksum_of_image(image: bytes | bytearray | memoryview, page_size: int, *, first_page: int = 1) -> int:
    """Whole-database checksum: XOR of page_hash(p, page p) over all pages (0 if none).

    first_page lets callers fold an image in pieces: XOR the results of consecutive calls.
    """
    mv = memoryview(image).cast("B")
    if mv.nbytes % page_size:
        raise ValueError(f"image of {mv.nbytes} bytes is not a whole number of {page_size}-byte pages")
    acc = 0
    h = xxhash.xxh3_64_intdigest
    for pgno, off in enumerate(range(0, mv.nbytes, page_size), first_page):
        acc ^= h(mv[off : off + page_size], pgno)
    return acc


def xor_of_u64(buf: bytes | bytearray | memoryview, byteorder: str = "little") -> int:
    """XOR of the unsigned 64-bit integers packed in buf (in byteorder); 0 when empty.

    Folded in halves through one big integer: log2(n) C-level XORs instead of a Python
    loop over n values (about 1 ms for a 256 MiB database's 65,536 page hashes).
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes % 8:
        raise ValueError(f"{mv.nbytes} bytes are not a whole number of 64-bit values")
    n = mv.nbytes // 8
    x = int.from_bytes(mv, byteorder)  # either order puts each value on a 64-bit boundary
    while n > 1:
        half = (n + 1) // 2
        shift = 64 * half
        x = (x & ((1 << shift) - 1)) ^ (x >> shift)
        n = half
    return x


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Encryption:
    """The `enc` header key: how the payload is encrypted (docs/format.md, "Encryption")."""

    kid: str  # key id: 16 hex digits, the first 8 bytes of SHA-256(key)
    nonce: bytes  # 12-byte base nonce, random per artefact
    chunk: int  # payload (compressed) bytes per sealed chunk
    alg: str = encryption.ALG
    # SHA-256 of the header map without plen/psum: bound into the last chunk (derived, not stored)
    digest: bytes = field(default=b"", compare=False, repr=False)

    def to_map(self) -> dict[str, Any]:
        return {"alg": self.alg, "kid": self.kid, "nonce": self.nonce, "chunk": self.chunk}


def header_digest(m: dict) -> bytes:
    """SHA-256 of the canonical CBOR of a header map without `plen` and `psum`."""
    import hashlib  # here: only encrypted artefacts need it (~2 ms of a restore's start)

    return hashlib.sha256(cbor2.dumps({k: v for k, v in m.items() if k not in ("plen", "psum")}, canonical=True)).digest()


@dataclass(frozen=True)
class TxnInfo:
    """One transaction in an artefact: where it leaves the database."""

    txid: int
    page_count: int  # page images stored for this transaction
    db_pages: int  # database size in pages after the commit
    commit_time: float  # unix seconds, when the commit was observed
    db_checksum: int  # whole-database checksum after the commit


@dataclass(frozen=True)
class ArtefactHeader:
    """The decoded CBOR header of an artefact."""

    kind: str
    generation: str
    first_txid: int
    last_txid: int
    page_size: int
    codec: str
    level: int
    created: float
    payload_length: int
    payload_checksum: int
    raw_length: int
    txns: tuple[TxnInfo, ...]
    format_version: int = PLAIN_VERSION
    encryption: Encryption | None = None  # set for an encrypted artefact (format version 2)
    frame_size: int = 0  # codec zstd-frames: raw bytes per frame (the last may be shorter)
    frames: tuple[int, ...] = ()  # codec zstd-frames: stored (compressed) bytes of each frame

    @property
    def db_checksum(self) -> int:
        """Database checksum at the position this artefact ends at."""
        return self.txns[-1].db_checksum

    @property
    def db_pages(self) -> int:
        """Database size in pages at the position this artefact ends at."""
        return self.txns[-1].db_pages

    @property
    def commit_time(self) -> float:
        """Commit time of the last transaction in this artefact."""
        return self.txns[-1].commit_time

    @property
    def page_count(self) -> int:
        """Number of page images in the body."""
        return sum(t.page_count for t in self.txns)

    def txn(self, txid: int) -> TxnInfo:
        """The entry for txid; KeyError if this artefact does not hold it."""
        i = txid - self.first_txid
        if not 0 <= i < len(self.txns):
            raise KeyError(txid)
        return self.txns[i]

    def to_map(self) -> dict[str, Any]:
        """The header as the CBOR map that is stored."""
        return {
            "v": self.format_version,
            "kind": self.kind,
            "gen": self.generation,
            "txids": [self.first_txid, self.last_txid],
            "psize": self.page_size,
            "codec": self.codec,
            "level": self.level,
            "created": float(self.created),
            "plen": self.payload_length,
            "psum": self.payload_checksum,
            "rlen": self.raw_length,
            "txns": [[t.txid, t.page_count, t.db_pages, float(t.commit_time), t.db_checksum] for t in self.txns],
            **({"enc": self.encryption.to_map()} if self.encryption is not None else {}),
            **({"fsize": self.frame_size, "frames": list(self.frames)} if self.codec == FRAMED else {}),
        }

    def encode(self, *, validate: bool = True) -> bytes:
        """Everything before the payload: magic, header length, CBOR header, header checksum.

        validate=False skips re-checking the map as a reader would, for headers built by
        this module's writers, which check every value as it is added."""
        m = self.to_map()
        if validate:
            try:
                _header_from_map(m)
            except ArtefactError as e:
                raise ValueError(f"invalid artefact header: {e}") from None
        body = cbor2.dumps(m, canonical=True)
        if len(body) > MAX_HEADER_LENGTH:
            raise ValueError(f"artefact header of {len(body)} bytes exceeds {MAX_HEADER_LENGTH}")
        return b"".join((MAGIC, len(body).to_bytes(4, "big"), body, xxhash.xxh3_64_digest(body)))


def _malformed(name: str) -> ArtefactError:
    return ArtefactError(f"header field {name!r} missing or malformed")


def _int(m: dict, name: str, lo: int = 0, hi: int = MAX_UINT64) -> int:
    v = m.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise _malformed(name)
    return v


def _is_uint(v: Any, hi: int = MAX_UINT64) -> bool:
    return type(v) is int and 0 <= v <= hi


def _is_time(v: Any) -> bool:
    if type(v) is int:  # (math.isfinite raises OverflowError past a float's range)
        return -(1 << 63) <= v < (1 << 63)
    return type(v) is float and math.isfinite(v)


def _header_from_map(m: Any) -> ArtefactHeader:
    """Validate a decoded header map and build the header; unknown keys are ignored."""
    if not isinstance(m, dict):
        raise ArtefactError("header is not a CBOR map")
    version = m.get("v")
    if type(version) is not int or version < 1:
        raise _malformed("v")
    if version > FORMAT_VERSION:
        shown = version if version < 1 << 32 else "beyond 2**32"  # never format a huge bignum
        raise ArtefactError(f"unsupported format version {shown} (this replicator reads {FORMAT_VERSION})")
    kind = m.get("kind")
    if kind not in KINDS:
        raise _malformed("kind")
    gen = m.get("gen")
    if type(gen) is not str or not 0 < len(gen) <= 256 or "/" in gen:
        raise _malformed("gen")
    txids = m.get("txids")
    if not isinstance(txids, (list, tuple)) or len(txids) != 2 or not all(_is_uint(t) for t in txids):
        raise _malformed("txids")
    first, last = txids
    if first > last:
        raise _malformed("txids")
    psize = _int(m, "psize", MIN_PAGE_SIZE, MAX_PAGE_SIZE)
    if psize & (psize - 1):
        raise _malformed("psize")
    codec = m.get("codec")
    if type(codec) is not str:
        raise _malformed("codec")
    if codec not in CODECS:
        raise ArtefactError(f"unsupported codec {codec[:32]!r}")
    level = _int(m, "level", -(1 << 20), 1 << 20)
    created = m.get("created")
    if not _is_time(created):
        raise _malformed("created")
    plen, psum, rlen = _int(m, "plen"), _int(m, "psum"), _int(m, "rlen")

    raw_txns = m.get("txns")
    if not isinstance(raw_txns, (list, tuple)) or not raw_txns:
        raise _malformed("txns")
    txns = []
    for e in raw_txns:
        if (
            not isinstance(e, (list, tuple))
            or len(e) != 5
            or not _is_uint(e[0])
            or not _is_uint(e[1], MAX_PAGE_NUMBER)
            or not _is_uint(e[2], MAX_PAGE_NUMBER)
            or not _is_time(e[3])
            or not _is_uint(e[4])
        ):
            raise _malformed("txns")
        txns.append(TxnInfo(e[0], e[1], e[2], float(e[3]), e[4]))

    if kind == SNAPSHOT:
        t = txns[0]
        if len(txns) != 1 or first != last or t.txid != first:
            raise ArtefactError(f"header field 'txns' inconsistent: a snapshot needs one entry for txid {first}")
        if t.page_count != t.db_pages:
            raise ArtefactError("header field 'txns' inconsistent: snapshot page count differs from db_pages")
        expected_raw = t.db_pages * psize
    else:
        if len(txns) != last - first + 1 or any(t.txid != first + i for i, t in enumerate(txns)):
            raise ArtefactError(f"header field 'txns' inconsistent: entries are not txids {first}..{last} in order")
        expected_raw = sum(t.page_count for t in txns) * (PAGE_NUMBER_SIZE + psize)
    if rlen != expected_raw:
        raise ArtefactError(f"header field 'rlen' inconsistent: {rlen}, the txns need {expected_raw}")
    enc = _encryption_from_map(m, version)
    if enc is None:
        if codec == NONE and plen != rlen:
            raise ArtefactError("header field 'plen' inconsistent: codec 'none' stores the body as is")
    elif not encryption.valid_stored_length(plen, enc.chunk) or (
        codec == NONE and plen != encryption.stored_length(rlen, enc.chunk)
    ):
        raise ArtefactError("header field 'plen' inconsistent: not a whole sequence of encrypted chunks")
    fsize, frames = 0, ()
    if codec == FRAMED:
        fsize, frames = _frames_from_map(m, rlen, plen, enc)
    return ArtefactHeader(
        kind=kind,
        generation=gen,
        first_txid=first,
        last_txid=last,
        page_size=psize,
        codec=codec,
        level=level,
        created=float(created),
        payload_length=plen,
        payload_checksum=psum,
        raw_length=rlen,
        txns=tuple(txns),
        format_version=version,
        encryption=enc,
        frame_size=fsize,
        frames=frames,
    )


def _frames_from_map(m: dict, rlen: int, plen: int, enc: Encryption | None) -> tuple[int, tuple[int, ...]]:
    """`fsize` and `frames` of a zstd-frames header: one frame per fsize raw bytes, and the
    frames' stored lengths add up to the payload (to its plaintext, when encrypted)."""
    fsize = _int(m, "fsize", 1, MAX_FRAME_SIZE)
    frames = m.get("frames")
    if not isinstance(frames, (list, tuple)) or not all(_is_uint(n) and n > 0 for n in frames):
        raise _malformed("frames")
    if len(frames) != -(-rlen // fsize):
        raise ArtefactError(f"header field 'frames' inconsistent: {len(frames)} frames of {fsize} bytes for rlen {rlen}")
    if max(frames, default=0) > max_frame_length(fsize):
        # above zstd's worst case for fsize bytes: a reader would hold it in memory for nothing
        raise ArtefactError(f"header field 'frames' inconsistent: a frame longer than {fsize} bytes can compress to")
    total = sum(frames)
    if (total if enc is None else encryption.stored_length(total, enc.chunk)) != plen:
        raise ArtefactError("header field 'frames' inconsistent: the frames do not add up to the payload")
    return fsize, tuple(frames)


def _encryption_from_map(m: dict, version: int) -> Encryption | None:
    """The `enc` key: required from version 2 on, refused before (an older reader would
    ignore it and misread the payload)."""
    raw = m.get("enc")
    if raw is None:
        if version >= ENCRYPTED_VERSION:
            raise _malformed("enc")
        return None
    if version < ENCRYPTED_VERSION:
        raise ArtefactError(f"header field 'enc' needs format version {ENCRYPTED_VERSION}, the header says {version}")
    if not isinstance(raw, dict):
        raise _malformed("enc")
    alg = raw.get("alg")
    if type(alg) is not str:
        raise _malformed("enc")
    if alg != encryption.ALG:
        raise ArtefactError(f"unsupported encryption {alg[:32]!r}")
    kid, nonce, chunk = raw.get("kid"), raw.get("nonce"), raw.get("chunk")
    if (
        type(kid) is not str
        or len(kid) != 2 * encryption.KID_SIZE
        or kid.strip("0123456789abcdef")
        or type(nonce) is not bytes
        or len(nonce) != encryption.NONCE_SIZE
        or not _is_uint(chunk, encryption.MAX_CHUNK)
        or chunk == 0
    ):
        raise _malformed("enc")
    try:
        digest = header_digest(m)
    except Exception:  # a value cbor2 decoded but cannot encode again (an exotic tag)
        raise ArtefactError("header is not valid CBOR") from None
    return Encryption(kid=kid, nonce=nonce, chunk=chunk, alg=alg, digest=digest)


def header_end(prefix: bytes | bytearray | memoryview) -> int:
    """Offset of the payload, from the first PREFIX_SIZE bytes of an artefact (for range reads)."""
    prefix = bytes(prefix[:PREFIX_SIZE])
    if prefix[:8] != MAGIC[: len(prefix)]:
        raise ArtefactError("not a replicator artefact (bad magic)")
    if len(prefix) < PREFIX_SIZE:
        raise ArtefactError(f"truncated: prefix has {len(prefix)} of {PREFIX_SIZE} bytes")
    n = int.from_bytes(prefix[8:12], "big")
    if not 1 <= n <= MAX_HEADER_LENGTH:
        raise ArtefactError(f"header length {n} out of range (1..{MAX_HEADER_LENGTH})")
    return PREFIX_SIZE + n + CHECKSUM_SIZE


def parse_header_bytes(buf: bytes | bytearray | memoryview) -> ArtefactHeader:
    """Decode and validate the header from a buffer that starts at offset 0 of an artefact.

    buf may extend past the header (into the payload); bytes beyond are ignored.
    """
    mv = memoryview(buf).cast("B")
    end = header_end(mv)
    if mv.nbytes < end:
        raise ArtefactError(f"truncated: header has {mv.nbytes} of {end} bytes")
    body = mv[PREFIX_SIZE : end - CHECKSUM_SIZE]
    if xxhash.xxh3_64_intdigest(body) != int.from_bytes(mv[end - CHECKSUM_SIZE : end], "big"):
        raise ArtefactError("header checksum mismatch")
    fp = io.BytesIO(body)
    try:
        m = cbor2.CBORDecoder(fp).decode()
    except Exception:  # cbor2 raises several types on garbage (decode errors, overflow, recursion)
        raise ArtefactError("header is not valid CBOR") from None
    if fp.tell() != body.nbytes:
        raise ArtefactError("header is not valid CBOR")
    return _header_from_map(m)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at end of stream."""
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_header(f: BinaryIO) -> ArtefactHeader:
    """Read and validate the header, leaving f at the start of the payload."""
    prefix = _read_exact(f, PREFIX_SIZE)
    end = header_end(prefix)
    return parse_header_bytes(prefix + _read_exact(f, end - PREFIX_SIZE))


def verify_key(header: ArtefactHeader, key: str) -> None:
    """Raise ArtefactError unless the header agrees with the artefact's key (kind, generation, txids)."""
    k = keys.parse_key(key)
    if k is None:
        raise ArtefactError("not an artefact key")
    if (k.kind, k.generation, k.first_txid, k.last_txid) != (
        header.kind,
        header.generation,
        header.first_txid,
        header.last_txid,
    ):
        raise ArtefactError(
            f"header does not match its key (header: {header.kind} {header.generation} "
            f"txids {header.first_txid}..{header.last_txid})"
        )


# ---------------------------------------------------------------------------- reading


class _PayloadSource:
    """Reads at most `length` stored payload bytes from f, hashing them as they pass."""

    def __init__(self, f: BinaryIO, length: int):
        self._f = f
        self.length = length
        self.got = 0
        self._hash = xxhash.xxh3_64()

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.got
        if n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        b = self._f.read(n) or b""
        self.got += len(b)
        self._hash.update(b)
        return b

    def drain(self) -> None:
        while self.read(_COPY_CHUNK):
            pass

    def check_complete(self) -> None:
        """Raise unless all `length` bytes were there."""
        if self.got < self.length:
            raise ArtefactError(f"truncated: payload has {self.got} of {self.length} bytes")

    def matches(self, checksum: int) -> bool:
        return self._hash.intdigest() == checksum


def _opener(header: ArtefactHeader, key: EncryptionKey | None, source: _PayloadSource) -> encryption.Opener:
    """The decrypting reader of an encrypted payload; a missing or different key is an error
    before any payload byte is read."""
    enc = header.encryption
    assert enc is not None
    if key is None:
        raise ArtefactError(
            f"artefact is encrypted (key id {enc.kid}): configure encryption-key-path "
            "(or pass --encryption-key-path / set REPLICATOR_ENCRYPTION_KEY_PATH)"
        )
    if key.kid != enc.kid:
        raise ArtefactError(f"encrypted: key id {enc.kid} does not match the configured key's id {key.kid}")
    return encryption.Opener(
        key, enc.nonce, enc.chunk, enc.digest, source.read, lambda: source.got >= source.length
    )


def _payload(f: BinaryIO, header: ArtefactHeader, key: EncryptionKey | None) -> tuple[_PayloadSource, Any, encryption.Opener | None]:
    """(source, stored, opener): the hashing reader of the stored bytes, where the codec
    reads its input (those bytes, or their plaintext), and the decrypting reader if any."""
    source = _PayloadSource(f, header.payload_length)
    if header.encryption is None:
        return source, source, None
    opener = _opener(header, key, source)
    return source, opener, opener


def iter_body(
    f: BinaryIO, header: ArtefactHeader, *, chunk_size: int = 1 << 20, encryption_key: EncryptionKey | None = None
) -> Iterator[bytes]:
    """Decode the payload that follows the header in f; yield raw body chunks (<= chunk_size).

    Chunks are yielded before the payload checksum can be known: the body is proven only
    when the iterator finishes without raising (length, checksum, trailing data, raw length).
    An encrypted payload needs encryption_key (the key whose id the header names); each of
    its chunks is authenticated before any of its bytes is yielded, and the last one binds
    the header, so the header too is proven only at the end.
    """
    source, stored, opener = _payload(f, header, encryption_key)
    produced = 0
    problem = None
    if header.codec == NONE:
        while b := stored.read(chunk_size):
            produced += len(b)
            yield b
    elif header.codec == FRAMED:
        for i, n in enumerate(header.frames):
            want = _frame_raw_size(header, i)
            try:
                piece = _inflate_frame(_read_exact(stored, n), n, want)
            except _FrameError as e:
                problem = str(e)
                break
            produced += want
            mv = memoryview(piece)
            for off in range(0, want, chunk_size):
                yield mv[off : off + chunk_size]
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(
            stored, read_size=min(chunk_size, 1 << 20), read_across_frames=False, closefd=False
        )
        while True:
            try:
                b = reader.read(chunk_size)
            except zstandard.ZstdError:
                problem = "corrupt zstd payload"
                break
            if not b:
                break
            produced += len(b)
            if produced > header.raw_length:
                break  # never inflate a damaged payload past what the header allows
            yield b
    _end_of_payload(f, header, source, opener, produced, problem)


def decode_body_into(
    f: BinaryIO,
    header: ArtefactHeader,
    write_at: Callable[[int, bytes | memoryview], None],
    *,
    workers: int = 2,
    encryption_key: EncryptionKey | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode the payload that follows the header in f, handing each piece of the raw body to
    write_at(offset, data). A zstd-frames payload is decoded by `workers` threads (zstd and
    write_at, typically a pwrite, run without the GIL), at most workers + 1 frames in
    memory; any other codec is decoded in order on this thread. progress, if given, gets the
    size of each piece written (on this thread).

    As with iter_body, the body is proven only when this returns: every check of the
    payload is made, in the same order, and an error of write_at (OSError) is raised as is.
    """
    if header.codec != FRAMED or len(header.frames) < 2 or workers < 2:
        off = 0
        for chunk in iter_body(f, header, encryption_key=encryption_key):
            write_at(off, chunk)
            off += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    source, stored, opener = _payload(f, header, encryption_key)
    produced = 0
    problem = None

    def job(frame: bytes, n: int, want: int, off: int) -> int:
        write_at(off, _inflate_frame(frame, n, want))
        return want

    pending: deque = deque()

    def collect() -> None:
        nonlocal produced, problem
        try:
            got = pending.popleft().result()
        except _FrameError as e:
            problem = problem or str(e)
            return
        produced += got
        if progress is not None:
            progress(got)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            off = 0
            for i, n in enumerate(header.frames):
                want = _frame_raw_size(header, i)
                frame = _read_exact(stored, n)
                pending.append(pool.submit(job, frame, n, want, off))
                off += want
                while len(pending) > workers or (pending and pending[0].done()):
                    collect()
                if problem is not None:
                    break
                if len(frame) < n:
                    break  # the payload ended early: reported below
            while pending:
                collect()
        finally:
            for fut in pending:
                fut.cancel()
    _end_of_payload(f, header, source, opener, produced, problem)


def max_frame_length(fsize: int) -> int:
    """The most a zstd frame of fsize raw bytes may take, with room to spare: zstd's own
    worst case (ZSTD_compressBound) is fsize + fsize/256 plus under 64 bytes of header and
    at most 64 bytes more for inputs under 128 KiB."""
    return fsize + (fsize >> 7) + 4096


class _FrameError(Exception):
    """A frame of a zstd-frames payload that does not decode to its size; one line."""


def _frame_raw_size(header: ArtefactHeader, i: int) -> int:
    return min(header.frame_size, header.raw_length - i * header.frame_size)


def _inflate_frame(frame: bytes, n: int, want: int) -> bytes:
    """One frame of a zstd-frames payload, decoded: exactly `want` bytes from exactly `n`.
    The size the frame declares is checked before anything is allocated."""
    if len(frame) < n:
        raise _FrameError("corrupt zstd payload (truncated frame)")
    try:
        size = zstandard.frame_content_size(frame)
        data = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False) if size == want else None
    except zstandard.ZstdError:
        raise _FrameError("corrupt zstd payload") from None
    if data is None or len(data) != want:
        raise _FrameError("corrupt zstd payload (a frame does not decode to its size)")
    return data


def _end_of_payload(f: BinaryIO, header: ArtefactHeader, source: _PayloadSource, opener, produced: int, problem: str | None) -> None:
    """The checks once the codec has stopped, in the order docs/format.md gives."""
    if opener is not None and not opener.problem:
        # authenticate every chunk, the last (which binds the header) included, even when
        # the zstd frame ended early
        extra = 0
        while b := opener.read(_COPY_CHUNK):
            extra += len(b)
        if extra and not problem and produced <= header.raw_length:
            problem = "corrupt zstd payload (data after the frame)"
    source.drain()  # the checksum covers every stored byte, even after a decoding error
    source.check_complete()
    if not source.matches(header.payload_checksum):
        raise ArtefactError("payload checksum mismatch")
    if f.read(1):
        raise ArtefactError("trailing data after payload")
    if opener is not None and (opener.problem or not opener.finished):
        raise ArtefactError(opener.problem or "authentication failed: damaged or tampered (the last chunk is missing)")
    if problem:
        raise ArtefactError(problem)
    if produced != header.raw_length:
        more = " or more" if produced > header.raw_length else ""
        raise ArtefactError(
            f"{header.kind} body does not match its header (decoded {produced} bytes{more}, "
            f"header says {header.raw_length})"
        )


def _segment_pages(header: ArtefactHeader, chunks: Iterator[bytes]) -> Iterator[tuple[TxnInfo, int, memoryview]]:
    rec = PAGE_NUMBER_SIZE + header.page_size
    txns = header.txns
    ti, left, prev = 0, txns[0].page_count, 0
    pending = bytearray()
    problem = None

    def records(mv: memoryview) -> Iterator[tuple[TxnInfo, int, memoryview]]:
        nonlocal ti, left, prev, problem
        unpack = _PGNO.unpack_from
        for off in range(0, mv.nbytes, rec):
            while left == 0:
                ti += 1
                if ti == len(txns):
                    problem = "more pages than its txns list"
                    return
                left, prev = txns[ti].page_count, 0
            (pgno,) = unpack(mv, off)
            if not prev < pgno <= MAX_PAGE_NUMBER:
                problem = f"page number {pgno} after {prev} in txid {txns[ti].txid}"
                return
            prev = pgno
            left -= 1
            yield txns[ti], pgno, mv[off + PAGE_NUMBER_SIZE : off + rec]

    for chunk in chunks:
        mv = memoryview(chunk)
        off = 0
        if pending:
            off = min(rec - len(pending), mv.nbytes)
            pending += mv[:off]
            if len(pending) < rec:
                continue
            yield from records(memoryview(bytes(pending)))
            pending = bytearray()
            if problem is not None:
                break
        whole = off + (mv.nbytes - off) // rec * rec
        yield from records(mv[off:whole])
        if problem is not None:
            break
        pending += mv[whole:]
    if problem is None and (pending or left or any(t.page_count for t in txns[ti + 1 :])):
        problem = "body ends inside a page" if pending else "fewer pages than its txns list"
    if problem is not None:
        for _ in chunks:  # checksum and length errors take precedence: they say what really broke
            pass
        raise ArtefactError(f"segment body does not match its header ({problem})")


def iter_segment_pages(
    f: BinaryIO, header: ArtefactHeader, *, encryption_key: EncryptionKey | None = None
) -> Iterator[tuple[TxnInfo, int, memoryview]]:
    """Yield (txn, page number, page bytes) for every page of a segment, in body order.

    The memoryviews are slices of immutable chunks (no copies) and stay valid. As with
    iter_body, the pages are proven only when the iterator finishes without raising.
    """
    if header.kind != SEGMENT:
        raise ValueError(f"not a segment: {header.kind}")
    rec = PAGE_NUMBER_SIZE + header.page_size
    chunk = max(1, (1 << 20) // rec) * rec  # whole records per chunk: no straddling copies
    return _segment_pages(header, iter_body(f, header, chunk_size=chunk, encryption_key=encryption_key))


# ---------------------------------------------------------------------------- writing


class _Spool:
    """Stored payload bytes: in memory up to `limit`, then in an anonymous temp file."""

    def __init__(self, spool_dir: str | os.PathLike | None, limit: int):
        self._dir = os.fspath(spool_dir) if spool_dir is not None else None
        self._limit = limit
        self._mem = bytearray()
        self._file: Any = None
        self.size = 0
        self._hash = xxhash.xxh3_64()
        self.closed = False

    @property
    def spilled(self) -> bool:
        return self._file is not None

    @property
    def checksum(self) -> int:
        return self._hash.intdigest()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        self._hash.update(data)
        self.size += n
        if self._file is None:
            if len(self._mem) + n <= self._limit:
                self._mem += data
                return
            # unnamed (unlinked) temp file: nothing is left behind if the process dies
            import tempfile

            self._file = tempfile.TemporaryFile(dir=self._dir, prefix="replicator-spool-")
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.write(data)

    def seal(self) -> None:
        if self._file is not None:
            self._file.flush()

    def memory(self) -> bytearray:
        """The payload when it is held in memory (not spilled)."""
        assert self._file is None
        return self._mem

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Copy bytes at offset into buf; independent of any other reader."""
        if self.closed:
            raise ValueError("artefact is closed")
        n = max(0, min(buf.nbytes, self.size - offset))
        if n == 0:
            return 0
        if self._file is None:
            buf[:n] = memoryview(self._mem)[offset : offset + n]
            return n
        return os.preadv(self._file.fileno(), [buf[:n]], offset)

    def close(self) -> None:
        self.closed = True
        if self._file is not None:
            self._file.close()
        self._mem = bytearray()


class _ArtefactStream(io.RawIOBase):
    """A seekable, read-only view of prefix + spool."""

    def __init__(self, prefix: bytes, spool: _Spool):
        self._prefix, self._spool = prefix, spool
        self._size = len(prefix) + spool.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        done, pos, plen = 0, self._pos, len(self._prefix)
        if pos < plen:
            n = min(mv.nbytes, plen - pos)
            mv[:n] = self._prefix[pos : pos + n]
            done, pos = n, pos + n
        while done < mv.nbytes and pos < self._size:
            n = self._spool.readinto(pos - plen, mv[done:])
            if n <= 0:
                break
            done, pos = done + n, pos + n
        self._pos = pos
        return done


class EncodedArtefact:
    """A finished artefact: its header and its spooled payload, ready to be written or uploaded."""

    def __init__(self, header: ArtefactHeader, spool: _Spool):
        self.header = header
        self.prefix = header.encode(validate=False)  # built by a writer, which checked each value
        self._spool = spool
        self.size = len(self.prefix) + spool.size

    @property
    def spilled(self) -> bool:
        """True when the payload spilled from memory to a temp file."""
        return self._spool.spilled

    def write_to(self, f: BinaryIO) -> None:
        """Write the whole artefact (prefix + payload) to f, streaming."""
        f.write(self.prefix)
        buf = memoryview(bytearray(min(_COPY_CHUNK, max(1, self._spool.size))))
        off = 0
        while off < self._spool.size:
            n = self._spool.readinto(off, buf)
            if n <= 0:
                raise OSError("artefact spool ended early")
            f.write(buf[:n])
            off += n

    def in_memory(self) -> bytes | None:
        """The whole artefact as bytes when its payload is held in memory, else None."""
        if self._spool.spilled or self._spool.closed:
            return None
        return self.prefix + self._spool.memory()

    def open(self) -> BinaryIO:
        """A seekable readable stream of the whole artefact; valid until close()."""
        return io.BufferedReader(_ArtefactStream(self.prefix, self._spool), _COPY_CHUNK)  # type: ignore[return-value]

    def to_bytes(self) -> bytes:
        """The whole artefact in memory (for tests and small artefacts)."""
        out = io.BytesIO()
        self.write_to(out)
        return out.getvalue()

    def close(self) -> None:
        """Release the spool (removes the temp file)."""
        self._spool.close()

    def __enter__(self) -> EncodedArtefact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_codec(compression: str) -> str:
    """The codec snapshots are written with under the `compression` setting: zstd means
    independent frames (decoded in parallel by a restore), none means none."""
    return FRAMED if compression == ZSTD else compression


def _check_common(generation: str, page_size: int, codec: str, level: int) -> None:
    if type(generation) is not str or not 0 < len(generation) <= 256 or "/" in generation:
        raise ValueError(f"bad generation id {generation!r}")
    if type(page_size) is not int or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"bad page size {page_size!r}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if type(level) is not int:
        raise ValueError(f"bad compression level {level!r}")


def _check_position(db_pages: int, commit_time: float, db_checksum: int) -> None:
    if not _is_uint(db_pages, MAX_PAGE_NUMBER):
        raise ValueError(f"bad db_pages {db_pages!r}")
    if not _is_time(commit_time):
        raise ValueError(f"bad commit_time {commit_time!r}")
    if not _is_uint(db_checksum):
        raise ValueError(f"bad db_checksum {db_checksum!r}")


class _Writer:
    """Shared plumbing: compressor, spool, lifecycle."""

    def __init__(
        self,
        generation: str,
        page_size: int,
        codec: str,
        level: int,
        spool_dir: str | os.PathLike | None,
        spool_memory: int,
        threads: int = 0,
        encryption_key: EncryptionKey | None = None,
        encryption_chunk: int = encryption.DEFAULT_CHUNK,
        compressor: zstandard.ZstdCompressor | None = None,
        frame_size: int = FRAME_SIZE,
    ):
        _check_common(generation, page_size, codec, level)
        if type(frame_size) is not int or not 0 < frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"bad frame size {frame_size!r} (1..{MAX_FRAME_SIZE})")
        self._fsize = frame_size
        self.generation, self.page_size, self.codec = generation, page_size, codec
        self.level = level if codec != NONE else 0
        self._spool = _Spool(spool_dir, spool_memory)
        # compress, then encrypt (ciphertext does not compress): the sealer sits between the
        # compressor and the spool; without a key, the spool takes the compressor's output
        self._sealer = None if encryption_key is None else encryption.Sealer(encryption_key, self._spool.write, encryption_chunk)
        self._out = self._spool.write if self._sealer is None else self._sealer.write
        # a caller writing many artefacts may lend its own compressor (made with the same
        # level): a new compression context per segment costs more than compressing it
        self._cobj = self._cctx = None
        self._frames: list[int] = []
        self._pending = bytearray()  # zstd-frames: raw bytes of the frame being filled
        if codec == FRAMED:
            # each frame a one-shot compression: its header records its size, so a reader
            # knows what it decodes to before it allocates
            self._cctx = zstandard.ZstdCompressor(level=level, threads=threads)
        elif codec == ZSTD:
            cctx = compressor if compressor is not None else zstandard.ZstdCompressor(level=level, threads=threads)
            self._cobj = cctx.compressobj()
        self._raw = 0
        self._state = "open"  # open | failed | finished | closed

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"writer is {self._state}")

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        if self._cctx is not None:
            self._put_framed(data)
        else:
            self._out(self._cobj.compress(data) if self._cobj is not None else data)

    def _put_framed(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        pos, fsize, pending = 0, self._fsize, self._pending
        if pending:
            pos = min(fsize - len(pending), mv.nbytes)
            pending += mv[:pos]
            if len(pending) == fsize:
                self._emit_frame(pending)
                pending.clear()
        while mv.nbytes - pos >= fsize:
            self._emit_frame(mv[pos : pos + fsize])
            pos += fsize
        if pos < mv.nbytes:
            pending += mv[pos:]

    def _emit_frame(self, piece: bytes | bytearray | memoryview) -> None:
        assert self._cctx is not None
        frame = self._cctx.compress(piece)
        self._frames.append(len(frame))
        self._out(frame)

    def _finish(self, kind: str, first: int, last: int, txns: list[TxnInfo], created: float | None) -> EncodedArtefact:
        if self._cobj is not None:
            self._out(self._cobj.flush())
        if self._pending:
            self._emit_frame(self._pending)
            self._pending = bytearray()
        framing = {"frame_size": self._fsize, "frames": tuple(self._frames)} if self.codec == FRAMED else {}
        created = float(time.time() if created is None else created)
        enc = None
        if self._sealer is not None:
            # the last chunk binds the whole header except plen/psum, which describe the
            # stored bytes and so are known only once it is sealed
            sealer = self._sealer
            enc = Encryption(kid=sealer.key.kid, nonce=sealer.nonce, chunk=sealer.chunk)
            provisional = ArtefactHeader(
                kind=kind,
                generation=self.generation,
                first_txid=first,
                last_txid=last,
                page_size=self.page_size,
                codec=self.codec,
                level=self.level,
                created=created,
                payload_length=0,
                payload_checksum=0,
                raw_length=self._raw,
                txns=tuple(txns),
                format_version=ENCRYPTED_VERSION,
                encryption=enc,
                **framing,
            )
            digest = header_digest(provisional.to_map())
            sealer.finish(digest)
            enc = replace(enc, digest=digest)
        self._spool.seal()
        header = ArtefactHeader(
            kind=kind,
            generation=self.generation,
            first_txid=first,
            last_txid=last,
            page_size=self.page_size,
            codec=self.codec,
            level=self.level,
            created=created,
            payload_length=self._spool.size,
            payload_checksum=self._spool.checksum,
            raw_length=self._raw,
            txns=tuple(txns),
            format_version=PLAIN_VERSION if enc is None else ENCRYPTED_VERSION,
            encryption=enc,
            **framing,
        )
        try:
            art = EncodedArtefact(header, self._spool)
        except Exception:
            self.close()
            raise
        self._state = "finished"
        return art

    def close(self) -> None:
        """Discard an unfinished artefact (a finished one belongs to its EncodedArtefact)."""
        if self._state != "finished":
            self._spool.close()
            self._state = "closed"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SegmentWriter(_Writer):
    """Builds one segment; the encoded payload is spooled in memory up to spool_memory bytes,
    then to a temp file in spool_dir."""

    def __init__(
        self,
        generation: str,
        page_size: int,
        *,
        codec: str = "zstd",
        level: int = 3,
        spool_dir: str | os.PathLike | None = None,
        spool_memory: int = 8 << 20,
        encryption_key: EncryptionKey | None = None,
        encryption_chunk: int = encryption.DEFAULT_CHUNK,
        compressor: zstandard.ZstdCompressor | None = None,
    ):
        super().__init__(
            generation, page_size, codec, level, spool_dir, spool_memory,
            encryption_key=encryption_key, encryption_chunk=encryption_chunk, compressor=compressor,
        )
        self._txns: list[TxnInfo] = []
        self._batch = bytearray()

    @property
    def txn_count(self) -> int:
        return len(self._txns)

    @property
    def raw_length(self) -> int:
        """Uncompressed body bytes so far (for size-based cutting)."""
        return self._raw + len(self._batch)

    def add_txn(
        self,
        txid: int,
        pages: Iterable[tuple[int, bytes | bytearray | memoryview]],
        *,
        db_pages: int,
        commit_time: float,
        db_checksum: int,
    ) -> None:
        """Append one transaction. pages: (page number, image), sorted, unique, page_size each.

        A ValueError part-way through leaves the writer failed (its payload is unusable).
        """
        self._check_open()
        if self._txns:
            if txid != self._txns[-1].txid + 1:
                raise ValueError(f"txid {txid} does not follow {self._txns[-1].txid}")
        elif not _is_uint(txid):
            raise ValueError(f"bad txid {txid!r}")
        # the usual case inline (this runs for every transaction); the call names what is wrong
        if not (
            type(db_pages) is int and 0 <= db_pages <= MAX_PAGE_NUMBER
            and type(db_checksum) is int and 0 <= db_checksum <= MAX_UINT64
            and type(commit_time) is float and math.isfinite(commit_time)
        ):
            _check_position(db_pages, commit_time, db_checksum)
        self._state = "failed"  # until the whole transaction is in
        psize, batch, pack = self.page_size, self._batch, _PGNO.pack
        prev = count = 0
        room = _BATCH - len(batch)  # bytes the batch takes before it is flushed
        for pgno, data in pages:
            if type(pgno) is not int or not prev < pgno <= MAX_PAGE_NUMBER:
                raise ValueError(f"txid {txid}: page number {pgno!r} after {prev} (must increase, 1..{MAX_PAGE_NUMBER})")
            if len(data) != psize or (type(data) is not bytes and memoryview(data).nbytes != psize):
                raise ValueError(f"txid {txid}: page {pgno} has {len(data)} bytes, not {psize}")
            batch += pack(pgno)
            batch += data
            room -= psize + 4
            if room <= 0:
                self._flush_batch()
                room = _BATCH
            prev = pgno
            count += 1
        self._txns.append(TxnInfo(txid, count, db_pages, float(commit_time), db_checksum))
        self._state = "open"

    def _flush_batch(self) -> None:
        if self._batch:
            self._put(self._batch)
            self._raw += len(self._batch)
            self._batch.clear()

    def finish(self, created: float | None = None) -> EncodedArtefact:
        """Seal the segment. An empty segment (no transactions) is a ValueError."""
        self._check_open()
        if not self._txns:
            raise ValueError("empty segment: add at least one transaction")
        self._flush_batch()
        return self._finish(SEGMENT, self._txns[0].txid, self._txns[-1].txid, self._txns, created)


class SnapshotWriter(_Writer):
    """Builds one snapshot from the raw database image, written in page order from page 1."""

    def __init__(
        self,
        generation: str,
        txid: int,
        page_size: int,
        *,
        codec: str = FRAMED,
        level: int = 3,
        spool_dir: str | os.PathLike | None = None,
        spool_memory: int = 8 << 20,
        threads: int = 0,
        encryption_key: EncryptionKey | None = None,
        encryption_chunk: int = encryption.DEFAULT_CHUNK,
        frame_size: int = FRAME_SIZE,
    ):
        if not _is_uint(txid):
            raise ValueError(f"bad txid {txid!r}")
        super().__init__(
            generation, page_size, codec, level, spool_dir, spool_memory, threads,
            encryption_key=encryption_key, encryption_chunk=encryption_chunk, frame_size=frame_size,
        )
        self.txid = txid
        self._checksum = 0

    @property
    def pages_written(self) -> int:
        return self._raw // self.page_size

    @property
    def db_checksum(self) -> int:
        """Checksum of the pages written so far."""
        return self._checksum

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append consecutive raw pages (any whole number of pages)."""
        self._check_open()
        mv = memoryview(data).cast("B")
        if mv.nbytes % self.page_size:
            raise ValueError(f"{mv.nbytes} bytes is not a whole number of {self.page_size}-byte pages")
        self._checksum ^= db_checksum_of_image(mv, self.page_size, first_page=self.pages_written + 1)
        self._state = "failed"
        for off in range(0, mv.nbytes, 4 * _BATCH):
            self._put(mv[off : off + 4 * _BATCH])
        self._raw += mv.nbytes
        self._state = "open"

    def finish(
        self,
        *,
        db_pages: int,
        commit_time: float,
        db_checksum: int | None = None,
        created: float | None = None,
    ) -> EncodedArtefact:
        """Seal the snapshot. db_checksum, if given, must equal the checksum of the pages written."""
        self._check_open()
        checksum = self._checksum if db_checksum is None else db_checksum
        _check_position(db_pages, commit_time, checksum)
        if db_pages * self.page_size != self._raw:
            raise ValueError(f"db_pages {db_pages} but {self.pages_written} pages were written")
        if checksum != self._checksum:
            raise ValueError("db_checksum does not match the pages written")
        txn = TxnInfo(self.txid, db_pages, db_pages, float(commit_time), checksum)
        return self._finish(SNAPSHOT, self.txid, self.txid, [txn], created)


# ---------------------------------------------------------------------------- whole-buffer helpers


def encode_segment(
    generation: str,
    page_size: int,
    txns: Iterable[tuple],
    *,
    codec: str = "zstd",
    level: int = 3,
    created: float | None = None,
    encryption_key: EncryptionKey | None = None,
    encryption_chunk: int = encryption.DEFAULT_CHUNK,
) -> bytes:
    """A whole segment as bytes. Each txn is (txid, db_pages, commit_time, db_checksum, pages),
    (txid, page_count, db_pages, commit_time, db_checksum, pages) or (TxnInfo, pages)."""
    with SegmentWriter(
        generation, page_size, codec=codec, level=level, spool_memory=1 << 62,
        encryption_key=encryption_key, encryption_chunk=encryption_chunk,
    ) as w:
        for t in txns:
            if len(t) == 2 and isinstance(t[0], TxnInfo):
                info, pages = t
                txid, count, db_pages, commit_time, db_checksum = (
                    info.txid, info.page_count, info.db_pages, info.commit_time, info.db_checksum)
            elif len(t) == 6:
                txid, count, db_pages, commit_time, db_checksum, pages = t
            else:
                txid, db_pages, commit_time, db_checksum, pages = t
                count = None
            pages = list(pages)
            if count is not None and count != len(pages):
                raise ValueError(f"txid {txid}: page_count {count} but {len(pages)} pages")
            w.add_txn(txid, pages, db_pages=db_pages, commit_time=commit_time, db_checksum=db_checksum)
        with w.finish(created) as art:
            return art.to_bytes()


def encode_snapshot(
    generation: str,
    txid: int,
    page_size: int,
    image: bytes | bytearray | memoryview,
    *,
    commit_time: float,
    db_checksum: int | None = None,
    codec: str = FRAMED,
    level: int = 3,
    created: float | None = None,
    encryption_key: EncryptionKey | None = None,
    encryption_chunk: int = encryption.DEFAULT_CHUNK,
    frame_size: int = FRAME_SIZE,
) -> bytes:
    """A whole snapshot of image as bytes (db_checksum defaults to the image's own)."""
    mv = memoryview(image).cast("B")
    with SnapshotWriter(
        generation, txid, page_size, codec=codec, level=level, spool_memory=1 << 62,
        encryption_key=encryption_key, encryption_chunk=encryption_chunk, frame_size=frame_size,
    ) as w:
        w.write(mv)
        with w.finish(
            db_pages=mv.nbytes // page_size, commit_time=commit_time, db_checksum=db_checksum, created=created
        ) as art:
            return art.to_bytes()


def decode(
    buf: bytes | bytearray | memoryview, *, encryption_key: EncryptionKey | None = None
) -> tuple[ArtefactHeader, bytes]:
    """A whole artefact to (header, raw body), fully verified (segment structure included)."""
    mv = memoryview(buf).cast("B")
    header = parse_header_bytes(mv)
    f = io.BytesIO(mv[header_end(mv) :])
    chunks: list[bytes] = []

    def collect() -> Iterator[bytes]:
        for c in iter_body(f, header, encryption_key=encryption_key):
            chunks.append(c)
            yield c

    if header.kind == SEGMENT:
        for _ in _segment_pages(header, collect()):
            pass
    else:
        for _ in collect():
            pass
    return header, b"".join(chunks)
