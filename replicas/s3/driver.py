"""S3Driver: the Driver operations on an S3 bucket; see the package docstring."""

from __future__ import annotations

import contextlib
import email.utils
import io
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from minio import Minio
from minio.helpers import check_bucket_name

from ..base import (
    Capability,
    Driver,
    ObjectInfo,
    check_page_size,
    check_range,
    iter_chunks,
)
from ..errors import (
    BadURL,
    IntegrityError,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    StorageError,
)
from ..keys import MAX_KEY_BYTES, validate_key, validate_prefix
from ..resume import ResumingReader, Version
from . import config
from .config import (
    CONNECT_TIMEOUT,
    DEFAULT_ENDPOINT,
    DEFAULT_PART_SIZE,
    DEFAULT_REGION,
    READ_TIMEOUT,
)
from .errors import ErrorMapper, code_of, status_of
from .http import ConnectionTracker, pool_manager
from .multipart import Upload
from .reader import Body

log = logging.getLogger("replicas.s3")


class S3Driver(Driver):
    """Objects under a prefix of an S3 bucket."""

    scheme = "s3"
    capabilities = Capability.RANGE_READ | Capability.MULTIPART

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
        self.prefix = config.normalise_prefix(prefix)

        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        self._explicit_endpoint = endpoint is not None
        self.endpoint, host, self.secure = config.parse_endpoint(endpoint or DEFAULT_ENDPOINT)
        self.region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        if not config.REGION.match(self.region):
            raise BadURL(f"invalid S3 region {self.region!r}")
        self.part_size = config.check_part_size(part_size)
        self.skip_verify = bool(skip_verify)

        access, secret, token = config.credentials(access_key_id, secret_access_key, session_token, env)
        self.url = f"s3://{bucket}"
        if self.prefix:
            self.url += "/" + urllib.parse.quote(self.prefix[:-1], safe="/")
        if self._explicit_endpoint:
            self.url += f"?endpoint={self.endpoint}"
        self._errors = ErrorMapper(
            self.url, self.endpoint, bucket, (s for s in (secret, token) if s and len(s) >= 4)
        )

        if self.secure and self.skip_verify:
            log.warning(
                "TLS certificate verification is disabled for S3 endpoint %s (skip-verify):"
                " the connection can be intercepted",
                self.endpoint,
            )
        self._tracker = ConnectionTracker()
        self._http = pool_manager(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            skip_verify=self.skip_verify,
            env=env,
            tracker=self._tracker,
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
            raise BadURL(f"invalid S3 endpoint {self.endpoint!r}: {self._errors.scrub(str(exc))}") from None
        if force_path_style is True:
            self._client.disable_virtual_style_endpoint()
        elif force_path_style is False:
            self._client.enable_virtual_style_endpoint()
        self._bucket_seen = False

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Driver:
        """Open `s3://BUCKET[/PREFIX][?option=value&...]` with keyword options from a config."""
        bucket, prefix, parsed = config.parse_url(url, options)
        return cls(bucket, prefix, **parsed)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (for tests and an opt-in config key)."""
        if self._call("check bucket", None, lambda: self._client.bucket_exists(self.bucket)):
            self._bucket_seen = True
            return
        try:
            self._call("create bucket", None, lambda: self._client.make_bucket(self.bucket, location=self.region))
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
            self._call("probe", name, lambda: self._client._put_object(self.bucket, name, b"1", dict(headers)))
            try:
                self._call("probe", name, lambda: self._client._put_object(self.bucket, name, b"2", dict(headers)))
            except PreconditionFailed:
                enforced = True
        finally:
            with contextlib.suppress(StorageError):
                self._call("delete", name, lambda: self._client.remove_object(self.bucket, name))
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
        upload = Upload(
            self._client, self._errors, self.bucket, name, key, part_size=self.part_size, if_absent=if_absent
        )
        etag = upload.run(iter_chunks(data, key=key, size=size, progress=progress))
        self._bucket_seen = True
        return ObjectInfo(key, upload.sent, time.time(), etag or None)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        """A stream that resumes with a ranged GET after a dropped connection (see resume.py)."""
        check_range(offset, length)
        name = self._name(key)
        if length == 0:
            self.head(key)  # NotFound if missing
            return io.BytesIO(b"")  # type: ignore[return-value]
        try:
            body, version = self._open_range(key, name, offset, length)
        except _PastTheEnd:
            return io.BytesIO(b"")  # type: ignore[return-value]
        if version is None:  # no size to check against: plain, not resumable
            return io.BufferedReader(body, buffer_size=64 * 1024)  # type: ignore[return-value]
        end = max(offset, version.size if length is None else min(version.size, offset + length))
        body.limit_to(end - offset)
        reader = ResumingReader(
            lambda at, count: self._reopen(key, name, at, count),
            url=self.url,
            key=key,
            offset=offset,
            end=end,
            stream=body,  # type: ignore[arg-type]
            version=version,
        )
        return io.BufferedReader(reader, buffer_size=64 * 1024)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            stat = self._call("head", key, lambda: self._client.stat_object(self.bucket, name))
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
            self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))
        except NotFound as exc:
            if getattr(exc, "bucket_missing", False):
                raise  # deleting from a missing bucket is an error, not "already gone"
            return

    def close(self) -> None:
        self._http.clear()

    def reset(self) -> None:
        """Shut down every connection, in use or idle: blocked requests fail, the next ones reconnect."""
        self._tracker.shutdown_all()
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
            self.bucket, prefix=self.prefix + prefix, max_keys=page_size, encoding_type="url"
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
                if not key.endswith("/"):  # folder markers are expected; other names are odd
                    log.warning("skipping object with an invalid key name in %s: %r", self.url, key[:200])
                continue
            modified = obj.last_modified.timestamp() if obj.last_modified else 0.0
            etag = (obj.etag or "").strip('"') or None
            yield ObjectInfo(key, int(obj.size or 0), modified, etag)

    def _open_range(self, key: str, name: str, offset: int, length: int | None) -> tuple[Body, Version | None]:
        """GET bytes [offset, offset + length) (to the end if length is None), and the object's Version."""
        try:
            response = self._client.get_object(self.bucket, name, offset=offset, length=length or 0)
        except Exception as exc:  # noqa: BLE001 - mapped below
            if status_of(exc) == 416 or code_of(exc) == "InvalidRange":
                raise _PastTheEnd from None  # offset at or past the end
            raise self._error(exc, "get", key) from None
        self._bucket_seen = True
        ranged = offset > 0 or length is not None
        skip = 0
        if ranged and not response.headers.get("content-range"):
            skip = offset  # the server ignored Range and sent the whole object
        body = Body(self._errors, response, key, skip=skip, limit=length)
        return body, version_of(response.headers)

    def _reopen(self, key: str, name: str, offset: int, length: int) -> tuple[Body, Version]:
        """_open_range for ResumingReader: a vanished end or version means the object changed."""
        try:
            body, version = self._open_range(key, name, offset, length)
        except _PastTheEnd:
            raise IntegrityError(f"{self.url}: {key!r} shrank while being read", key=key) from None
        if version is None:
            body.close()
            raise IntegrityError(f"{self.url}: {key!r}: the server no longer reports its size", key=key)
        return body, version

    def _check_bucket(self, key: str | None) -> None:
        exists = self._call("check bucket", key, lambda: self._client.bucket_exists(self.bucket))
        if not exists:
            raise self._errors.bucket_missing(key)
        self._bucket_seen = True

    def _client_bucket_exists_quietly(self) -> bool:
        try:
            return bool(self._client.bucket_exists(self.bucket))
        except Exception:  # noqa: BLE001
            return False

    def _call(self, action: str, key: str | None, operation: Callable[[], Any]) -> Any:
        return self._errors.call(action, key, operation)

    def _error(self, exc: BaseException, action: str, key: str | None) -> StorageError:
        """Translate a client error (see errors.ErrorMapper.translate)."""
        return self._errors.translate(exc, action, key)


class _PastTheEnd(Exception):
    """A ranged GET starting at or after the end of the object (HTTP 416)."""


def version_of(headers: Mapping[str, str]) -> Version | None:
    """The object's size, ETag and Last-Modified from GET reply headers (None without a size).

    A ranged reply gives the size after the '/' of Content-Range; a whole one, its
    Content-Length (a server that ignores Range sends the whole object, and says so).
    """
    size: int | None = None
    content_range = headers.get("content-range") or ""
    total = content_range.rpartition("/")[2].strip()
    if total.isdigit():
        size = int(total)
    elif not content_range and (headers.get("content-length") or "").strip().isdigit():
        size = int(headers["content-length"])
    if size is None:
        return None
    etag = (headers.get("etag") or "").strip().strip('"') or None
    modified = None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        modified = email.utils.parsedate_to_datetime(headers.get("last-modified") or "").timestamp()
    return Version(size, etag, modified)


def from_url(url: str, **options: Any) -> S3Driver:
    """Open an s3:// replica URL (the registry's factory)."""
    return S3Driver.from_url(url, **options)
