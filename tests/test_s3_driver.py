"""S3-specific tests of replicas.s3 against a real `rclone serve s3` (see server_s3.py).

The conformance suite covers the Driver contract; this covers what is particular to S3:
URL and option parsing, credentials, TLS, error mapping (including the text/xml error
bodies minio reports as InvalidResponseError), multipart uploads, faults (server killed
or frozen mid-transfer), and that secrets never reach an exception or a log.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import logging
import random
import threading
import time
from pathlib import Path

import pytest
import server_s3
from minio.error import InvalidResponseError, S3Error, ServerError

from replicas import (
    BadURL,
    Capability,
    IntegrityError,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RetryingDriver,
    StorageError,
    Transient,
    open_driver,
)
from replicas.s3 import DEFAULT_PART_SIZE, S3Driver

MiB = 1 << 20
NO_ENV: dict[str, str] = {}


class Pattern(io.RawIOBase):
    """`size` pseudo-random bytes generated as read (unknown length to the reader)."""

    _base = random.Random(77).randbytes(MiB + 4096)

    def __init__(self, size: int) -> None:
        self.size, self.pos = size, 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        block, offset = divmod(self.pos, MiB)
        n = min(len(buffer), MiB - offset, self.size - self.pos)
        start = (block * 131) % 4096 + offset
        chunk = memoryview(self._base)[start : start + n]
        buffer[:n] = chunk
        self.sha256.update(chunk)
        self.pos += n
        return n


def pattern_bytes(offset: int, length: int) -> bytes:
    source, out = Pattern(offset + length), bytearray()
    while chunk := source.read(MiB):
        out += chunk
    return bytes(out[offset:])


def digest_of(drv: S3Driver, key: str) -> str:
    digest = hashlib.sha256()
    with drv.get(key) as stream:
        while chunk := stream.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def srv() -> server_s3.RcloneS3:
    return server_s3.server()


@pytest.fixture
def drv(srv: server_s3.RcloneS3):
    driver = srv.driver("replica")
    yield driver
    driver.close()


@pytest.fixture
def private_server(tmp_path: Path):
    """A server of this test's own, free to be killed, frozen and restarted."""
    server = server_s3.RcloneS3(str(tmp_path / "s3root"))
    (tmp_path / "s3root").mkdir()
    server.start()
    yield server
    server.shutdown()


def secret_free(text: str, *secrets: str) -> bool:
    return not any(secret and secret in text for secret in secrets)


# --- URL and options ---------------------------------------------------------------------


def test_url_with_query_options() -> None:
    drv = S3Driver.from_url(
        "s3://my-bucket/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-west-1&force-path-style=true",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="s" * 40,
    )
    assert (drv.bucket, drv.prefix) == ("my-bucket", "some/prefix/")
    assert (drv.endpoint, drv.secure, drv.region) == (
        "http://127.0.0.1:9000",
        False,
        "eu-west-1",
    )
    assert drv.part_size == DEFAULT_PART_SIZE
    assert drv.url == "s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9000"
    assert "s" * 40 not in repr(drv)


def test_options_as_the_config_passes_them() -> None:
    drv = S3Driver.from_url(
        "s3://bkt/p",
        endpoint="https://s3.example.test:8443",
        region="ap-south-1",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="x" * 40,
        session_token="t" * 60,
        force_path_style=True,
        skip_verify=False,
        part_size=8 * MiB,
    )
    assert isinstance(drv, S3Driver)
    assert (drv.endpoint, drv.secure, drv.region, drv.part_size) == (
        "https://s3.example.test:8443",
        True,
        "ap-south-1",
        8 * MiB,
    )
    assert drv.prefix == "p/"


def test_open_driver_loads_s3_lazily_and_defaults() -> None:
    drv = open_driver(
        "s3://bucket-only",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="y" * 40,
    )
    assert isinstance(drv, S3Driver)
    assert drv.prefix == ""
    assert drv.url.startswith("s3://bucket-only")


