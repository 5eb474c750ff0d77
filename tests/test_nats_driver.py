"""The nats driver against real nats-server processes (JetStream): what the conformance suite
does not cover. URL and option parsing, bucket creation and limits, interoperability with
nats-py's own ObjectStore (tombstones, empty stores), integrity checks, outages and server
restarts mid-transfer, authentication, TLS, and secrets staying out of messages and logs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("nats")

import nats
from nats.js import api as js_api
from nats.js.errors import NotFoundError as NatsNotFound
from server_nats import FACTORIES, TOKEN, NatsServer, token_server, unique_bucket
from test_driver_conformance import PatternStream

from replicas import (
    BadURL,
    Capability,
    IntegrityError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
    open_driver,
)
from replicas.nats import CHUNK_BYTES, DIRECT_READ_MAX_CHUNKS, NATSDriver

pytestmark = pytest.mark.skipif(not FACTORIES, reason="nats-server not installed")

MiB = 1 << 20
PASSWORD = "pw-Hh27-secret-value"
READER_PASSWORD = "pw-Rr55-secret-value"


# --- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv() -> Iterator[NatsServer]:
    """A server of this module's own, so stopping and restarting it disturbs nothing else."""
    server = NatsServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def live(srv: NatsServer) -> NatsServer:
    srv.start()  # a previous test may have left it stopped
    return srv


@pytest.fixture
def token_srv() -> NatsServer:
    return token_server()


@pytest.fixture(scope="module")
def users_srv() -> Iterator[NatsServer]:
    server = NatsServer(
        config=f"""
accounts {{
  APP {{
    jetstream: enabled
    users: [
      {{user: admin, password: "{PASSWORD}"}}
      {{user: reader, password: "{READER_PASSWORD}",
        permissions: {{publish: {{deny: ["$JS.API.STREAM.CREATE.>"]}}}}}}
    ]
  }}
}}
"""
    )
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl unavailable: {exc}")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture(scope="module")
def tls_srv(tls_files: dict[str, Path]) -> Iterator[NatsServer]:
    server = NatsServer(
        config=f'tls {{ cert_file: "{tls_files["cert"]}", key_file: "{tls_files["key"]}", timeout: 2 }}\n'
    )
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def drivers() -> Iterator[list[NATSDriver]]:
    """Collects drivers a test opens and closes them afterwards."""
    opened: list[NATSDriver] = []
    yield opened
    for driver in opened:
        driver.close()


def opened(drivers: list[NATSDriver], url: str, **options: object) -> NATSDriver:
    driver = open_driver(url, **options)
    assert isinstance(driver, NATSDriver)
    drivers.append(driver)
    return driver


def js_call(server: NatsServer, work, **connect: object):  # type: ignore[no-untyped-def]
    """Run work(js) with a plain nats-py client (another client of the same bucket)."""

    async def main():  # type: ignore[no-untyped-def]
        nc = await nats.connect(f"nats://{server.host}", **connect)
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def keys(driver: NATSDriver, prefix: str = "") -> list[str]:
    return [info.key for info in driver.list(prefix)]


# --- URL and option parsing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("nats://host/bkt", {}, ("nats://host:4222/bkt", ("host:4222",), "bkt", "", False)),
        ("nats://host:4333/bkt/a/b/", {}, ("nats://host:4333/bkt/a/b", ("host:4333",), "bkt", "a/b/", False)),
        ("NATS://h1:1,h2/b_-9/p%20q", {}, ("nats://h1:1,h2:4222/b_-9/p%20q", ("h1:1", "h2:4222"), "b_-9", "p q/", False)),
        ("tls://host/b", {}, ("tls://host:4222/b", ("host:4222",), "b", "", True)),
        ("nats://[::1]:5/b", {}, ("nats://[::1]:5/b", ("[::1]:5",), "b", "", False)),
    ],
)
def test_url_parsing(url: str, options: dict, expected: tuple) -> None:
    driver = NATSDriver.from_url(url, **options)
    try:
        s = driver.settings
        assert (driver.url, s.servers, s.bucket, s.prefix, s.tls) == expected
        assert driver.scheme == "nats" and Capability.CONDITIONAL_CREATE in driver.capabilities
    finally:
        driver.close()


