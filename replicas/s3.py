"""The `s3` driver: objects in an S3 bucket (AWS or any S3-compatible server), on the minio client.

URL: `s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:9000&region=us-east-1&force-path-style=true`.
Options (keyword arguments, as the config passes them, or in the query with '-' or '_'):
endpoint, region, access_key_id, secret_access_key, session_token, force_path_style,
skip_verify, part_size. Secrets are refused in the URL: give them as options or in the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or
MINIO_ACCESS_KEY and MINIO_SECRET_KEY).

Objects live under PREFIX + '/' in BUCKET. Uploads stream: at most one part (part_size,
16 MiB by default) is held in memory; an object larger than one part goes up as a
multipart upload, completed (made visible) only once every part is in, and aborted on
failure. Reads stream and release their connection on close. urllib3's own retries are
off: callers wrap the driver in RetryingDriver, which retries `Transient` errors.

Conditional create: put(if_absent=True) checks with HEAD and sends `If-None-Match: *`,
which AWS S3 and MinIO enforce atomically but other servers (rclone serve s3, for one)
ignore. So CONDITIONAL_CREATE is not declared; probe_conditional_create() tests the
server and declares it on the instance when the server really refuses the second create.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO
from xml.etree import ElementTree

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name, md5sum_hash
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.exceptions import SSLError as Urllib3SSLError

from .base import (
    Capability,
    Driver,
    ObjectInfo,
    check_page_size,
    check_range,
    iter_chunks,
)
from .errors import (
    BadURL,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from .keys import MAX_KEY_BYTES, validate_key, validate_prefix

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3 rejects smaller parts (except the last)
MAX_PART_SIZE = 5 * 1024 * MiB
DEFAULT_REGION = "us-east-1"
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
POOL_SIZE = 32

_OPTIONS = (
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "force_path_style",
    "skip_verify",
    "part_size",
)
_SECRET_OPTIONS = frozenset({"secret_access_key", "session_token"})
_BOOL_WORDS = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
        "NoSuchUpload",  # an expired or aborted multipart upload: the whole put can be redone
    }
)
_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_CODE_IN_BODY = re.compile(r"<Code>\s*([A-Za-z0-9.]+)\s*</Code>")


class S3Driver(Driver):
    """Objects under a prefix of an S3 bucket."""

    scheme = "s3"
    capabilities = Capability.RANGE_READ

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        force_path_style: bool | None = None,
        skip_verify: bool = False,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise BadURL(f"invalid S3 bucket name {bucket!r}: {exc}") from None
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)

        endpoint = (
            endpoint
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None
        )
        self._explicit_endpoint = endpoint is not None
        self.endpoint, host, self.secure = _parse_endpoint(endpoint or DEFAULT_ENDPOINT)
        self.region = (
            region
            or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or DEFAULT_REGION
        )
        if not _REGION.match(self.region):
            raise BadURL(f"invalid S3 region {self.region!r}")
        if not isinstance(part_size, int) or isinstance(part_size, bool):
            raise BadURL(
                f"S3 option part_size must be a number of bytes, not {part_size!r}"
            )
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise BadURL(
                f"S3 option part_size must be between 5 MiB and 5 GiB (got {part_size} bytes)"
            )
        self.part_size = part_size
        self.skip_verify = bool(skip_verify)

        access, secret, token = _credentials(
            access_key_id, secret_access_key, session_token, env
        )
        self._secrets = tuple(s for s in (secret, token) if s and len(s) >= 4)

        self.url = f"s3://{bucket}"
        if self.prefix:
            self.url += "/" + urllib.parse.quote(self.prefix[:-1], safe="/")
        if self._explicit_endpoint:
            self.url += f"?endpoint={self.endpoint}"

        if self.secure and self.skip_verify:
            log.warning(
                "TLS certificate verification is disabled for S3 endpoint %s (skip-verify):"
                " the connection can be intercepted",
                self.endpoint,
            )
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=POOL_SIZE,
            block=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,  # RetryingDriver retries Transient errors; no hidden retries here
            cert_reqs="CERT_NONE" if self.skip_verify else "CERT_REQUIRED",
            ca_certs=None
            if self.skip_verify
            else (env.get("SSL_CERT_FILE") or certifi.where()),
        )
        try:
            self._client = Minio(
                host,
                access_key=access,
                secret_key=secret,
                session_token=token,
                secure=self.secure,
                region=self.region,  # without it minio probes the bucket location, which fails on many servers
                http_client=self._http,
                cert_check=not self.skip_verify,
            )
        except ValueError as exc:
            raise BadURL(
                f"invalid S3 endpoint {self.endpoint!r}: {self._scrub(str(exc))}"
            ) from None
        if force_path_style is True:
            self._client.disable_virtual_style_endpoint()
        elif force_path_style is False:
            self._client.enable_virtual_style_endpoint()
        self._bucket_seen = False

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Driver:
        """Open `s3://BUCKET[/PREFIX][?option=value&...]` with keyword options from a config."""
        shown = _redact(url)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise BadURL(f"not an s3 URL: {shown}")
        if "@" in parts.netloc:
            raise BadURL(
                f"s3 URL must not carry credentials ({shown}): give access-key-id and"
                " secret-access-key as options or in the environment"
            )
        if parts.fragment:
            raise BadURL(f"s3 URL must not have a fragment: {shown}")
        bucket = urllib.parse.unquote(parts.netloc)
        if not bucket:
            raise BadURL(f"s3 URL needs a bucket: s3://BUCKET/PREFIX (got {shown})")
        given: dict[str, Any] = {}
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            option = name.replace("-", "_")
            if option not in _OPTIONS:
                raise BadURL(
                    f"unknown option {name!r} for s3 replica {shown} (known: {_known()})"
                )
            if option in _SECRET_OPTIONS:
                raise BadURL(
                    f"s3 option {name!r} is a secret: give it as an option or in the environment,"
                    f" not in the URL ({shown})"
                )
            if option in given:
                raise BadURL(f"s3 option {name!r} given twice in {shown}")
            given[option] = value
        for name, value in options.items():
            option = name.replace("-", "_")
            if option not in _OPTIONS:
                raise BadURL(
                    f"unknown option {name!r} for s3 replica {shown} (known: {_known()})"
                )
            if value is None:
                continue
            if option in given and _parse_option(
                option, given[option], shown
            ) != _parse_option(option, value, shown):
                raise BadURL(
                    f"s3 option {name!r} is given both in the URL and as an option for {shown}"
                )
            given[option] = value
        parsed = {
            name: _parse_option(name, value, shown) for name, value in given.items()
        }
        prefix = urllib.parse.unquote(parts.path)
        return cls(bucket, prefix, **parsed)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (for tests and an opt-in config key)."""
        if self._call(
            "check bucket", None, lambda: self._client.bucket_exists(self.bucket)
        ):
            self._bucket_seen = True
            return
        try:
            self._call(
                "create bucket",
                None,
                lambda: self._client.make_bucket(self.bucket, location=self.region),
            )
        except StorageError as exc:
            # Lost a race with another creator: fine if it is there now.
            if not self._client_bucket_exists_quietly():
                raise exc from None
        self._bucket_seen = True

    def probe_conditional_create(self) -> bool:
        """Test whether the server enforces `If-None-Match: *`; if so, declare CONDITIONAL_CREATE.

        Writes and deletes one probe object under the prefix. Returns the verdict.
        """
        name = f"{self.prefix}.replicator-probe-{secrets.token_hex(8)}"
        headers = {"Content-Type": "application/octet-stream", "If-None-Match": "*"}
        enforced = False
        try:
            self._call(
                "probe",
                name,
                lambda: self._client._put_object(
                    self.bucket, name, b"1", dict(headers)
                ),
            )
            try:
                self._call(
                    "probe",
                    name,
                    lambda: self._client._put_object(
                        self.bucket, name, b"2", dict(headers)
                    ),
                )
            except PreconditionFailed:
                enforced = True
        finally:
            with contextlib.suppress(StorageError):
                self._call(
                    "delete",
                    name,
                    lambda: self._client.remove_object(self.bucket, name),
                )
        if enforced:
            self.capabilities = type(self).capabilities | Capability.CONDITIONAL_CREATE  # type: ignore[misc]
        return enforced

    # --- the Driver operations --------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        name = self._name(key)
        if if_absent:
            try:
                self.head(key)
            except NotFound:
                pass
            else:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
        headers = {"Content-Type": "application/octet-stream"}
        final_headers = dict(headers, **({"If-None-Match": "*"} if if_absent else {}))
        client, bucket, part_size = self._client, self.bucket, self.part_size

        buffer = bytearray()  # grows to part_size once, then is refilled in place
        fill = 0
        upload_id: str | None = None
        parts: list[Part] = []
        sent = 0
        try:
            for chunk in iter_chunks(data, key=key, size=size, progress=progress):
                view = memoryview(chunk).cast("B")
                pos = 0
                while pos < len(view):
                    if (
                        fill == part_size
                    ):  # a full part and more data: it is a multipart upload
                        if upload_id is None:
                            upload_id = self._call(
                                "put",
                                key,
                                lambda: client._create_multipart_upload(
                                    bucket, name, dict(headers)
                                ),
                            )
                        number = len(parts) + 1
                        with memoryview(buffer) as body:
                            etag = self._call(
                                "put",
                                key,
                                lambda body=body, uid=upload_id, number=number: (
                                    client._upload_part(
                                        bucket, name, body, None, uid, number
                                    )
                                ),
                            )
                        parts.append(Part(number, etag))
                        sent += fill
                        fill = 0
                    n = min(part_size - fill, len(view) - pos)
                    buffer[fill : fill + n] = view[pos : pos + n]
                    fill += n
                    pos += n
            with memoryview(buffer) as whole, whole[:fill] as body:
                if upload_id is None:
                    result = self._call(
                        "put",
                        key,
                        lambda: client._put_object(
                            bucket, name, body, dict(final_headers)
                        ),
                    )
                    etag = result.etag
                else:
                    number = len(parts) + 1
                    part_etag = self._call(
                        "put",
                        key,
                        lambda: client._upload_part(
                            bucket, name, body, None, upload_id, number
                        ),
                    )
                    parts.append(Part(number, part_etag))
                    etag = self._complete(key, name, upload_id, parts, if_absent)
            sent += fill
        except BaseException as exc:
            if upload_id is not None:
                self._abort(key, name, upload_id, exc)
            raise
        self._bucket_seen = True
        return ObjectInfo(key, sent, time.time(), etag or None)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        name = self._name(key)
        if length == 0:
            self.head(key)  # NotFound if missing
            return io.BytesIO(b"")  # type: ignore[return-value]
        ranged = offset > 0 or length is not None
        try:
            response = self._client.get_object(
                self.bucket, name, offset=offset, length=length or 0
            )
        except Exception as exc:  # noqa: BLE001 - mapped below
            if _status_of(exc) == 416 or _code_of(exc) == "InvalidRange":
                return io.BytesIO(b"")  # type: ignore[return-value]  # offset at or past the end
            raise self._error(exc, "get", key) from None
        self._bucket_seen = True
        skip = 0
        if ranged and not response.headers.get("content-range"):
            skip = offset  # the server ignored Range and sent the whole object
        raw = _Body(self, response, key, skip=skip, limit=length)
        return io.BufferedReader(raw, buffer_size=64 * 1024)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            stat = self._call(
                "head", key, lambda: self._client.stat_object(self.bucket, name)
            )
        except NotFound:
            # HEAD replies carry no body, so a missing bucket looks like a missing key.
            if not self._bucket_seen:
                self._check_bucket(key)
            raise
        modified = stat.last_modified.timestamp() if stat.last_modified else 0.0
        return ObjectInfo(key, int(stat.size or 0), modified, stat.etag or None)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        check_page_size(page_size)
        validate_prefix(prefix)
        return self._list(prefix, min(page_size, 1000))

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._call(
                "delete", key, lambda: self._client.remove_object(self.bucket, name)
            )
        except NotFound as exc:
            if getattr(exc, "bucket_missing", False):
                raise  # deleting from a missing bucket is an error, not "already gone"
            return

    def close(self) -> None:
        self._http.clear()

    # --- helpers ------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        validate_key(key)
        name = self.prefix + key
        if len(name.encode("utf-8")) > MAX_KEY_BYTES:
            raise InvalidKey(
                f"{self.url}: key {key[:200]!r} is too long with the prefix {self.prefix!r}"
                f" (S3 allows {MAX_KEY_BYTES} bytes)",
                key=key,
            )
        return name

    def _list(self, prefix: str, page_size: int) -> Iterator[ObjectInfo]:
        objects = self._client._list_objects(
            self.bucket,
            prefix=self.prefix + prefix,
            max_keys=page_size,
            encoding_type="url",
        )
        while True:
            try:
                obj = next(objects)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - mapped
                raise self._error(exc, "list", prefix or None) from None
            self._bucket_seen = True
            name = obj.object_name or ""
            if not name.startswith(self.prefix):
                continue
            key = name[len(self.prefix) :]
            try:
                validate_key(key)
            except InvalidKey:
                if not key.endswith(
                    "/"
                ):  # folder markers are expected; other names are odd
                    log.warning(
                        "skipping object with an invalid key name in %s: %r",
                        self.url,
                        key[:200],
                    )
                continue
            modified = obj.last_modified.timestamp() if obj.last_modified else 0.0
            etag = (obj.etag or "").strip('"') or None
            yield ObjectInfo(key, int(obj.size or 0), modified, etag)

    def _complete(
        self, key: str, name: str, upload_id: str, parts: list[Part], if_absent: bool
    ) -> str:
        """CompleteMultipartUpload, with If-None-Match when creating conditionally."""
        element = ElementTree.Element("CompleteMultipartUpload")
        for part in parts:
            tag = ElementTree.SubElement(element, "Part")
            ElementTree.SubElement(tag, "PartNumber").text = str(part.part_number)
            ElementTree.SubElement(tag, "ETag").text = f'"{part.etag}"'
        body = ElementTree.tostring(element)
        headers = {"Content-Type": "application/xml", "Content-MD5": md5sum_hash(body)}
        if if_absent:
            headers["If-None-Match"] = "*"
        response = self._call(
            "put",
            key,
            lambda: self._client._execute(
                "POST",
                self.bucket,
                name,
                body=body,
                headers=headers,
                query_params={"uploadId": upload_id},
            ),
        )
        # S3 may report a failed completion in a 200 reply.
        text = response.data.decode("utf-8", "replace") if response.data else ""
        try:
            root = ElementTree.fromstring(text) if text.strip() else None
        except ElementTree.ParseError:
            root = None
        if root is not None and root.tag.rpartition("}")[2] == "Error":
            code = _CODE_IN_BODY.search(text)
            raise self._status_error(
                500, code.group(1) if code else "InternalError", "put", key
            )
        etag = ""
        if root is not None:
            for child in root.iter():
                if child.tag.rpartition("}")[2] == "ETag" and child.text:
                    etag = child.text.strip('"')
        return etag

    def _abort(self, key: str, name: str, upload_id: str, cause: BaseException) -> None:
        """Best-effort AbortMultipartUpload; skipped when the server just timed out."""
        if isinstance(cause, Transient) and "timed out" in cause.message:
            log.warning(
                "%s: not aborting the multipart upload of %r after a timeout; the server expires it",
                self.url,
                key,
            )
            return
        try:
            self._call(
                "abort upload of",
                key,
                lambda: self._client._abort_multipart_upload(
                    self.bucket, name, upload_id
                ),
            )
        except StorageError as exc:
            log.warning(
                "%s: could not abort the multipart upload of %r: %s", self.url, key, exc
            )

    def _check_bucket(self, key: str | None) -> None:
        exists = self._call(
            "check bucket", key, lambda: self._client.bucket_exists(self.bucket)
        )
        if not exists:
            raise self._bucket_missing(key)
        self._bucket_seen = True

    def _client_bucket_exists_quietly(self) -> bool:
        try:
            return bool(self._client.bucket_exists(self.bucket))
        except Exception:  # noqa: BLE001
            return False

    def _call(self, action: str, key: str | None, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client error is mapped
            raise self._error(exc, action, key) from None

    def _bucket_missing(self, key: str | None) -> NotFound:
        error = NotFound(
            f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint} (create it first)",
            key=key,
        )
        error.bucket_missing = True  # type: ignore[attr-defined]
        return error

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException, action: str, key: str | None) -> StorageError:
        """Translate a minio/urllib3/socket error into the driver's hierarchy (one line, no secrets)."""
        status, code = _status_of(exc), _code_of(exc)
        if status is not None or code is not None:
            return self._status_error(status, code, action, key)
        what = f"{self.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
        where = f" at {self.endpoint}"
        reason = self._scrub(_reason(exc))
        if isinstance(exc, MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        if isinstance(exc, (Urllib3SSLError, ssl.SSLError)):
            if (
                "CERTIFICATE_VERIFY_FAILED" in reason
                or "certificate verify failed" in reason
            ):
                return StorageError(
                    f"{what}{where}: TLS certificate not trusted ({reason});"
                    " fix the server certificate or set SSL_CERT_FILE (skip-verify disables the check)",
                    key=key,
                )
            return Transient(f"{what}{where}: TLS error: {reason}", key=key)
        if isinstance(
            exc, (Urllib3HTTPError, OSError, socket.timeout, ConnectionError)
        ):
            if "timed out" in reason.lower() or isinstance(
                exc, (socket.timeout, TimeoutError)
            ):
                return Transient(f"{what}{where}: timed out ({reason})", key=key)
            return Transient(f"{what}{where}: connection failed ({reason})", key=key)
        if isinstance(exc, ElementTree.ParseError):
            return StorageError(
                f"{what}{where}: unreadable reply from the server ({reason})", key=key
            )
        if isinstance(exc, ValueError):
            return StorageError(f"{what}{where}: {reason}", key=key)
        return StorageError(f"{what}{where}: {type(exc).__name__}: {reason}", key=key)

    def _status_error(
        self, status: int | None, code: str | None, action: str, key: str | None
    ) -> StorageError:
        what = f"{self.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
        detail = " ".join(
            str(x) for x in (f"HTTP {status}" if status else None, code) if x
        )
        where = f" at {self.endpoint} ({detail})"
        if code == "NoSuchBucket":
            return self._bucket_missing(key)
        if code in ("NoSuchKey", "NotFound") or (
            status == 404 and code in (None, "ResourceNotFound")
        ):
            return NotFound(
                f"{self.url}: {key!r} not found at {self.endpoint}", key=key
            )
        if status == 404:
            return NotFound(f"{what}{where}: not found", key=key)
        if code in _PERMISSION_CODES or status in (401, 403):
            hint = ""
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId"):
                hint = " (check the access key id and secret access key)"
            elif code == "RequestTimeTooSkewed":
                hint = " (the local clock is off)"
            return PermissionDenied(f"{what}{where}: access denied{hint}", key=key)
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
        if code in ("KeyTooLongError", "InvalidObjectName"):
            return InvalidKey(f"{what}{where}: the server refused the key", key=key)
        if (
            code in _TRANSIENT_CODES
            or status in (408, 429)
            or (status is not None and status >= 500)
        ):
            return Transient(f"{what}{where}: server error, worth retrying", key=key)
        return StorageError(f"{what}{where}: request failed", key=key)


class _Body(io.RawIOBase):
    """The body of a GET: maps read errors, honours a limit, releases the connection on close."""

    def __init__(
        self, driver: S3Driver, response: Any, key: str, *, skip: int, limit: int | None
    ) -> None:
        self._driver = driver
        self._response = response
        self._key = key
        self._skip = skip
        self._left = limit
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        if not view or self._eof:
            return 0
        try:
            while self._skip:
                dropped = self._response.read(min(self._skip, 1 << 20))
                if not dropped:
                    break
                self._skip -= len(dropped)
            data = self._response.read(len(view))
        except Exception as exc:  # noqa: BLE001
            raise self._driver._error(exc, "read", self._key) from None
        if not data:
            self._eof = True
            return 0
        n = len(data)
        view[:n] = data
        if self._left is not None:
            self._left -= n
        return n

    def readall(self) -> bytes:
        out = bytearray()
        while True:
            chunk = self.read(1 << 20)
            if not chunk:
                return bytes(out)
            out += chunk

    def close(self) -> None:
        if self.closed:
            return
        response, self._response = self._response, None
        with contextlib.suppress(Exception):  # closing never fails the caller
            done = self._eof or (
                self._left == 0 and not self._skip and _exhausted(response)
            )
            if not done:
                response.close()  # unread bytes on the wire: the connection cannot be reused
            response.release_conn()
        super().close()


def _exhausted(response: Any) -> bool:
    try:
        remaining = response.length_remaining
    except AttributeError:
        return False
    return remaining == 0


def from_url(url: str, **options: Any) -> S3Driver:
    """Open an s3:// replica URL (the registry's factory)."""
    return S3Driver.from_url(url, **options)


# --- parsing ----------------------------------------------------------------------------


def _known() -> str:
    return ", ".join(name.replace("_", "-") for name in _OPTIONS)


def _redact(url: str) -> str:
    from .registry import redact_url

    return redact_url(url)


def _normalise_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise BadURL(f"s3 prefix must be a str, not {type(prefix).__name__}")
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    try:
        validate_key(stripped)
    except InvalidKey as exc:
        raise BadURL(
            f"invalid s3 prefix {prefix[:200]!r}: {exc.message.partition(': ')[2]}"
        ) from None
    return stripped + "/"


def _parse_endpoint(endpoint: str) -> tuple[str, str, bool]:
    """(display form, host[:port] for minio, secure) from `http(s)://host[:port]` or `host[:port]`."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise BadURL(f"invalid S3 endpoint {endpoint!r}")
    text = endpoint.strip()
    if "://" not in text:
        text = "https://" + text  # TLS unless asked otherwise
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadURL(
            f"S3 endpoint must start with http:// or https:// (got {endpoint!r})"
        )
    if parts.username or parts.password:
        raise BadURL("S3 endpoint must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadURL(
            f"S3 endpoint must be scheme://host[:port] without a path (got {endpoint!r})"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BadURL(f"invalid port in S3 endpoint {endpoint!r}") from None
    if not parts.hostname:
        raise BadURL(f"S3 endpoint has no host: {endpoint!r}")
    host = parts.netloc
    return f"{scheme}://{host}", host, scheme == "https"


def _credentials(
    access: str | None, secret: str | None, token: str | None, env: Mapping[str, str]
) -> tuple[str | None, str | None, str | None]:
    if access or secret:
        if not (access and secret):
            missing = "secret-access-key" if access else "access-key-id"
            raise BadURL(f"s3 credentials incomplete: {missing} is missing")
        return access, secret, token or None
    if token:
        raise BadURL(
            "s3 session-token given without access-key-id and secret-access-key"
        )
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
            raise BadURL(
                "s3 credentials incomplete: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return (
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            env.get("AWS_SESSION_TOKEN") or None,
        )
    if env.get("MINIO_ACCESS_KEY") or env.get("MINIO_SECRET_KEY"):
        if not (env.get("MINIO_ACCESS_KEY") and env.get("MINIO_SECRET_KEY")):
            raise BadURL(
                "s3 credentials incomplete: set both MINIO_ACCESS_KEY and MINIO_SECRET_KEY"
            )
        return env["MINIO_ACCESS_KEY"], env["MINIO_SECRET_KEY"], None
    return None, None, None  # anonymous: public buckets only


def _parse_option(name: str, value: Any, shown: str) -> Any:
    if name in ("force_path_style", "skip_verify"):
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word == "" and name != "skip_verify":  # `?force-path-style` alone means true
            return True
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word]
        raise BadURL(
            f"s3 option {name.replace('_', '-')!r} must be true or false (got {value!r}) in {shown}"
        )
    if name == "part_size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        match = _SIZE.match(str(value))
        if not match:
            raise BadURL(
                f"s3 option 'part-size' must be a size like 16MiB (got {value!r}) in {shown}"
            )
        number, unit = int(match.group(1)), match.group(2).lower()
        return number * 1024 ** "_kmgt".index(unit or "_")
    if not isinstance(value, str):
        raise BadURL(
            f"s3 option {name.replace('_', '-')!r} must be a string in {shown}"
        )
    return value


# --- error inspection -------------------------------------------------------------------


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, S3Error):
        response = getattr(exc, "response", None)
        status = getattr(response, "status", None)
        return int(status) if isinstance(status, int) else None
    if isinstance(exc, InvalidResponseError):
        code = getattr(exc, "_code", None)
        return int(code) if isinstance(code, int) else None
    if isinstance(exc, ServerError):
        return exc.status_code
    return None


def _code_of(exc: BaseException) -> str | None:
    if isinstance(exc, S3Error):
        return exc.code
    if isinstance(exc, InvalidResponseError):
        match = _CODE_IN_BODY.search(getattr(exc, "_body", None) or "")
        return match.group(1) if match else None
    return None


def _reason(exc: BaseException) -> str:
    """A short one-line description of a transport error, without dumping server bodies."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        return _reason(exc.reason)
    if isinstance(exc, MinioException):
        return type(exc).__name__
    if (
        isinstance(exc, ProtocolError)
        and len(exc.args) == 2
        and isinstance(exc.args[1], BaseException)
    ):
        outer, inner = str(exc.args[0]).rstrip("."), exc.args[1]
        text = (
            outer
            if str(inner) and str(inner) in outer
            else f"{outer}: {_reason(inner)}"
        )
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{type(exc).__name__}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = re.sub(r"<urllib3\.[^>]*>:?\s*", "", text)
    text = " ".join(text.split())
    return text[:300]