def test_region_defaults_to_us_east_1(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    drv = S3Driver.from_url("s3://bkt?endpoint=http://127.0.0.1:1")
    assert drv.region == "us-east-1"
    assert (
        drv._client._base_url.region == "us-east-1"
    )  # passed to minio: no location probe


def test_query_sizes_and_booleans() -> None:
    drv = S3Driver.from_url(
        "s3://bkt/x?endpoint=127.0.0.1:9000&part-size=32MiB&skip_verify=false"
    )
    assert drv.part_size == 32 * MiB
    assert drv.secure  # no scheme: TLS
    assert drv.skip_verify is False


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        ("s3://bkt/p?bogus=1", {}, "bogus"),
        ("s3://bkt/p", {"bogus_option": 1}, "bogus_option"),
        ("s3://bkt/p?endpoint=ftp://host", {}, "ftp"),
        ("s3://bkt/p?endpoint=http://host/path", {}, "path"),
        ("s3://bkt/p?force-path-style=maybe", {}, "force-path-style"),
        ("s3://bkt/p?part-size=1MiB", {}, "part_size"),
        ("s3://bkt/p", {"part_size": 6 * 1024**3}, "part_size"),
        ("s3://bkt/p?part-size=lots", {}, "part-size"),
        ("s3://bkt/p?region=Not_A_Region", {}, "region"),
        ("s3://B_/p", {}, "bucket"),
        ("s3:///p", {}, "bucket"),
        ("s3://bkt/../x", {}, "prefix"),
        ("s3://bkt/a//b", {}, "prefix"),
        ("s3://bkt/p?region=eu-west-1", {"region": "us-east-1"}, "region"),
        ("s3://bkt/p", {"access_key_id": "AKIDEXAMPLE0000000000"}, "secret-access-key"),
        ("s3://bkt/p", {"session_token": "tok"}, "session-token"),
        ("s3://bkt/p#frag", {}, "fragment"),
    ],
)
def test_bad_urls_and_options(url: str, options: dict, named: str) -> None:
    with pytest.raises(BadURL) as caught:
        S3Driver.from_url(url, **options)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_secrets_are_refused_in_the_url_and_not_echoed() -> None:
    secret = "wJalrXUtnFEMIsecretSECRETsecret0123456789"
    for url in (
        f"s3://bkt/p?secret-access-key={secret}",
        f"s3://bkt/p?session_token={secret}",
        f"s3://AKIDEXAMPLE:{secret}@bkt/p",
    ):
        with pytest.raises(BadURL) as caught:
            open_driver(url)
        assert secret not in str(caught.value)


def test_none_options_are_ignored() -> None:
    drv = S3Driver.from_url(
        "s3://bkt/p?region=eu-west-1", region=None, endpoint=None, part_size=None
    )
    assert drv.region == "eu-west-1"


# --- credentials --------------------------------------------------------------------------