def test_credentials_and_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used until connect")
    cases = [
        ("nats://s3cr%2Ft@host/b", {}, {"token": "s3cr/t"}),
        ("nats://host/b", {"token": "tt"}, {"token": "tt"}),
        ("nats://alice:p%40ss@host/b", {}, {"username": "alice", "password": "p@ss"}),
        ("nats://host/b", {"username": "bob", "password": "x"}, {"username": "bob", "password": "x"}),
        ("nats://host/b?max-bucket-bytes=1000&timeout=2.5", {}, {"max_bucket_bytes": 1000, "timeout": 2.5}),
        ("nats://host/b", {"skip_verify": True, "max_bucket_bytes": 5}, {"skip_verify": True, "max_bucket_bytes": 5}),
        ("nats://host/b?create_bucket=false", {}, {"create_bucket": False}),
        ("nats://host/b?tls=true", {}, {"tls": True}),
        ("nats://host/b", {"tls": False}, {"tls": False}),
    ]
    for url, options, expected in cases:
        driver = NATSDriver.from_url(url, **options)
        try:
            for name, value in expected.items():
                assert getattr(driver.settings, name) == value, (url, name)
            assert "@" not in driver.url and "s3cr" not in driver.url and "p@ss" not in repr(driver)
        finally:
            driver.close()
    # a CA file turns TLS on; the file must be a PEM the ssl module can load
    with pytest.raises(BadURL, match="tls_ca_path"):
        NATSDriver.from_url("nats://host/b", tls_ca_path=str(ca))


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("nats:///bucket", {}, "need a server"),
        ("nats://:4222/bucket", {}, "need a server"),
        ("nats://host", {}, "needs a bucket"),
        ("nats://host/", {}, "needs a bucket"),
        ("nats://host/bad.bucket", {}, "invalid object store bucket name"),
        ("nats://host:notaport/b", {}, "invalid server"),
        ("nats://host/b/../x", {}, "invalid prefix"),
        ("nats://host/b?colour=red", {}, "unknown option 'colour'"),
        ("nats://host/b", {"colour": "red"}, "unknown option 'colour'"),
        ("nats://host/b?timeout=0", {}, "positive number"),
        ("nats://host/b", {"max_bucket_bytes": -1}, "positive number"),
        ("nats://host/b", {"max_bucket_bytes": True}, "positive number"),
        ("nats://host/b", {"skip_verify": "maybe"}, "true or false"),
        ("nats://host/b", {"creds_path": "/no/such/file.creds"}, "not a readable file"),
        ("nats://SECRETTOKEN@host/b", {"token": "other"}, "given both"),
        ("nats://SECRETTOKEN@host/b", {"username": "u", "password": "SECRETPASS"}, "not both"),
        ("nats://host/b", {"password": "SECRETPASS"}, "no username"),
        ("nats://u:SECRETPASS@host/b#frag", {}, "fragment"),
        ("nats://SECRET/TOKEN@host/b", {}, "percent-encode"),
        ("s3://host/b", {}, "not a nats URL"),
    ],
)
def test_bad_urls_are_rejected_without_echoing_secrets(url: str, options: dict, message: str) -> None:
    with pytest.raises(BadURL, match=message) as caught:
        NATSDriver.from_url(url, **options)
    assert "SECRET" not in str(caught.value)


def test_open_driver_dispatches_nats(live: NatsServer, drivers: list[NATSDriver]) -> None:
    driver = opened(drivers, live.url(unique_bucket(), "some/prefix"))
    driver.put("k", b"v")
    assert driver.url == f"nats://{live.host}/{driver.bucket}/some/prefix"
    assert driver.get_bytes("k") == b"v"


# --- buckets ---------------------------------------------------------------------------


