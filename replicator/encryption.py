"""Client-side encryption of artefact payloads: AES-256-GCM over independent chunks.

The construction is specified in docs/format.md ("Encryption"); in short: the compressed
payload is cut into chunks of `chunk` bytes (the last one shorter), and chunk i is sealed
with AES-256-GCM under nonce = base XOR i (the base is 96 random bits per artefact) and
associated data that carries i, whether it is the last chunk, and, for the last chunk, the
SHA-256 of the header (without `plen`/`psum`). Each stored chunk is its ciphertext followed
by the 16-byte tag. Memory stays bounded by one chunk on both sides.

This module knows keys and chunks; replicator.artefact uses it for the header and stream.
"""

from __future__ import annotations

import base64
import binascii
import os
import string
from typing import Callable

# cryptography (with OpenSSL: about 7 MiB of RSS) is imported when a key is first used, so
# that an agent without encryption does not carry it

ALG = "A256GCM"
KEY_SIZE = 32
KID_SIZE = 8  # bytes of SHA-256(key) in the key id
NONCE_SIZE = 12
TAG_SIZE = 16
DEFAULT_CHUNK = 1 << 20  # compressed bytes per chunk
MAX_CHUNK = 64 << 20  # a reader buffers one chunk
MAX_CHUNKS = 1 << 32  # the chunk counter is XORed into the low 32 bits of the nonce
AAD_PREFIX = b"RPL-A256GCM\x00"
_MAX_KEY_FILE = 4096
_HEX = frozenset(string.hexdigits.encode())

KEY_FORMATS = "32 random bytes: raw (exactly 32 bytes), 64 hex digits, or base64 of 32 bytes"


class KeyFormatError(ValueError):
    """Key material that is not a 256-bit key; the message never contains the material."""


def key_id(key: bytes) -> str:
    """The key's id: the first 8 bytes of SHA-256(key), as 16 lower-case hex digits."""
    import hashlib  # here: a restore of unencrypted artefacts never needs it

    return hashlib.sha256(key).digest()[:KID_SIZE].hex()