def test_credentials_from_aws_environment(srv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = server_s3.new_bucket_name()
    drv = open_driver(f"s3://{bucket}/env?endpoint={srv.endpoint}")
    drv.ensure_bucket()  # type: ignore[attr-defined]
    drv.put("k", b"via AWS_* variables")
    assert drv.get_bytes("k") == b"via AWS_* variables"


def test_credentials_from_minio_environment(
    srv, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MINIO_ACCESS_KEY", srv.access)
    monkeypatch.setenv("MINIO_SECRET_KEY", srv.secret)
    drv = S3Driver.from_url(
        f"s3://{server_s3.new_bucket_name()}?endpoint={srv.endpoint}"
    )
    drv.ensure_bucket()
    drv.put("k", b"via MINIO_* variables")
    assert [i.key for i in drv.list()] == ["k"]


def test_options_win_over_environment(srv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "w" * 40)
    drv = srv.driver("opts")  # passes the right credentials as options
    drv.put("k", b"1")
    assert drv.get_bytes("k") == b"1"


def test_wrong_secret_is_permission_denied_without_leaking(
    srv, drv: S3Driver, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Zz9" + srv.secret[3:-3] + "Qq1"
    bad = S3Driver(
        drv.bucket,
        "replica",
        endpoint=srv.endpoint,
        access_key_id=srv.access,
        secret_access_key=wrong,
    )
    drv.put("k", b"1")
    failures = []
    for operation in (
        lambda: bad.get_bytes("k"),
        lambda: bad.head("k"),
        lambda: list(bad.list()),
        lambda: bad.put("k", b"2"),
        lambda: bad.put("big", Pattern(DEFAULT_PART_SIZE + MiB)),
        lambda: bad.delete("k"),
    ):
        with pytest.raises(PermissionDenied) as caught:
            operation()
        failures.append(caught.value)
    for exc in failures:
        text = f"{exc} {exc!r} {exc.__cause__!r} {exc.__context__!r}"
        assert secret_free(text, wrong, srv.secret)
        assert srv.endpoint in str(exc) and "\n" not in str(exc)
    assert secret_free(caplog.text, wrong, srv.secret)
    assert drv.get_bytes("k") == b"1"


def test_session_token_never_leaks(srv, drv: S3Driver, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = "FQoGZXIvYXdzSESSIONTOKEN" + "T0k3n" * 20
    other = S3Driver(
        drv.bucket,
        "replica",
        endpoint=srv.endpoint,
        access_key_id=srv.access,
        secret_access_key=srv.secret,
        session_token=token,
    )
    texts = [repr(other), other.url]
    for operation in (
        lambda: other.put("k", b"1"),
        lambda: other.get_bytes("k"),
        lambda: other.head("nope"),
    ):
        try:
            operation()
        except StorageError as exc:
            texts.append(f"{exc} {exc!r} {exc.__cause__!r} {exc.__context__!r}")
    assert secret_free(" ".join(texts) + caplog.text, token, srv.secret)


# --- TLS -------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[str, str]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture
def tls_server(tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    root = tmp_path / "tlsroot"
    root.mkdir()
    server = server_s3.RcloneS3(str(root), tls=(cert, key))
    server.start()
    yield server, cert
    server.shutdown()


def test_tls_verifies_certificates_by_default(tls_server, caplog) -> None:
    server, cert = tls_server
    caplog.set_level(logging.DEBUG)
    assert server.endpoint.startswith("https://")
    drv = S3Driver(
        "tls-bucket",
        endpoint=server.endpoint,
        access_key_id=server.access,
        secret_access_key=server.secret,
        environ=NO_ENV,
    )
    assert drv.secure and not drv.skip_verify
    with pytest.raises(StorageError) as caught:
        drv.ensure_bucket()
    assert not isinstance(
        caught.value, Transient
    )  # retrying cannot fix an untrusted certificate
    assert "certificate" in str(caught.value) and server.endpoint in str(caught.value)
    assert "skip-verify" not in caplog.text or "disabled" not in caplog.text
    # Trusting the server's own certificate (SSL_CERT_FILE) makes verification pass.
    trusted = S3Driver(
        "tls-bucket",
        endpoint=server.endpoint,
        access_key_id=server.access,
        secret_access_key=server.secret,
        environ={"SSL_CERT_FILE": cert},
    )
    trusted.ensure_bucket()
    trusted.put("k", b"over verified TLS")
    assert trusted.get_bytes("k") == b"over verified TLS"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_skip_verify_disables_verification_and_warns(tls_server, caplog) -> None:
    server, _ = tls_server
    caplog.set_level(logging.WARNING, logger="replicas.s3")
    drv = S3Driver.from_url(
        f"s3://tls-skip/p?endpoint={server.endpoint}",
        access_key_id=server.access,
        secret_access_key=server.secret,
        skip_verify=True,
    )
    warnings = [
        r
        for r in caplog.records
        if r.name == "replicas.s3" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and server.endpoint in warnings[0].getMessage()
    assert "verification" in warnings[0].getMessage()
    assert secret_free(caplog.text, server.secret)
    drv.ensure_bucket()
    drv.put("k", b"unverified")
    assert drv.get_bytes("k") == b"unverified"


def test_skip_verify_on_plain_http_logs_nothing(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="replicas.s3")
    drv = S3Driver.from_url("s3://bkt?endpoint=http://127.0.0.1:9", skip_verify=True)
    assert not drv.secure
    assert not [r for r in caplog.records if r.name == "replicas.s3"]


# --- error mapping ---------------------------------------------------------------------------


def test_missing_key_arrives_as_invalid_response_error_and_maps_to_not_found(
    drv: S3Driver,
) -> None:
    # rclone sends error bodies as text/xml: minio raises InvalidResponseError, not S3Error.
    with pytest.raises(InvalidResponseError):
        drv._client.get_object(drv.bucket, drv.prefix + "missing")
    with pytest.raises(NotFound) as caught:
        drv.get("missing")
    assert type(caught.value) is NotFound and caught.value.key == "missing"
    assert drv.endpoint in str(caught.value)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            InvalidResponseError(
                404, "text/xml", "<Error><Code>NoSuchKey</Code></Error>"
            ),
            NotFound,
        ),
        (InvalidResponseError(404, "text/xml", None), NotFound),
        (
            InvalidResponseError(
                403, "text/xml", "<Error><Code>SignatureDoesNotMatch</Code></Error>"
            ),
            PermissionDenied,
        ),
        (
            InvalidResponseError(403, "text/html", "<html>denied</html>"),
            PermissionDenied,
        ),
        (InvalidResponseError(503, "text/html", "busy"), Transient),
        (
            InvalidResponseError(
                500, "text/xml", "<Error><Code>InternalError</Code></Error>"
            ),
            Transient,
        ),
        (InvalidResponseError(429, "text/plain", "slow down"), Transient),
        (
            InvalidResponseError(
                412, "text/xml", "<Error><Code>PreconditionFailed</Code></Error>"
            ),
            PreconditionFailed,
        ),
        (
            InvalidResponseError(
                400, "text/xml", "<Error><Code>KeyTooLongError</Code></Error>"
            ),
            InvalidKey,
        ),
        (
            InvalidResponseError(
                400, "text/xml", "<Error><Code>MalformedXML</Code></Error>"
            ),
            StorageError,
        ),
        (ServerError("server failed with HTTP status code 502", 502), Transient),
        (ConnectionRefusedError(111, "Connection refused"), Transient),
        (TimeoutError("timed out"), Transient),
    ],
)
def test_error_mapping(exc: Exception, expected: type) -> None:
    drv = S3Driver(
        "bkt",
        "p",
        endpoint="http://127.0.0.1:9",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="S" * 40,
    )
    error = drv._error(exc, "get", "k")
    assert type(error) is expected
    assert (
        error.key == "k"
        and "\n" not in str(error)
        and "http://127.0.0.1:9" in str(error)
    )


def test_s3_error_codes_map_too(drv: S3Driver) -> None:
    # HEAD replies have no body: minio builds S3Error from the status.
    with pytest.raises(S3Error):
        drv._client.stat_object(drv.bucket, drv.prefix + "missing")
    with pytest.raises(NotFound):
        drv.head("missing")


def test_missing_bucket_is_a_clear_not_found(srv) -> None:
    bucket = server_s3.new_bucket_name()
    drv = S3Driver(
        bucket,
        "p",
        endpoint=srv.endpoint,
        access_key_id=srv.access,
        secret_access_key=srv.secret,
    )
    for operation in (
        lambda: drv.get_bytes("k"),
        lambda: drv.head("k"),
        lambda: list(drv.list()),
        lambda: drv.put("k", b"1"),
        lambda: drv.delete("k"),
    ):
        with pytest.raises(NotFound) as caught:
            operation()
        assert (
            f"bucket {bucket!r} does not exist at {srv.endpoint} (create it first)"
            in str(caught.value)
        )
    drv.ensure_bucket()
    drv.ensure_bucket()  # idempotent
    drv.put("k", b"1")
    assert drv.get_bytes("k") == b"1"


def test_unreachable_endpoint_is_transient_and_quick() -> None:
    with socket_on_free_port() as port:
        pass  # closed again: nothing listens there
    drv = S3Driver(
        "bkt",
        endpoint=f"http://127.0.0.1:{port}",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="S" * 40,
    )
    started = time.monotonic()
    for operation in (
        lambda: drv.head("k"),
        lambda: drv.put("k", b"1"),
        lambda: list(drv.list()),
    ):
        with pytest.raises(Transient) as caught:
            operation()
        assert "S" * 40 not in str(caught.value)
    assert time.monotonic() - started < 5


class socket_on_free_port:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_key_too_long_with_prefix_is_invalid_key_before_any_request(srv) -> None:
    drv = S3Driver(
        "bkt",
        "p" * 100,
        endpoint="http://127.0.0.1:9",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key="S" * 40,
    )
    with pytest.raises(InvalidKey):
        drv.put(
            "k" * 1000, b"x"
        )  # a legal key, too long once prefixed; no server at :9 is touched


# --- multipart uploads -------------------------------------------------------------------------


def _count_calls(
    monkeypatch: pytest.MonkeyPatch, client, *names: str
) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(client, name)

        def spy(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(client, name, spy)
    return counts


@pytest.mark.parametrize(
    "known_size", [False, True], ids=["unknown-size", "known-size"]
)
def test_multipart_upload_of_a_large_stream(
    drv: S3Driver, monkeypatch, known_size: bool
) -> None:
    size = 2 * DEFAULT_PART_SIZE + 3 * MiB + 17  # three parts: 16 + 16 + 3 MiB
    counts = _count_calls(
        monkeypatch,
        drv._client,
        "_create_multipart_upload",
        "_upload_part",
        "_put_object",
    )
    source, seen = Pattern(size), []
    info = drv.put(
        "gen/big.bin", source, size=size if known_size else None, progress=seen.append
    )
    # One multipart upload of three parts (minio sends each part through _put_object).
    assert counts == {
        "_create_multipart_upload": 1,
        "_upload_part": 3,
        "_put_object": 3,
    }
    assert info.size == size and seen[-1] == size and seen == sorted(seen)
    assert drv.head("gen/big.bin").size == size
    assert digest_of(drv, "gen/big.bin") == source.sha256.hexdigest()
    # A range across the first part boundary.
    start = DEFAULT_PART_SIZE - 10
    assert drv.get_bytes("gen/big.bin", offset=start, length=20) == pattern_bytes(
        start, 20
    )


def test_small_part_size_and_exact_multiple(srv) -> None:
    drv = srv.driver("parts", part_size=5 * MiB)
    payload = bytes(range(256)) * (10 * MiB // 256)  # exactly two parts
    drv.put("two", payload)
    assert drv.get_bytes("two") == payload
    drv.put("one", payload[: 5 * MiB])  # exactly one part: a plain PUT
    assert drv.get_bytes("one") == payload[: 5 * MiB]


def test_failed_multipart_upload_is_aborted_and_invisible(
    drv: S3Driver, monkeypatch
) -> None:
    counts = _count_calls(monkeypatch, drv._client, "_abort_multipart_upload")
    drv.put("k", b"old")
    size = DEFAULT_PART_SIZE + 2 * MiB
    with pytest.raises(IntegrityError):
        drv.put("k", Pattern(size), size=size + 1)  # the stream ends early
    with pytest.raises(IntegrityError):
        drv.put("new", Pattern(size), size=size - 1)  # the stream is longer
    assert counts["_abort_multipart_upload"] == 2
    assert drv.get_bytes("k") == b"old"
    assert [i.key for i in drv.list()] == ["k"]
    with pytest.raises(NotFound):
        drv.head("new")


# --- listing -----------------------------------------------------------------------------------


def test_list_is_relative_to_the_prefix_and_not_on_folder_boundaries(
    srv, drv: S3Driver
) -> None:
    neighbour = srv.driver(
        "replica2", bucket=drv.bucket
    )  # 'replica2/...' shares the string prefix
    root = srv.driver("", bucket=drv.bucket)
    for key in (
        "generations/0001/snap",
        "generations/0002/seg",
        "gen",
        "genx/y",
        "other",
    ):
        drv.put(key, key.encode())
    neighbour.put("generations/9999/x", b"not mine")
    assert [i.key for i in drv.list("gen")] == [
        "gen",
        "generations/0001/snap",
        "generations/0002/seg",
        "genx/y",
    ]
    assert [i.key for i in drv.list("generations/")] == [
        "generations/0001/snap",
        "generations/0002/seg",
    ]
    assert [i.key for i in drv.list("generations/000", page_size=1)] == [
        "generations/0001/snap",
        "generations/0002/seg",
    ]
    infos = list(drv.list("other"))
    assert (
        infos[0].size == 5
        and infos[0].etag
        and abs(infos[0].modified - time.time()) < 60
    )
    assert [i.key for i in neighbour.list()] == ["generations/9999/x"]
    assert "replica/gen" in [i.key for i in root.list()]
    assert "replica2/generations/9999/x" in [i.key for i in root.list("replica2/")]


# --- reads release their connection -----------------------------------------------------------


def test_get_streams_release_connections(drv: S3Driver) -> None:
    drv.put("k", bytes(3 * MiB))
    pool = drv._http.connection_from_url(drv.endpoint)
    for _ in range(3 * 32):  # more than the pool holds
        with drv.get("k") as stream:
            assert stream.read(10) == bytes(
                10
            )  # stop early: the connection is dropped, its slot freed
    for _ in range(20):
        assert drv.get_bytes("k", offset=5, length=100) == bytes(100)
    assert pool.pool.qsize() == pool.pool.maxsize  # every slot is back
    created = pool.num_connections
    for _ in range(20):
        drv.get_bytes(
            "k", offset=7, length=3
        )  # read to the end: the connection is reused
    assert pool.num_connections - created <= 1


def test_read_after_close_fails_cleanly(drv: S3Driver) -> None:
    drv.put("k", b"abc")
    stream = drv.get("k")
    stream.close()
    with pytest.raises(ValueError):
        stream.read()


# --- conditional create ------------------------------------------------------------------------


def test_conditional_create_is_not_claimed_on_rclone(drv: S3Driver) -> None:
    # rclone serve s3 ignores If-None-Match: a second create overwrites. So no capability.
    assert Capability.CONDITIONAL_CREATE not in drv.capabilities
    assert drv.probe_conditional_create() is False
    assert Capability.CONDITIONAL_CREATE not in drv.capabilities
    assert [i.key for i in drv.list()] == []  # the probe cleaned up
    # Best effort still refuses an object that is plainly there.
    drv.put("lock", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed) as caught:
        drv.put("lock", b"second", if_absent=True)
    assert caught.value.key == "lock"
    assert drv.get_bytes("lock") == b"first"


# --- faults: the server dies or hangs mid-transfer --------------------------------------------


def test_server_killed_mid_upload_raises_transient_and_leaves_nothing(
    private_server, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    server = private_server
    drv = server.driver("replica", read_timeout=5, connect_timeout=2)
    drv.put("k", b"old")
    size = 3 * DEFAULT_PART_SIZE

    def kill_mid_way(total: int) -> None:
        if (
            total == DEFAULT_PART_SIZE + 2 * MiB
        ):  # part 1 is on the server, part 2 filling
            server.stop()

    started = time.monotonic()
    with pytest.raises(Transient) as caught:
        drv.put("big", Pattern(size), progress=kill_mid_way)
    assert time.monotonic() - started < 20
    assert "big" in str(caught.value) and server.endpoint in str(caught.value)
    with pytest.raises(Transient):
        drv.head("big")  # the server is down: connection refused, at once

    server.restart()
    with pytest.raises(NotFound):
        drv.head("big")
    assert [i.key for i in drv.list()] == ["k"]  # no partial object, the old one intact
    assert drv.get_bytes("k") == b"old"

    source = Pattern(size)
    drv.put("big", source)
    assert digest_of(drv, "big") == source.sha256.hexdigest()
    assert [i.key for i in drv.list()] == ["big", "k"]
    assert secret_free(caplog.text + str(caught.value), server.secret)


def test_server_killed_during_a_single_put_body(private_server) -> None:
    server = private_server
    drv = server.driver("replica", read_timeout=5, connect_timeout=2)
    size = DEFAULT_PART_SIZE - MiB  # one plain PUT, sent once everything is buffered
    stored: list[str] = []
    failed = None
    for attempt in range(20):  # the kill lands before, during or after the send
        key = f"one-{attempt}"
        timer = threading.Timer(0.003, server.stop)

        def kill_soon(total: int, timer: threading.Timer = timer) -> None:
            if total == size:
                timer.start()

        try:
            drv.put(key, Pattern(size), progress=kill_soon)
            stored.append(key)
        except Transient as exc:
            failed = (key, exc)
        if timer.ident is not None:
            timer.join()
        server.restart()
        if failed:
            break
    assert failed is not None, "the server was never killed mid-put"
    key, exc = failed
    assert key in str(exc) and server.endpoint in str(exc)
    with pytest.raises(NotFound):
        drv.head(key)
    assert [i.key for i in drv.list()] == stored  # nothing half-written shows
    source = Pattern(size)
    drv.put(key, source)
    assert digest_of(drv, key) == source.sha256.hexdigest()


def test_frozen_server_times_out_instead_of_hanging(private_server) -> None:
    server = private_server
    drv = server.driver("replica", read_timeout=2, connect_timeout=1)
    size = 2 * DEFAULT_PART_SIZE + MiB

    def freeze_mid_way(total: int) -> None:
        if total == DEFAULT_PART_SIZE + MiB:
            server.freeze()

    started = time.monotonic()
    try:
        with pytest.raises(Transient) as caught:
            drv.put("big", Pattern(size), progress=freeze_mid_way)
        elapsed = time.monotonic() - started
    finally:
        server.thaw()
    assert "timed out" in str(caught.value)
    assert elapsed < 15, f"took {elapsed:.1f}s"
    with pytest.raises(NotFound):
        drv.head("big")
    source = Pattern(size)
    drv.put("big", source)
    assert digest_of(drv, "big") == source.sha256.hexdigest()


def test_frozen_server_during_a_read_times_out(private_server) -> None:
    server = private_server
    drv = server.driver("replica", read_timeout=1, connect_timeout=1)
    drv.put("big", Pattern(40 * MiB))
    stream = drv.get("big")
    try:
        stream.read(MiB)
        server.freeze()
        started = time.monotonic()
        with pytest.raises(Transient) as caught:
            while stream.read(MiB):
                pass
        assert time.monotonic() - started < 10
        assert "big" in str(caught.value)
    finally:
        server.thaw()
        stream.close()


def test_retrying_driver_rides_out_a_restart(private_server) -> None:
    server = private_server
    drv = RetryingDriver(
        server.driver("replica", connect_timeout=1),
        attempts=8,
        base_delay=0.2,
        max_delay=1,
    )
    server.stop()
    threading.Timer(0.5, server.start).start()
    payload = bytes(range(256)) * 4096
    drv.put("k", io.BytesIO(payload))
    assert drv.get_bytes("k") == payload


def test_module_helpers_describe_the_shared_server() -> None:
    endpoint, access, secret = server_s3.s3_server()
    assert endpoint.startswith("http://127.0.0.1:")
    assert len(access) == 20 and len(secret) == 40