def test_bucket_is_created_with_limits_and_reopened(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    first = opened(drivers, live.url(bucket), max_bucket_bytes=64 * MiB)
    assert keys(first) == []  # the first operation creates the bucket
    info = js_call(live, lambda js: js.stream_info(f"OBJ_{bucket}"))
    assert info.config.max_bytes == 64 * MiB
    assert info.config.allow_rollup_hdrs and info.config.discard == js_api.DiscardPolicy.NEW
    first.put("a", b"1")
    second = opened(drivers, live.url(bucket), create_bucket=False)
    assert second.get_bytes("a") == b"1"
    # nats-py's own ObjectStore sees the bucket as an object store
    assert js_call(live, lambda js: js.object_store(bucket)) is not None


def test_missing_bucket_without_create_is_not_found(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket), create_bucket=False)
    with pytest.raises(NotFound, match=bucket):
        driver.head("k")
    with pytest.raises(NatsNotFound):
        js_call(live, lambda js: js.stream_info(f"OBJ_{bucket}"))


def test_stream_that_is_not_an_object_store_is_refused(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    js_call(live, lambda js: js.add_stream(name=f"OBJ_{bucket}", subjects=[f"other.{bucket}"]))
    with pytest.raises(StorageError, match="not an object store"):
        opened(drivers, live.url(bucket)).head("k")


def test_full_bucket_is_a_storage_error_and_frees_the_failed_upload(
    live: NatsServer, drivers: list[NATSDriver]
) -> None:
    driver = opened(drivers, live.url(unique_bucket()), max_bucket_bytes=2 * MiB)
    driver.put("small", b"x" * 1000)
    with pytest.raises(StorageError) as caught:
        driver.put("big", PatternStream(3 * MiB))
    assert not isinstance(caught.value, Transient)
    assert "'big'" in str(caught.value)
    assert keys(driver) == ["small"]
    driver.put("fits", PatternStream(MiB + 1))  # the failed upload's chunks were purged
    assert keys(driver) == ["fits", "small"]


def test_prefixes_share_a_bucket_without_seeing_each_other(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    one = opened(drivers, live.url(bucket, "db/one"))
    two = opened(drivers, live.url(bucket, "db/two"))
    whole = opened(drivers, live.url(bucket))
    one.put("seg/1", b"a")
    two.put("seg/1", b"b")
    assert keys(one) == ["seg/1"] and one.get_bytes("seg/1") == b"a"
    assert keys(two) == ["seg/1"] and two.get_bytes("seg/1") == b"b"
    assert keys(whole) == ["db/one/seg/1", "db/two/seg/1"]
    assert keys(whole, "db/t") == ["db/two/seg/1"]
    one.delete("seg/1")
    assert keys(whole) == ["db/two/seg/1"]


# --- interoperability with nats-py's ObjectStore -------------------------------------------


def test_objects_written_here_read_by_nats_py_and_back(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket))
    big = bytes(range(256)) * (5 * CHUNK_BYTES // 256 + 17)
    driver.put("dir/big", big)
    driver.put("empty", b"")

    async def read(js):  # type: ignore[no-untyped-def]
        obs = await js.object_store(bucket)
        return (await obs.get("dir/big")).data, (await obs.get("empty")).data

    assert js_call(live, read) == (big, b"")  # nats-py checks the digest itself

    async def write(js):  # type: ignore[no-untyped-def]
        obs = await js.object_store(bucket)
        await obs.put("from/nats-py", io.BytesIO(big[:300_000]))

    js_call(live, write)
    assert driver.get_bytes("from/nats-py") == big[:300_000]
    assert driver.head("from/nats-py").size == 300_000
    assert keys(driver) == ["dir/big", "empty", "from/nats-py"]


def test_deleted_entries_are_never_listed(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket))
    for key in ("a", "b", "c"):
        driver.put(key, key.encode())

    async def tombstone(js):  # type: ignore[no-untyped-def]
        obs = await js.object_store(bucket)
        await obs.delete("b")  # nats-py leaves a tombstone meta
        return [entry.name for entry in await obs.list()]

    assert sorted(js_call(live, tombstone)) == ["a", "b", "c"]  # nats-py lists it unless told not to
    assert keys(driver) == ["a", "c"]
    with pytest.raises(NotFound):
        driver.head("b")
    with pytest.raises(NotFound):
        driver.get("b")
    driver.delete("b")  # deleting a tombstoned key is fine
    driver.put("b", b"again", if_absent=True)  # a tombstone does not count as present
    assert driver.get_bytes("b") == b"again"
    with pytest.raises(PreconditionFailed):
        driver.put("b", b"third", if_absent=True)


def test_empty_store_lists_nothing(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket))
    assert keys(driver) == []  # a new, empty bucket
    driver.put("only", b"1")

    async def delete_all(js):  # type: ignore[no-untyped-def]
        obs = await js.object_store(bucket)
        await obs.delete("only")
        try:
            await obs.list(ignore_deletes=True)
        except NatsNotFound:
            return "NotFoundError"
        return "listed"

    assert js_call(live, delete_all) == "NotFoundError"  # what nats-py does with nothing left
    assert keys(driver) == [] and keys(driver, "o") == []
    driver.put("x", b"1")
    driver.delete("x")  # our delete leaves no tombstone at all
    assert keys(driver) == []


