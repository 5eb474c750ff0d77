"""Client-side encryption of artefacts (AES-256-GCM, docs/format.md "Encryption"): round
trips, every class of damage or tampering, keys and their configuration, and an end-to-end
replicate / restore with a real agent process."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
import xxhash

from harness import AgentProcess, assert_same_pages, checkpoint, cli, env, integrity, replica_keys, wait_for, write
from replicator import artefact as A
from replicator import encryption as E
from replicator.artefact import ArtefactError
from replicator.config import ConfigError, encryption_key_of, load_config, load_encryption_key, parse_config
from replicator.encryption import EncryptionKey

GEN = "20261122T171656939519Z-ea5f"
CANARY = b"PLAINTEXT-CANARY-7f3a9c-"  # a distinctive page pattern that must never be stored in clear
TAG = E.TAG_SIZE


@pytest.fixture(scope="module")
def key() -> EncryptionKey:
    return EncryptionKey(bytes(range(32)))


@pytest.fixture(scope="module")
def other_key() -> EncryptionKey:
    return EncryptionKey(bytes(range(1, 33)))


def image(pages: int, page_size: int = 4096, *, seed: int = 1, compressible: bool = True) -> bytes:
    """Pages that each hold the canary, then compressible text or random bytes."""
    rng = random.Random(seed)
    out = []
    for p in range(pages):
        head = CANARY * 4
        if compressible:
            body = (b"row %d alpha beta gamma " % rng.randrange(1000)) * (page_size // 16)
        else:
            body = rng.randbytes(page_size)
        out.append((head + body)[:page_size])
    return b"".join(out)


def segment_txns(count: int = 5, per_txn: int = 6, page_size: int = 4096, *, compressible: bool = True) -> list[tuple]:
    rng = random.Random(3)
    txns = []
    for i in range(count):
        pgnos = sorted(rng.sample(range(1, 200), per_txn))
        pages = [(p, image(1, page_size, seed=1000 * i + p, compressible=compressible)) for p in pgnos]
        txns.append((i + 1, 200, 1_700_000_000.5 + i, rng.getrandbits(64), pages))
    return txns


def segment_body(txns) -> bytes:
    return b"".join(p.to_bytes(4, "big") + data for t in txns for p, data in t[4])


def split(art: bytes) -> tuple[dict, bytes]:
    end = A.header_end(art)
    return cbor2.loads(art[A.PREFIX_SIZE : end - 8]), art[end:]


def frame(m: dict, payload: bytes, *, fix_sum: bool = True) -> bytes:
    """Re-frame a header map and payload; fix_sum recomputes plen and psum (a tamperer can)."""
    if fix_sum:
        m = {**m, "plen": len(payload), "psum": xxhash.xxh3_64_intdigest(payload)}
    body = cbor2.dumps(m, canonical=True)
    return A.MAGIC + len(body).to_bytes(4, "big") + body + xxhash.xxh3_64_digest(body) + payload


def stream_decode(art: bytes, k: EncryptionKey | None, chunk_size: int = 7777) -> bytes:
    f = io.BytesIO(art)
    h = A.read_header(f)
    if h.kind == A.SEGMENT:
        return b"".join(p.to_bytes(4, "big") + bytes(mv) for _, p, mv in A.iter_segment_pages(f, h, encryption_key=k))
    return b"".join(A.iter_body(f, h, chunk_size=chunk_size, encryption_key=k))


def both_raise(art: bytes, k: EncryptionKey | None, match: str) -> None:
    with pytest.raises(ArtefactError, match=match) as info:
        A.decode(art, encryption_key=k)
    assert "\n" not in str(info.value)
    with pytest.raises(ArtefactError, match=match):
        stream_decode(art, k)


def chunks_of(payload: bytes, chunk: int) -> list[bytes]:
    full = chunk + TAG
    return [payload[i : i + full] for i in range(0, len(payload), full)]


def snapshot(k, codec="zstd", pages=10, chunk=E.DEFAULT_CHUNK, **kw) -> bytes:
    return A.encode_snapshot(
        GEN, 7, 4096, image(pages, **kw), commit_time=1_700_000_000.0, codec=codec,
        encryption_key=k, encryption_chunk=chunk,
    )


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("chunk", [E.DEFAULT_CHUNK, 4096, 1000])
def test_snapshot_round_trip(key, codec, chunk):
    img = image(40)
    art = A.encode_snapshot(GEN, 7, 4096, img, commit_time=1.5, codec=codec, encryption_key=key, encryption_chunk=chunk)
    h, body = A.decode(art, encryption_key=key)
    assert body == img
    assert (h.format_version, h.encryption.kid, h.encryption.alg, h.encryption.chunk) == (2, key.kid, "A256GCM", chunk)
    assert len(h.encryption.nonce) == 12
    assert stream_decode(art, key) == img
    assert stream_decode(art, key, chunk_size=1 << 20) == img
    if codec == "none":
        assert h.payload_length == E.stored_length(len(img), chunk)


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("chunk", [E.DEFAULT_CHUNK, 4096, 333])
def test_segment_round_trip(key, codec, chunk):
    txns = segment_txns()
    art = A.encode_segment(GEN, 4096, txns, codec=codec, encryption_key=key, encryption_chunk=chunk)
    h, body = A.decode(art, encryption_key=key)
    assert body == segment_body(txns)
    assert stream_decode(art, key) == body
    assert (h.first_txid, h.last_txid, h.format_version, h.encryption.kid) == (1, 5, 2, key.kid)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_multi_chunk_with_the_default_chunk_size(key, codec):
    """More than two 1 MiB chunks of compressed bytes: incompressible pages."""
    img = image(900, compressible=False)  # 3.5 MiB
    art = A.encode_snapshot(GEN, 7, 4096, img, commit_time=1.5, codec=codec, encryption_key=key)
    h, payload = split(art)
    assert len(chunks_of(payload, E.DEFAULT_CHUNK)) > 2
    assert A.decode(art, encryption_key=key)[1] == img
    assert stream_decode(art, key) == img
    txns = segment_txns(count=6, per_txn=150, compressible=False)  # 3.5 MiB of pages
    seg = A.encode_segment(GEN, 4096, txns, codec=codec, encryption_key=key)
    assert len(chunks_of(split(seg)[1], E.DEFAULT_CHUNK)) > 2
    assert stream_decode(seg, key) == segment_body(txns)


def test_chunk_boundaries(key):
    """A body of exactly n chunks seals n chunks (the last one full, never an empty extra);
    an empty body seals one empty chunk."""
    for pages in (1, 3):
        art = A.encode_snapshot(GEN, 0, 4096, image(pages), commit_time=1.0, codec="none", encryption_key=key, encryption_chunk=4096)
        m, payload = split(art)
        assert len(payload) == pages * (4096 + TAG)
        assert A.decode(art, encryption_key=key)[1] == image(pages)
    for codec in ("none", "zstd"):
        empty = A.encode_snapshot(GEN, 0, 4096, b"", commit_time=1.0, codec=codec, encryption_key=key)
        h, body = A.decode(empty, encryption_key=key)
        assert body == b"" and h.db_pages == 0
    assert len(split(A.encode_snapshot(GEN, 0, 4096, b"", commit_time=1.0, codec="none", encryption_key=key))[1]) == TAG


def test_streaming_writer_with_spill_to_disk(key, tmp_path):
    img = image(300, compressible=False)
    with A.SnapshotWriter(GEN, 3, 4096, codec="none", spool_dir=tmp_path, spool_memory=1 << 16, encryption_key=key,
                          encryption_chunk=50_000) as w:
        for off in range(0, len(img), 4096 * 7):
            w.write(img[off : off + 4096 * 7])
        with w.finish(db_pages=300, commit_time=2.0) as art:
            assert art.spilled
            data = art.to_bytes()
            with art.open() as f:
                h = A.read_header(f)
                assert b"".join(A.iter_body(f, h, encryption_key=key)) == img
    assert CANARY not in data
    assert A.decode(data, encryption_key=key)[1] == img


def test_header_carries_kid_and_version_2_and_no_plaintext_is_stored(key):
    for codec in ("none", "zstd"):
        plain = snapshot(None, codec)
        enc = snapshot(key, codec)
        m, _ = split(enc)
        assert m["v"] == 2
        assert m["enc"] == {"alg": "A256GCM", "kid": key.kid, "nonce": m["enc"]["nonce"], "chunk": E.DEFAULT_CHUNK}
        assert key.kid == hashlib.sha256(bytes(range(32))).digest()[:8].hex()
        if codec == "none":
            assert CANARY in plain  # the pattern is what an unencrypted artefact shows
        assert CANARY not in enc and CANARY[:12] not in enc
        seg = A.encode_segment(GEN, 4096, segment_txns(), codec=codec, encryption_key=key)
        assert CANARY[:12] not in seg
    # unencrypted artefacts stay version 1, with no enc key: every existing reader reads them
    m, _ = split(snapshot(None))
    assert m["v"] == 1 and "enc" not in m
    assert A.decode(snapshot(None), encryption_key=key)[1] == image(10)  # a key does not hurt


def test_each_artefact_gets_its_own_nonce(key):
    a, b = snapshot(key, "none"), snapshot(key, "none")
    (ma, pa), (mb, pb) = split(a), split(b)
    assert ma["enc"]["nonce"] != mb["enc"]["nonce"]
    assert pa != pb


# ---------------------------------------------------------------------------- keys and damage


def test_missing_key(key):
    art = snapshot(key)
    both_raise(art, None, rf"artefact is encrypted \(key id {key.kid}\): configure encryption-key-path")


def test_wrong_key(key, other_key):
    art = A.encode_segment(GEN, 4096, segment_txns(), encryption_key=key)
    both_raise(art, other_key, f"key id {key.kid} does not match the configured key's id {other_key.kid}")


def test_kid_rewritten_to_the_other_key_fails_authentication(key, other_key):
    m, payload = split(snapshot(key))
    m["enc"]["kid"] = other_key.kid
    both_raise(frame(m, payload), other_key, "authentication failed: damaged or tampered")


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_flipped_ciphertext_byte(key, codec):
    art = snapshot(key, codec, pages=12, chunk=4096, compressible=False)
    m, payload = split(art)
    n = len(chunks_of(payload, 4096))
    assert n > 2
    for pos in (0, 4096 + TAG + 5, len(payload) - TAG - 1, len(payload) - 1):  # first, middle, last chunk, last tag
        bad = bytearray(payload)
        bad[pos] ^= 0x40
        # damage in storage or transfer: the payload checksum catches it, before decryption
        both_raise(frame(m, bytes(bad), fix_sum=False), key, "payload checksum mismatch")
        # tampering (psum recomputed): authentication catches it
        both_raise(frame(m, bytes(bad)), key, "authentication failed: damaged or tampered")


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_truncated_last_chunk(key, codec):
    art = snapshot(key, codec, pages=12, chunk=4096, compressible=False)
    m, payload = split(art)
    both_raise(art[:-10], key, r"truncated: payload has \d+ of \d+ bytes")
    if codec == "zstd":
        cut = min(10, len(chunks_of(payload, 4096)[-1]) - TAG - 1)  # keep a valid chunk layout
        assert cut >= 1
        both_raise(frame(m, payload[:-cut]), key, "authentication failed: damaged or tampered")
    else:  # codec none: plen is fixed by rlen, and the header says so first
        both_raise(frame(m, payload[:-10]), key, "header field 'plen' inconsistent")
    # the whole last chunk dropped: the one before it was not sealed as the last
    last = len(payload) - len(chunks_of(payload, 4096)[-1])
    if codec == "zstd":
        both_raise(frame(m, payload[:last]), key, "authentication failed: damaged or tampered")
    shorter = {**m, "txns": [[7, 11, 11, m["txns"][0][3], m["txns"][0][4]]], "rlen": 11 * 4096}
    both_raise(frame(shorter, payload[: 11 * (4096 + TAG)]), key, "authentication failed: damaged or tampered")


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_swapped_chunks(key, codec):
    art = snapshot(key, codec, pages=12, chunk=4096, compressible=False)
    m, payload = split(art)
    c = chunks_of(payload, 4096)
    assert len(c) > 3
    both_raise(frame(m, b"".join([c[1], c[0], *c[2:]])), key, "authentication failed: damaged or tampered")
    both_raise(frame(m, b"".join([*c[:-3], c[-2], c[-3], c[-1]])), key, "authentication failed: damaged or tampered")
    both_raise(frame(m, b"".join([c[0], c[0], *c[2:]])), key, "authentication failed: damaged or tampered")


def test_header_fields_are_bound_to_the_payload(key):
    """A tamperer who rewrites the header (and its checksum, plen, psum) is caught: the last
    chunk binds every header field but plen and psum."""
    txns = segment_txns()
    art = A.encode_segment(GEN, 4096, txns, encryption_key=key, encryption_chunk=1000)
    m, payload = split(art)

    def changed(fn):
        mm = cbor2.loads(cbor2.dumps(m))
        fn(mm)
        return frame(mm, payload)

    for fn in (
        lambda mm: mm["txns"][2].__setitem__(4, mm["txns"][2][4] ^ 1),  # a recorded db checksum
        lambda mm: mm["txns"][4].__setitem__(2, 150),  # db_pages of the last txn
        lambda mm: mm.update(created=mm["created"] + 1),
        lambda mm: mm.update(gen=GEN[:-1] + "0"),
        lambda mm: mm.update(level=9),
        lambda mm: mm.update(extra="unknown keys are bound too"),
        lambda mm: mm["enc"].update(nonce=bytes(12)),
    ):
        both_raise(changed(fn), key, "authentication failed: damaged or tampered")
    both_raise(changed(lambda mm: mm["enc"].update(chunk=999)), key, "authentication failed|header field 'plen'")
    assert A.decode(frame(m, payload), encryption_key=key)[1] == segment_body(txns)  # the unchanged frame is fine


def test_payload_of_another_artefact_is_refused(key):
    """Two snapshots of the same image under one key: the payloads have equal lengths but
    different nonces, so one cannot pass for the other."""
    a, b = snapshot(key, "none"), snapshot(key, "none")
    ma, _ = split(a)
    _, pb = split(b)
    both_raise(frame(ma, pb), key, "authentication failed: damaged or tampered")


def test_malformed_enc_headers(key):
    art = snapshot(key)
    m, payload = split(art)
    for bad in ({"alg": "A256GCM"}, "x", {**m["enc"], "nonce": b"short"}, {**m["enc"], "kid": "ABC"},
                {**m["enc"], "chunk": 0}, {**m["enc"], "chunk": 1 << 40}):
        both_raise(frame({**m, "enc": bad}, payload), key, "header field 'enc' missing or malformed")
    both_raise(frame({**m, "enc": {**m["enc"], "alg": "XCHACHA"}}, payload), key, "unsupported encryption 'XCHACHA'")
    both_raise(frame({k: v for k, v in m.items() if k != "enc"}, payload), key, "header field 'enc' missing or malformed")
    both_raise(frame({**m, "v": 1}, payload), key, "header field 'enc' needs format version 2")


def test_an_older_reader_refuses_an_encrypted_artefact(key, monkeypatch):
    """A version-1 reader rejects version 2 cleanly instead of misreading the ciphertext."""
    monkeypatch.setattr(A, "FORMAT_VERSION", 1)
    both_raise(snapshot(key), key, r"unsupported format version 2 \(this replicator reads 1\)")


def test_restore_fails_cleanly_and_leaves_nothing(key, other_key, tmp_path):
    from replicas import open_driver
    from replicator import keys
    from replicator.restore import RestoreError, restore

    root = tmp_path / "replica"
    img = image(30)
    art = A.encode_snapshot(GEN, 0, 4096, img, commit_time=1.0, encryption_key=key)
    path = root / keys.snapshot_key(GEN, 0, 1000)
    path.parent.mkdir(parents=True)
    path.write_bytes(art)
    driver = open_driver(f"file://{root}")
    out = tmp_path / "out" / "db"
    for k, match in ((None, "is encrypted"), (other_key, "does not match the configured key's id")):
        with pytest.raises(RestoreError, match=match) as info:
            restore(driver, out, encryption_key=k)
        assert str(info.value).startswith(keys.snapshot_key(GEN, 0, 1000) + ": ")
        assert not out.exists() and list(out.parent.iterdir()) == []
    # with the key it decrypts and verifies; these fake pages then fail integrity_check
    with pytest.raises(RestoreError, match="integrity_check"):
        restore(driver, out, encryption_key=key)
    assert not out.exists()


# ---------------------------------------------------------------------------- key material


def test_key_formats(tmp_path):
    raw = bytes(range(32))
    assert E.parse_key_file_bytes(raw) == raw
    assert E.parse_key_file_bytes(b"\n" * 32) == b"\n" * 32  # 32 bytes are always a raw key
    assert E.parse_key_file_bytes(raw.hex().encode() + b"\n") == raw
    assert E.parse_key_file_bytes(raw.hex().upper().encode()) == raw
    assert E.parse_key_file_bytes(base64.b64encode(raw) + b"\n") == raw
    assert E.parse_key_file_bytes(base64.urlsafe_b64encode(raw)) == raw
    for bad in (b"", b"x" * 31, b"x" * 33, raw.hex()[:-2].encode(), base64.b64encode(raw[:31]), b"z" * 64, b"\xff" * 4000):
        with pytest.raises(E.KeyFormatError, match="expected 32 random bytes") as info:
            E.parse_key_file_bytes(bad)
        assert f"holds {len(bad)} bytes" in str(info.value)
    k = EncryptionKey(raw)
    assert k.kid == hashlib.sha256(raw).hexdigest()[:16]
    assert raw.hex() not in repr(k) and repr(k) == f"EncryptionKey(kid={k.kid})"


def test_load_encryption_key_errors_are_one_line_and_never_show_the_key(tmp_path):
    f = tmp_path / "key"
    secret = "s3cr3t-" * 5
    f.write_text(secret + "\n")
    with pytest.raises(ConfigError) as info:
        load_encryption_key(f)
    msg = str(info.value)
    assert msg.startswith(f"encryption-key-path {f}: expected 32 random bytes: raw (exactly 32 bytes), 64 hex digits, or base64")
    assert "s3cr3t" not in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=rf"encryption-key-path {tmp_path}/nope: cannot read the key file \(No such file"):
        load_encryption_key(tmp_path / "nope")
    f.write_bytes(os.urandom(32))
    assert load_encryption_key(f).kid == E.key_id(f.read_bytes())


# ---------------------------------------------------------------------------- configuration


def cfg(text: str, environ=None):
    return parse_config(text, source=Path("/etc/replicator.yml"), environ=environ or {})


def test_config_key_path_global_and_per_db(tmp_path):
    c = cfg(
        "encryption-key-path: keys/global\n"
        "dbs:\n"
        "  - path: /d/a.db\n    replicas: [{url: /r/a}]\n"
        "  - path: /d/b.db\n    encryption-key-path: /k/b\n    replicas: [{url: /r/b}]\n"
        "  - path: /d/c.db\n    encryption-key: ${K}\n    replicas: [{url: /r/c}]\n",
        {"K": "ab" * 32},
    )
    a, b, c_ = c.dbs
    assert a.encryption_key_path == Path("/etc/keys/global") and a.encryption_key is None
    assert b.encryption_key_path == Path("/k/b")
    assert c_.encryption_key_path is None and c_.encryption_key == bytes.fromhex("ab" * 32)  # replaces the inherited path
    assert "ab" * 32 not in repr(c_)
    assert encryption_key_of(c_).kid == E.key_id(bytes.fromhex("ab" * 32))
    plain = cfg("dbs: [{path: /d/a.db, replicas: [{url: /r}]}]").dbs[0]
    assert plain.encryption_key_path is None and plain.encryption_key is None and encryption_key_of(plain) is None
    # a key file is read only when needed: configs naming a missing one still parse
    with pytest.raises(ConfigError, match="encryption-key-path /etc/keys/global: cannot read the key file"):
        encryption_key_of(a)


def test_config_both_key_and_key_path_is_an_error():
    with pytest.raises(ConfigError) as info:
        cfg("encryption-key-path: /k\nencryption-key: ${K}\ndbs: [{path: /d/a.db, replicas: [{url: /r}]}]", {"K": "ab" * 32})
    assert str(info.value) == (
        "/etc/replicator.yml: encryption-key: give either encryption-key-path (a key file) or encryption-key, not both"
    )
    with pytest.raises(ConfigError, match=r"dbs\[0\]\.encryption-key: give either"):
        cfg("dbs: [{path: /d/a.db, encryption-key-path: /k, encryption-key: '" + "ab" * 32 + "', replicas: [{url: /r}]}]")


def test_config_bad_key_value_is_not_echoed():
    with pytest.raises(ConfigError) as info:
        cfg("encryption-key: ${K}\ndbs: [{path: /d/a.db, replicas: [{url: /r}]}]", {"K": "not-a-key-at-all"})
    msg = str(info.value)
    assert msg.startswith("/etc/replicator.yml: encryption-key (from ${K}): expected a 256-bit key as 64 hex digits")
    assert "not-a-key" not in msg
    with pytest.raises(ConfigError) as info:
        cfg("dbs: [{path: /d/a.db, encryption-key: literal-oops, replicas: [{url: /r}]}]")
    assert "literal-oops" not in str(info.value) and r"dbs[0].encryption-key: expected" in str(info.value)
    with pytest.raises(ConfigError, match=r"dbs\[0\]\.replicas\[0\]\.encryption-key-path: unknown key; .* per db or at the top level"):
        cfg("dbs: [{path: /d/a.db, replicas: [{url: /r, encryption-key-path: /k}]}]")


def test_config_bad_key_file_contents(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("0123456789abcdef\n")  # 16 hex digits: a 64-bit key
    conf = tmp_path / "r.yml"
    conf.write_text(f"encryption-key-path: {key_file}\ndbs: [{{path: {tmp_path}/a.db, replicas: [{{url: {tmp_path}/r}}]}}]\n")
    db = load_config(conf).dbs[0]
    with pytest.raises(ConfigError) as info:
        encryption_key_of(db)
    assert str(info.value) == (
        f"encryption-key-path {key_file}: expected 32 random bytes: raw (exactly 32 bytes), 64 hex digits, "
        "or base64 of 32 bytes (the file holds 17 bytes)"
    )
    key_file.write_text(base64.b64encode(bytes(32)).decode())
    assert encryption_key_of(db).kid == E.key_id(bytes(32))


def test_literal_encryption_key_in_a_readable_file_warns(tmp_path):
    conf = tmp_path / "r.yml"
    conf.write_text("encryption-key: '" + "cd" * 32 + "'\ndbs: [{path: /d/a.db, replicas: [{url: /r}]}]\n")
    conf.chmod(0o644)
    warnings = load_config(conf).warnings
    assert len(warnings) == 1 and "secrets written literally (encryption-key)" in warnings[0]
    assert "cd" * 32 not in warnings[0]
    conf.write_text("encryption-key: ${K}\ndbs: [{path: /d/a.db, replicas: [{url: /r}]}]\n")
    assert load_config(conf, environ={"K": "cd" * 32}).warnings == ()


# ---------------------------------------------------------------------------- end to end


def run_cli(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = env()
    e.pop("REPLICATOR_ENCRYPTION_KEY_PATH", None)
    e.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True, text=True, timeout=120, env=e)


def insert_canaries(db: Path, rows: int) -> None:
    conn = sqlite3.connect(db, timeout=30)
    try:
        for i in range(rows):
            with conn:
                conn.execute("INSERT INTO t (v, n) VALUES (?, ?)", (CANARY * 40, 10_000 + i))
    finally:
        conn.close()


def assert_fails_one_line(p: subprocess.CompletedProcess, *parts: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("replicator: ")]
    assert len(lines) == 1, p.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_end_to_end_encrypted_replica(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    key_file, wrong_file = tmp_path / "key", tmp_path / "wrong-key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    wrong_file.write_bytes(os.urandom(32))
    kid = E.key_id(bytes.fromhex(key_file.read_text()))
    conf = tmp_path / "replicator.yml"
    conf.write_text(
        f"encryption-key-path: {key_file}\n"
        f"dbs:\n  - path: {db}\n    replicas:\n      - url: file://{replica}\n"
    )
    write(db, [["schema"]])
    insert_canaries(db, 3)
    with AgentProcess("-c", str(conf), log=tmp_path / "agent.log") as agent:
        wait_for(lambda: any(k.endswith(".snapshot") for k in replica_keys(replica)), what="first snapshot")
        write(db, [["insert", 40, 300], ["update", 10]])
        insert_canaries(db, 20)
        assert agent.stop() == 0
    checkpoint(db)
    assert CANARY in db.read_bytes()
    stored = [replica / k for k in replica_keys(replica)]
    assert any(p.name.endswith(".segment") for p in stored)
    for p in stored:
        data = p.read_bytes()
        assert CANARY[:12] not in data and b"CREATE TABLE" not in data, p
        with open(p, "rb") as f:
            h = A.read_header(f)
        assert h.format_version == 2 and h.encryption.kid == kid
    # the shadow log holds only ciphertext too
    for p in (tmp_path / ".app.db-replicator" / "generations").rglob("*.*"):
        assert CANARY[:12] not in p.read_bytes()

    out = tmp_path / "restored.db"
    cli("restore", "-c", str(conf), "-o", str(out), str(db), check=True)
    assert integrity(out) == "ok"
    assert_same_pages(out, db)

    url = f"file://{replica}"
    missing = tmp_path / "no-key.db"
    p = run_cli("restore", "-o", str(missing), url)
    assert_fails_one_line(p, f"is encrypted (key id {kid}): configure encryption-key-path", ".snapshot: ")
    wrong = tmp_path / "wrong-key.db"
    p = run_cli("restore", "--encryption-key-path", str(wrong_file), "-o", str(wrong), url)
    assert_fails_one_line(p, f"key id {kid} does not match the configured key's id {E.key_id(wrong_file.read_bytes())}")
    assert not missing.exists() and not wrong.exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith((".no-key.db", ".wrong-key.db"))]

    # from the bare URL with the key: by flag, or from the environment
    by_flag, by_env = tmp_path / "by-flag.db", tmp_path / "by-env.db"
    run_cli_ok = run_cli("restore", "--encryption-key-path", str(key_file), "-o", str(by_flag), url)
    assert run_cli_ok.returncode == 0, run_cli_ok.stderr
    p = run_cli("restore", "-o", str(by_env), url, extra_env={"REPLICATOR_ENCRYPTION_KEY_PATH": str(key_file)})
    assert p.returncode == 0, p.stderr
    assert_same_pages(by_flag, db)
    assert_same_pages(by_env, db)
    v = run_cli("verify", "--encryption-key-path", str(key_file), url)
    assert v.returncode == 0 and ": OK generation" in v.stdout, (v.stdout, v.stderr)

    # a new key: the agent starts a new generation, never mixing two keys in one
    old_gens = {k.split("/")[1] for k in replica_keys(replica)}
    key_file.write_bytes(wrong_file.read_bytes())
    with AgentProcess("-c", str(conf), log=tmp_path / "agent.log") as agent:
        write(db, [["insert", 5, 300]])
        assert agent.stop() == 0
    assert '"reason": "encryption-key-changed"' in (tmp_path / "agent.log").read_text()
    new_gens = {k.split("/")[1] for k in replica_keys(replica)} - old_gens
    assert len(new_gens) == 1
    checkpoint(db)
    again = tmp_path / "again.db"
    cli("restore", "-c", str(conf), "-o", str(again), str(db), check=True)
    assert_same_pages(again, db)