def parse_key_text(text: str | bytes) -> bytes:
    """A key written as text: 64 hex digits or base64 (standard or URL-safe) of 32 bytes,
    surrounding whitespace ignored."""
    data = (text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)).strip()
    if len(data) == 2 * KEY_SIZE and all(c in _HEX for c in data):
        return bytes.fromhex(data.decode("ascii"))
    if 40 <= len(data) <= 48:
        try:
            raw = base64.b64decode(data.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == KEY_SIZE:
            return raw
    raise KeyFormatError(f"expected {KEY_FORMATS}")


def parse_key_file_bytes(data: bytes) -> bytes:
    """The contents of a key file: exactly 32 raw bytes, else parse_key_text."""
    if len(data) == KEY_SIZE:
        return bytes(data)
    try:
        return parse_key_text(data)
    except KeyFormatError:
        raise KeyFormatError(f"expected {KEY_FORMATS} (the file holds {len(data)} bytes)") from None


def read_key_file(path: str | os.PathLike) -> "EncryptionKey":
    """Read a key file. Raises KeyFormatError or OSError; neither names the key's bytes."""
    with open(path, "rb") as f:
        data = f.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFormatError(f"expected {KEY_FORMATS} (the file holds more than {_MAX_KEY_FILE} bytes)")
    return EncryptionKey(parse_key_file_bytes(data), origin=os.fspath(path))


class EncryptionKey:
    """A 256-bit AES-GCM key and its id. repr and str show only the id."""

    __slots__ = ("_aead", "kid", "origin")

    def __init__(self, key: bytes, *, origin: str = ""):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise KeyFormatError(f"an AES-256 key is {KEY_SIZE} bytes")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(bytes(key))
        self.kid = key_id(bytes(key))
        self.origin = origin  # where it came from (a path), for messages

    def __repr__(self) -> str:
        return f"EncryptionKey(kid={self.kid})"

    __str__ = __repr__

    @staticmethod
    def generate() -> "EncryptionKey":
        return EncryptionKey(os.urandom(KEY_SIZE))  # what AESGCM.generate_key does

    def seal(self, nonce: bytes, data, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, data, aad)

    def open(self, nonce: bytes, data, aad: bytes) -> bytes:
        """Decrypt and authenticate; raises cryptography.exceptions.InvalidTag."""
        return self._aead.decrypt(nonce, data, aad)


def chunk_nonce(base: int, index: int) -> bytes:
    """Nonce of chunk `index`: the 96-bit base nonce XOR the index (index < 2**32)."""
    return (base ^ index).to_bytes(NONCE_SIZE, "big")


def chunk_aad(index: int, final: bool, header_digest: bytes = b"") -> bytes:
    """Associated data of chunk `index`; the final chunk also carries the header digest."""
    return AAD_PREFIX + index.to_bytes(4, "big") + (b"\x01" + header_digest if final else b"\x00")


def stored_length(plain_length: int, chunk: int) -> int:
    """Stored bytes for plain_length payload bytes: every chunk (at least one) adds a tag."""
    chunks = max(1, -(-plain_length // chunk))
    return plain_length + chunks * TAG_SIZE


def valid_stored_length(stored: int, chunk: int) -> bool:
    """True when `stored` bytes can be a sequence of sealed chunks of this chunk size."""
    if stored < TAG_SIZE:
        return False
    full = chunk + TAG_SIZE
    chunks = -(-stored // full)
    last = stored - (chunks - 1) * full
    return last >= TAG_SIZE and (chunks == 1 or last > TAG_SIZE) and chunks <= MAX_CHUNKS


class Sealer:
    """Cuts a byte stream into chunks and hands each sealed chunk to `sink` (writer side).

    Holds at most one chunk: a chunk is sealed only once a byte after it has arrived, so
    the last chunk, sealed by finish(), is never empty unless the whole stream is.
    """

    def __init__(self, key: EncryptionKey, sink: Callable[[bytes], None], chunk: int = DEFAULT_CHUNK):
        if type(chunk) is not int or not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"bad encryption chunk size {chunk!r} (1..{MAX_CHUNK})")
        self.key = key
        self.chunk = chunk
        self.nonce = os.urandom(NONCE_SIZE)
        self._base = int.from_bytes(self.nonce, "big")
        self._sink = sink
        self._buf = bytearray()
        self._index = 0

    def _seal(self, data, final: bool, digest: bytes = b"") -> None:
        if self._index >= MAX_CHUNKS:
            raise ValueError("artefact too large to encrypt: more than 2**32 chunks")
        i = self._index
        self._sink(self.key.seal(chunk_nonce(self._base, i), data, chunk_aad(i, final, digest)))
        self._index = i + 1

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        n, chunk, pos = mv.nbytes, self.chunk, 0
        if not n:
            return
        if self._buf:
            pos = min(chunk - len(self._buf), n)
            self._buf += mv[:pos]
            if pos == n:
                return  # the buffer may be the last chunk: keep it
            self._seal(self._buf, False)
            self._buf = bytearray()
        while n - pos > chunk:
            self._seal(mv[pos : pos + chunk], False)
            pos += chunk
        self._buf += mv[pos:]

    def finish(self, header_digest: bytes) -> None:
        """Seal the last chunk, bound to the header digest."""
        self._seal(bytes(self._buf), True, header_digest)
        self._buf = bytearray()


class Opener:
    """Reads sealed chunks from `read_stored` and returns authenticated plaintext (reader side).

    read_stored(n) returns up to n stored bytes (fewer only at the end); is_end() says whether
    the stored payload ends after what was read. On an authentication failure, `problem` is
    set and reads return b"": nothing unauthenticated is ever returned.
    """

    def __init__(self, key: EncryptionKey, nonce: bytes, chunk: int, header_digest: bytes,
                 read_stored: Callable[[int], bytes], is_end: Callable[[], bool]):
        self.key = key
        self._base = int.from_bytes(nonce, "big")
        self._stored = chunk + TAG_SIZE
        self._digest = header_digest
        self._read = read_stored
        self._is_end = is_end
        self._index = 0
        self._plain = b""
        self._pos = 0
        self.problem: str | None = None
        self.finished = False  # the final chunk was authenticated

    def _next(self) -> None:
        parts, got = [], 0
        while got < self._stored:
            b = self._read(self._stored - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        if not got:
            if not self.finished:
                self.problem = "authentication failed: damaged or tampered (the last chunk is missing)"
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        final = self._is_end()
        i = self._index
        from cryptography.exceptions import InvalidTag

        try:
            self._plain = self.key.open(chunk_nonce(self._base, i), data, chunk_aad(i, final, self._digest if final else b""))
        except InvalidTag:
            self.problem = "authentication failed: damaged or tampered"
            return
        self._pos = 0
        self._index = i + 1
        self.finished = final

    def read(self, n: int = -1):
        """Up to n plaintext bytes (a memoryview of an immutable buffer); b"" at the end."""
        while self._pos >= len(self._plain):
            if self.finished or self.problem:
                return b""
            self._next()
            if self.problem:
                return b""
        left = len(self._plain) - self._pos
        if n < 0 or n > left:
            n = left
        out = memoryview(self._plain)[self._pos : self._pos + n]
        self._pos += n
        return out


def __getattr__(name: str):
    if name == "InvalidTag":
        from cryptography.exceptions import InvalidTag

        return InvalidTag
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALG",
    "DEFAULT_CHUNK",
    "EncryptionKey",
    "InvalidTag",
    "KeyFormatError",
    "Opener",
    "Sealer",
    "key_id",
    "parse_key_file_bytes",
    "parse_key_text",
    "read_key_file",
]