def test_delete_leaves_no_chunks_or_metas_behind(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket))
    driver.put("k", PatternStream(MiB))
    driver.put("k", b"overwritten")  # the old chunks go
    driver.put("gone", PatternStream(300_000))
    driver.delete("gone")
    info = js_call(live, lambda js: js.stream_info(f"OBJ_{bucket}", subjects_filter=">"))
    assert sorted(info.state.subjects.values()) == [1, 1]  # k's one chunk and k's meta


# --- reads -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, (DIRECT_READ_MAX_CHUNKS + 4) * CHUNK_BYTES + 5], ids=["direct", "consumer"])
def test_offset_and_length_are_honoured(live: NatsServer, drivers: list[NATSDriver], size: int) -> None:
    driver = opened(drivers, live.url(unique_bucket()))
    data = bytes(range(251)) * (size // 251 + 1)
    data = data[:size]
    driver.put("r", data)
    end = len(data)
    cases = [(0, 10), (5, None), (100, 50), (end - 3, 10), (end, None), (end + 9, 5), (7, 0), (0, None),
             (CHUNK_BYTES - 2, 4), (3 * CHUNK_BYTES + 1, 2 * CHUNK_BYTES)]
    for offset, length in cases:
        expected = data[offset:] if length is None else data[offset : offset + length]
        assert driver.get_bytes("r", offset=offset, length=length) == expected, (offset, length)
    with pytest.raises(ValueError):
        driver.get("r", offset=-1)
    with pytest.raises(NotFound):
        driver.get_bytes("missing", offset=1, length=1)


def test_corrupt_object_is_an_integrity_error(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    driver = opened(drivers, live.url(bucket))
    driver.put("good", b"payload")
    meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(b'good').decode()}"

    async def tamper(js, **changes):  # type: ignore[no-untyped-def]
        msg = await js.get_last_msg(f"OBJ_{bucket}", meta_subject)
        meta = json.loads(msg.data)
        meta.update(changes)
        await js.publish(meta_subject, json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})

    bad_digest = "SHA-256=" + base64.urlsafe_b64encode(bytes(32)).decode()
    js_call(live, lambda js: tamper(js, digest=bad_digest))
    with pytest.raises(IntegrityError, match="'good'"):
        driver.get_bytes("good")
    js_call(live, lambda js: tamper(js, size=70, chunks=2))
    with pytest.raises(IntegrityError, match="'good'"):
        driver.get_bytes("good")


def test_large_object_replaced_while_being_read(live: NatsServer, drivers: list[NATSDriver]) -> None:
    driver = opened(drivers, live.url(unique_bucket()))
    size = (DIRECT_READ_MAX_CHUNKS + 8) * CHUNK_BYTES
    values = [bytes([65 + i]) * size for i in range(3)]
    driver.put("hot", values[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            driver.put("hot", values[i % 3])

    with ThreadPoolExecutor(4) as pool:
        writing = pool.submit(writer)
        try:
            readers = [pool.submit(lambda: [driver.get_bytes("hot") for _ in range(8)]) for _ in range(3)]
            for reader in readers:
                assert all(value in values for value in reader.result())
        finally:
            stop.set()
        writing.result()


# --- outages and restarts --------------------------------------------------------------


def test_server_stopped_mid_transfer(srv: NatsServer, live: NatsServer, drivers: list[NATSDriver]) -> None:
    driver = opened(drivers, live.url(unique_bucket()), timeout=1.5)
    driver.put("k", b"old")
    stopped: list[float] = []

    def stop_at_4mib(total: int) -> None:
        if total >= 4 * MiB and not stopped:
            live.stop()
            stopped.append(time.monotonic())

    with pytest.raises(Transient) as caught:
        driver.put("k", PatternStream(32 * MiB), progress=stop_at_4mib)
    failed_after = time.monotonic() - stopped[0]
    assert failed_after < 1.5 + 3, f"put took {failed_after:.1f}s to fail"
    assert "'k'" in str(caught.value) and live.host in str(caught.value)
    # every operation fails fast while the server is down, none hangs
    for operation in (lambda: driver.head("k"), lambda: keys(driver), lambda: driver.get_bytes("k"),
                      lambda: driver.delete("k"), lambda: driver.put("n", b"1")):
        began = time.monotonic()
        with pytest.raises(Transient):
            operation()
        assert time.monotonic() - began < 1.5 + 3
    live.start()
    deadline = time.monotonic() + 15
    while True:  # nats-py reconnects by itself
        try:
            assert driver.get_bytes("k") == b"old"  # the failed put left the old object whole
            break
        except Transient:
            assert time.monotonic() < deadline, "no reconnect within 15 s"
            time.sleep(0.2)
    assert keys(driver) == ["k"]
    source = PatternStream(32 * MiB)
    driver.put("k", source)
    assert driver.head("k").size == 32 * MiB
    assert driver.get_bytes("k", offset=32 * MiB - 5) == _pattern_tail(32 * MiB, 5)
    # the failed upload's chunks were purged once the server was back
    info = js_call(live, lambda js: js.stream_info(f"OBJ_{driver.bucket}", subjects_filter=">"))
    assert sorted(info.state.subjects.values()) == [1, 256]


def _pattern_tail(size: int, n: int) -> bytes:
    return _pattern_bytes(size)[-n:]


def test_server_restarted_mid_transfer_never_leaves_a_partial_object(
    live: NatsServer, drivers: list[NATSDriver]
) -> None:
    driver = opened(drivers, live.url(unique_bucket()), timeout=3)
    driver.put("new-over-old", b"old")
    for key in ("new-over-old", "fresh"):
        def restart_at_2mib(total: int, restarted: list[bool] = []) -> None:  # noqa: B006 (once per key)
            if total >= 2 * MiB and not restarted:
                live.restart()
                restarted.append(True)

        source = PatternStream(8 * MiB)
        began = time.monotonic()
        try:
            driver.put(key, source, progress=restart_at_2mib)
            outcome = "stored"
        except Transient:
            outcome = "failed"
        print(f"put of {key!r} across a restart: {outcome} after {time.monotonic() - began:.2f}s")
        assert time.monotonic() - began < 30
        deadline = time.monotonic() + 15
        while True:
            try:
                listed = keys(driver)
                break
            except Transient:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        if outcome == "stored":
            assert driver.head(key).size == 8 * MiB
            assert driver.get_bytes(key) == _pattern_bytes(8 * MiB)
        elif key == "fresh":
            assert "fresh" not in listed
        else:
            assert driver.get_bytes(key) == b"old"
        driver.put(key, _pattern_bytes(8 * MiB))  # after the restart the upload succeeds
        assert driver.get_bytes(key) == _pattern_bytes(8 * MiB)


def _pattern_bytes(size: int) -> bytes:
    stream = PatternStream(size)
    return b"".join(iter(lambda: stream.read(MiB), b""))


def test_objects_survive_a_server_restart(live: NatsServer, drivers: list[NATSDriver]) -> None:
    driver = opened(drivers, live.url(unique_bucket()), timeout=3)
    driver.put("persisted", PatternStream(3 * MiB))
    live.restart()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert driver.head("persisted").size == 3 * MiB
            break
        except Transient:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert driver.get_bytes("persisted") == _pattern_bytes(3 * MiB)


def test_unreachable_server_is_transient_quickly(drivers: list[NATSDriver]) -> None:
    from server_nats import free_port

    driver = opened(drivers, f"nats://127.0.0.1:{free_port()}/{unique_bucket()}", timeout=1.5)
    began = time.monotonic()
    with pytest.raises(Transient, match="cannot connect"):
        driver.head("k")
    assert time.monotonic() - began < 5


def test_closed_driver_refuses_work(live: NatsServer) -> None:
    driver = open_driver(live.url(unique_bucket()))
    driver.put("k", b"v")
    driver.close()
    driver.close()  # idempotent
    assert not driver._thread.is_alive()
    with pytest.raises(StorageError, match="closed"):
        driver.head("k")


# --- authentication, permissions, secrets ----------------------------------------------------


def test_token_auth_and_secrets_stay_out_of_messages_and_logs(
    token_srv: NatsServer, drivers: list[NATSDriver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bucket = unique_bucket()
    in_url = opened(drivers, f"nats://{TOKEN}@{token_srv.host}/{bucket}")
    in_url.put("k", b"v")
    as_option = opened(drivers, f"nats://{token_srv.host}/{bucket}", token=TOKEN)
    assert as_option.get_bytes("k") == b"v"
    assert TOKEN not in in_url.url and TOKEN not in repr(in_url)

    wrong = "tok-WRONG-secret-value"
    for driver in (opened(drivers, f"nats://{wrong}@{token_srv.host}/{bucket}", timeout=5),
                   opened(drivers, f"nats://{token_srv.host}/{bucket}", timeout=5)):
        began = time.monotonic()
        with pytest.raises(PermissionDenied) as caught:
            driver.put("k", b"x")
        assert time.monotonic() - began < 4  # an auth failure does not wait for the timeout
        assert "authoriz" in str(caught.value) and token_srv.host in str(caught.value)
        for secret in (TOKEN, wrong):
            assert secret not in str(caught.value)
    for secret in (TOKEN, wrong):
        assert secret not in caplog.text


def test_password_auth_permissions_and_secrets(
    users_srv: NatsServer, drivers: list[NATSDriver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bucket = unique_bucket()
    admin = opened(drivers, f"nats://admin:{PASSWORD}@{users_srv.host}/{bucket}")
    admin.put("k", b"v")

    wrong = opened(drivers, f"nats://{users_srv.host}/{bucket}", username="admin", password="pw-WRONG-secret", timeout=5)
    with pytest.raises(PermissionDenied) as caught:
        wrong.head("k")
    assert "pw-WRONG-secret" not in str(caught.value)

    # the reader may use an existing bucket but not create one
    reader = opened(drivers, f"nats://{users_srv.host}/{bucket}", username="reader", password=READER_PASSWORD, timeout=2)
    assert reader.get_bytes("k") == b"v"
    new_bucket = unique_bucket()
    creator = opened(drivers, f"nats://{users_srv.host}/{new_bucket}", username="reader", password=READER_PASSWORD, timeout=2)
    with pytest.raises(PermissionDenied, match=f"cannot create object store bucket '{new_bucket}'") as caught:
        creator.put("k", b"v")
    for secret in (PASSWORD, READER_PASSWORD, "pw-WRONG-secret"):
        assert secret not in str(caught.value)
        assert secret not in caplog.text


def test_tls_verifies_the_server_by_default(
    tls_srv: NatsServer, tls_files: dict[str, Path], drivers: list[NATSDriver], caplog: pytest.LogCaptureFixture
) -> None:
    bucket = unique_bucket()
    trusted = opened(drivers, f"nats://{tls_srv.host}/{bucket}", tls_ca_path=str(tls_files["ca"]))
    assert trusted.settings.tls
    trusted.put("k", b"over tls")
    assert trusted.get_bytes("k") == b"over tls"

    untrusted = opened(drivers, f"nats://{tls_srv.host}/{bucket}", timeout=5)  # the system CAs only
    began = time.monotonic()
    with pytest.raises(PermissionDenied, match="certificate verification failed"):
        untrusted.head("k")
    assert time.monotonic() - began < 4

    caplog.set_level(logging.WARNING)
    unverified = opened(drivers, f"nats://{tls_srv.host}/{bucket}", skip_verify=True)
    assert "verification is disabled" in caplog.text
    assert unverified.get_bytes("k") == b"over tls"


@pytest.mark.parametrize("how", ["tls-url", "tls-option"])
def test_tls_required_refuses_a_plaintext_server_and_withholds_secrets(
    token_srv: NatsServer, drivers: list[NATSDriver], how: str
) -> None:
    if how == "tls-url":
        driver = NATSDriver.from_url(f"tls://{token_srv.host}/{unique_bucket()}", token=TOKEN, timeout=5)
        drivers.append(driver)
    else:
        driver = opened(drivers, f"nats://{token_srv.host}/{unique_bucket()}?tls=true", token=TOKEN, timeout=5)
    began = time.monotonic()
    with pytest.raises(PermissionDenied, match="TLS") as caught:
        driver.head("k")
    assert time.monotonic() - began < 4
    assert TOKEN not in str(caught.value)


def test_tls_required_never_sends_credentials_in_plaintext(drivers: list[NATSDriver]) -> None:
    """A fake server that offers no TLS (as a downgrading attacker would) sees no secret."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    received: list[bytes] = []

    def fake_server() -> None:
        for _ in range(2):  # the first attempt and a reconnect attempt
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b'INFO {"server_id":"fake","version":"2.9.10","proto":1,"headers":true,'
                             b'"max_payload":1048576,"auth_required":true}\r\n')
                conn.settimeout(1)
                try:
                    while chunk := conn.recv(65536):
                        received.append(chunk)
                except OSError:
                    pass

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    driver = opened(drivers, f"nats://127.0.0.1:{port}/{unique_bucket()}?tls=true",
                    username="u", password=PASSWORD, timeout=3)
    with pytest.raises(PermissionDenied, match="TLS"):
        driver.head("k")
    listener.close()
    thread.join(5)
    assert PASSWORD.encode() not in b"".join(received)


def test_put_if_absent_is_atomic_across_drivers(live: NatsServer, drivers: list[NATSDriver]) -> None:
    bucket = unique_bucket()
    clients = [opened(drivers, live.url(bucket)) for _ in range(4)]
    clients[0].put("warm", b"up")  # create the bucket once
    barrier = threading.Barrier(8)

    def attempt(index: int) -> int | None:
        barrier.wait()
        try:
            clients[index % 4].put("lock", PatternStream(300_000 + index), if_absent=True)
            return index
        except PreconditionFailed:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [w for w in pool.map(attempt, range(8)) if w is not None]
    assert len(winners) == 1
    assert clients[1].head("lock").size == 300_000 + winners[0]
    info = js_call(live, lambda js: js.stream_info(f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.>"))
    assert sum(info.state.subjects.values()) == 1 + 3  # warm's chunk + the winner's; losers purged


def test_loop_thread_runs_before_its_constructor_returns(monkeypatch):
    """A driver's first call, made at once, must not find its loop 'closed': on a busy
    machine the loop's thread may start late (CI once failed a put that way). The thread
    is slowed here on purpose, before it reaches run_forever()."""
    from replicas.nats import loop as loop_mod

    real = asyncio.set_event_loop

    def late(loop):
        time.sleep(0.05)
        real(loop)

    monkeypatch.setattr(loop_mod.asyncio, "set_event_loop", late)
    lt = loop_mod.LoopThread("test-late-start")
    try:
        assert lt.running()
        assert lt.submit(asyncio.sleep(0, result=7)).result(5) == 7
    finally:
        lt.stop(asyncio.sleep(0), 5)
    assert not lt.thread.is_alive()
