"""The `nats` driver: objects in a NATS JetStream object store bucket.

URL: `nats://[TOKEN@ | USER:PASSWORD@]HOST[:PORT][,HOST2[:PORT]...]/BUCKET[/PREFIX]`.
Options (keywords or URL query): username, password, token, nkey_path, creds_path,
tls_ca_path, skip_verify, max_bucket_bytes, timeout (seconds per request, default 10),
create_bucket (default true), tls. The object name is PREFIX/ + key. TLS is required
(never downgraded, certificates verified unless skip_verify) with `tls=true`, a
tls_ca_path, or a `tls://` URL given to NATSDriver.from_url; a server that demands TLS
gets it in any case.

nats-py is asyncio; the driver owns a private event loop in a daemon thread and every
method submits coroutines to it (`run_coroutine_threadsafe`), so callers stay synchronous
and thread-safe. Every await on the network carries a timeout: an outage turns into
Transient within about `timeout` seconds, never a hang, and nats-py reconnects by itself.

The wire format is the JetStream object store's (chunks on `$O.<bucket>.C.<nuid>`, a JSON
meta on `$O.<bucket>.M.<base64 name>` with a rollup header), so nats-py's ObjectStore and
the `nats` CLI read what this driver writes. Behaviour on top of it:

- put uploads the chunks from the calling thread (so a progress callback may use the
  driver), then publishes the meta: readers see the old object or the whole new one.
  A failed put purges its chunks, at once or, if the server is unreachable, later (after
  checking no meta points at them).
- put(if_absent=True) publishes the meta with Nats-Expected-Last-Subject-Sequence, which
  makes the create atomic (Capability.CONDITIONAL_CREATE).
- delete purges the meta (only up to the revision it read, so a concurrent put survives)
  and the chunks; it leaves no tombstone. Tombstones written by other clients are never
  listed.
- get downloads into a spooled temporary file (memory up to SPOOL_MEMORY, then disk),
  checking size and SHA-256 digest, and returns it: small objects by direct gets, large
  ones through a pull consumer, FETCH_BATCH chunks at a time (bounded memory). If the
  object is replaced while being read it starts again on the new revision. offset/length
  skip bytes rather than seek (a range read stops early but still transfers the chunks
  before the offset), so RANGE_READ is not declared.
- list reads every meta of the bucket once through an ordered consumer (names are base64
  in the subjects, so the server cannot filter by prefix; memory grows with the number of
  matching objects), then filters, sorts, and yields; page_size is only validated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

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
    IntegrityError,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from .keys import validate_key, validate_prefix
from .registry import redact_url

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api as js_api
    from nats.nuid import NUID
except ImportError:  # pragma: no cover - nats-py is an optional dependency
    nats = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 4222
DEFAULT_TIMEOUT = 10.0
CHUNK_BYTES = 128 * 1024
"""Object store chunk size (nats-py's and the Go client's default); far below max_payload."""
SPOOL_MEMORY = 1 << 20
"""Bytes of a download held in memory before the spool moves to a temporary file."""
DIRECT_READ_MAX_CHUNKS = 16
"""Objects with at most this many chunks are read by direct gets, larger ones by a consumer."""
FETCH_BATCH = 16
"""Chunks a large download asks for at a time (2 MiB in flight at most)."""
STALL_CHECK = 0.5
"""Seconds without a chunk after which a reader checks whether the object was replaced."""
MAX_ORPHANS = 10_000

_BUCKET = re.compile(r"^[A-Za-z0-9_-]+$")
_OPTIONS = (
    "username",
    "password",
    "token",
    "nkey_path",
    "creds_path",
    "tls_ca_path",
    "skip_verify",
    "max_bucket_bytes",
    "timeout",
    "create_bucket",
    "tls",
)
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_STREAM_NOT_FOUND = 10059
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_FULL = {10023, 10047, 10077}  # insufficient resources, store exceeded, maximum bytes exceeded
_FULL_TEXTS = ("maximum bytes exceeded", "maximum messages exceeded", "insufficient resources")


@dataclass(frozen=True)
class _Settings:
    servers: tuple[str, ...]  # host:port
    bucket: str
    prefix: str  # '' or ending in '/'
    tls: bool  # TLS required
    username: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_path: str | None = None
    creds_path: str | None = None
    tls_ca_path: str | None = None
    skip_verify: bool = False
    max_bucket_bytes: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    create_bucket: bool = True


@dataclass(frozen=True)
class _Meta:
    seq: int
    info: Any  # nats.js.api.ObjectInfo
    time: float | None


class _Replaced(Exception):
    """The object was overwritten or its chunks vanished while it was being read."""


class _PlaintextRefused(nats.errors.Error if nats is not None else Exception):  # type: ignore[misc]
    """TLS was required but the server did not negotiate it; credentials were withheld.

    A nats-py error, so nats-py treats it as a failed connection attempt (and reports it).
    """


def from_url(url: str, **options: object) -> NATSDriver:
    """Open `nats://[cred@]host:port/bucket/prefix` (or `tls://...`); see the module docstring."""
    return NATSDriver.from_url(url, **options)


class NATSDriver(Driver):
    """Objects in one JetStream object store bucket, under an optional name prefix."""

    scheme = "nats"
    capabilities = Capability.CONDITIONAL_CREATE

    def __init__(self, settings: _Settings) -> None:
        if nats is None:
            raise BadURL("nats replicas need nats-py: pip install 'replicator[remote]'")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        scheme = "tls" if settings.tls else "nats"
        self.url = f"{scheme}://{','.join(settings.servers)}/{settings.bucket}"
        if settings.prefix:
            self.url += "/" + urllib.parse.quote(settings.prefix.rstrip("/"), safe="/")
        self._stream = f"OBJ_{settings.bucket}"
        self._secrets = [s for s in (settings.password, settings.token) if s]
        self._ssl = self._ssl_context()
        if settings.nkey_path or settings.creds_path:
            try:
                import nkeys  # noqa: F401  (nats-py needs it for nkey and creds auth)
            except ImportError:
                raise BadURL(f"{self.url}: nkey_path/creds_path need the 'nkeys' package (pip install nkeys)")
        # Touched only on the loop thread.
        self._nc: Any = None
        self._js: Any = None
        self._ready = False
        self._direct = False
        self._connect_lock: asyncio.Lock | None = None
        self._orphans: dict[str, str] = {}  # chunk subject -> meta subject
        self._denied: tuple[float, str] | None = None  # last permissions violation
        # Shared between threads.
        self._nuid = NUID()
        self._nuid_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"nats-driver-{self.bucket}", daemon=True)
        self._thread.start()

    @classmethod
    def from_url(cls, url: str, **options: object) -> NATSDriver:
        """Parse a nats:// or tls:// URL and keyword options; BadURL names what is wrong."""
        return cls(_parse(url, options))

    # --- the Driver operations ----------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        name = self.prefix + validate_key(key)
        with self._nuid_lock:
            nuid = self._nuid.next().decode()
        chunks = self._chunk_subject(nuid)
        if if_absent:
            self._call(self._check_absent(name, key), "put", key)
        sha = hashlib.sha256()
        total = count = 0
        published = committed = False
        try:
            # Chunks are read (and progress reported) on this thread, so a slow source or a
            # progress callback that uses this driver never blocks the event loop.
            for piece in iter_chunks(data, key=key, size=size, progress=progress):
                published = True
                count += self._call(self._publish_chunks(chunks, piece), "put", key)
                sha.update(piece)
                total += len(piece)
            digest = "SHA-256=" + base64.urlsafe_b64encode(sha.digest()).decode()
            meta = js_api.ObjectInfo(
                name=name,
                bucket=self.bucket,
                nuid=nuid,
                size=total,
                chunks=count,
                digest=digest,
                mtime=datetime.now(UTC).isoformat(),
                options=js_api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
            )
            modified = self._call(self._commit(name, key, meta, if_absent), "put", key)
            committed = True
        finally:
            if published and not committed:
                self._call_quietly(self._discard(chunks, self._meta_subject(name)))
        return ObjectInfo(key, total, modified, digest)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        name = self.prefix + validate_key(key)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (returned to the caller)
        try:
            self._call(self._download(name, key, offset, length, spool), "get", key, bounded=False)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        name = self.prefix + validate_key(key)
        meta = self._call(self._current(name, key), "head", key)
        return ObjectInfo(key, meta.info.size or 0, _modified(meta), meta.info.digest or None)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        check_page_size(page_size)
        validate_prefix(prefix)
        return self._listing(prefix)

    def delete(self, key: str) -> None:
        name = self.prefix + validate_key(key)
        self._call(self._delete(name, key), "delete", key)

    def close(self) -> None:
        """Drain the connection (bounded by the timeout) and stop the loop thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(self.timeout + 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # --- calling into the loop ------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], action: str, key: str | None, *, bounded: bool = True) -> T:
        """Run coro on the loop; every failure comes back as a StorageError."""
        if self._closed or not self._loop.is_running():
            coro.close()
            raise StorageError(f"{self.url}: driver is closed", key=key)
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        # The coroutine bounds its own awaits; this outer bound is a safety net against a hang.
        limit = 6 * self.timeout + 30 if bounded else None
        try:
            return future.result(limit)
        except BaseException as exc:
            if not future.done():
                future.cancel()
                if isinstance(exc, TimeoutError):
                    raise Transient(
                        f"{self.url}: {action} {key!r} did not finish within {limit:.0f}s", key=key
                    ) from None
                raise
            if isinstance(exc, StorageError):
                raise
            if isinstance(exc, concurrent.futures.CancelledError):
                raise StorageError(f"{self.url}: {action} {key!r} cancelled: driver is closed", key=key) from None
            if not isinstance(exc, Exception):
                raise
            raise self._translate(exc, action, key, started) from exc

    def _call_quietly(self, coro: Coroutine[Any, Any, object]) -> None:
        try:
            self._call(coro, "clean up", None)
        except StorageError as exc:
            log.debug("%s: clean-up failed: %s", self.url, exc)

    def _translate(self, exc: BaseException, action: str, key: str | None, started: float) -> StorageError:
        """Map a nats-py (or OS) exception to the driver's hierarchy, with a one-line message."""
        what = f"{self.url}: cannot {action}" + (f" {key!r}" if key is not None else "")
        detail = self._scrub(_describe(exc))
        if isinstance(exc, nats.js.errors.APIError):
            code, err_code = exc.code or 0, exc.err_code or 0
            if err_code in _ERR_FULL or any(text in detail.lower() for text in _FULL_TEXTS):
                return StorageError(f"{what}: object store bucket {self.bucket!r} is full ({detail})", key=key)
            if isinstance(exc, nats.js.errors.ServiceUnavailableError) or code == 503:
                return Transient(f"{what}: JetStream not available ({detail})", key=key)
            if code in (401, 403) or "permission" in detail.lower() or "authoriz" in detail.lower():
                return PermissionDenied(f"{what}: {detail}", key=key)
            if err_code == _ERR_STREAM_NOT_FOUND:
                self._ready = False  # deleted under us: open (or create) it again next time
                return NotFound(f"{what}: object store bucket {self.bucket!r} not found", key=key)
            if isinstance(exc, nats.js.errors.NotFoundError):
                return NotFound(f"{what}: not found ({detail})", key=key)
            if code >= 500:
                return Transient(f"{what}: {detail}", key=key)
            return StorageError(f"{what}: {detail}", key=key)
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return Transient(f"{what}: JetStream did not answer ({detail})", key=key)
        if isinstance(exc, nats.errors.AuthorizationError):
            return PermissionDenied(f"{what}: authorization failed", key=key)
        if isinstance(exc, nats.js.errors.DigestMismatchError):
            return IntegrityError(f"{what}: digest mismatch", key=key)
        if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
            denied = self._denied
            if denied is not None and denied[0] >= started:
                return PermissionDenied(f"{what}: {self._scrub(denied[1])}", key=key)
            return Transient(f"{what}: timed out after {self.timeout:g}s ({detail})", key=key)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermissionDenied(f"{what}: TLS certificate verification failed ({detail})", key=key)
        transient = (
            OSError,
            EOFError,
            nats.errors.NoServersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.ConnectionDrainingError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.StaleConnectionError,
            nats.errors.FlushTimeoutError,
            nats.errors.SlowConsumerError,
            nats.errors.NoRespondersError,
        )
        if isinstance(exc, transient):
            return Transient(f"{what}: {detail}", key=key)
        return StorageError(f"{what}: {detail}", key=key)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # --- coroutines run on the loop ---------------------------------------------------

    async def _session(self) -> Any:
        """The JetStream context, connecting and opening the bucket first if need be."""
        if self._ready and self._nc is not None and not self._nc.is_closed:
            return self._js
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await self._connect()
                self._js = self._nc.jetstream(timeout=self.timeout)
                self._ready = False
            if not self._ready:
                await self._open_bucket()
                self._ready = True
        return self._js

    async def _connect(self) -> Any:
        nc = nats.NATS()
        fatal: list[BaseException] = []
        established: list[bool] = []  # non-empty once the first connection is up
        failed = asyncio.Event()
        last: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            text = self._scrub(_describe(exc))
            last[:] = [exc]
            if nc.is_connected and "permissions violation" in text.lower():
                self._denied = (time.monotonic(), text)
                log.warning("%s: %s", self.url, text)
            elif isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLCertVerificationError, _PlaintextRefused)) or (
                "authorization violation" in text.lower()
            ):
                if not nc.is_connected:
                    fatal[:] = [exc]
                    failed.set()
                log.warning("%s: %s", self.url, text)
            else:
                log.debug("%s: nats: %s", self.url, text)

        async def on_disconnect() -> None:
            if established and not self._closed:
                log.warning("%s: disconnected from the NATS server; reconnecting", self.url)

        async def on_reconnect() -> None:
            log.info("%s: reconnected to the NATS server", self.url)

        auth: dict[str, Any] = {}
        if self.settings.username is not None:
            auth["user"] = self.settings.username
            auth["password"] = self._guarded(nc, self.settings.password or "")
        if self.settings.token is not None:
            auth["token"] = self._guarded(nc, self.settings.token)
        if self.settings.creds_path:
            auth["user_credentials"] = self.settings.creds_path
        if self.settings.nkey_path:
            auth["nkeys_seed"] = self.settings.nkey_path
        scheme = "tls" if self.settings.tls else "nats"
        connecting = asyncio.ensure_future(
            nc.connect(
                servers=[f"{scheme}://{server}" for server in self.settings.servers],
                name="replicator",
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=max(1, min(5, round(self.timeout))),
                drain_timeout=max(1, round(self.timeout)),
                tls=self._ssl,
                **auth,
            )
        )
        watcher = asyncio.ensure_future(failed.wait())
        try:
            done, _ = await asyncio.wait({connecting, watcher}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if connecting in done and connecting.exception() is None:
            if self.settings.tls and not nc._server_info.get("tls_required"):  # a downgrade: refuse
                await _close_quietly(nc)
                raise PermissionDenied(f"{self.url}: the server did not negotiate TLS; refusing a plaintext connection")
            established.append(True)
            return nc
        if connecting.done() and connecting.exception() is not None:
            last[:] = [connecting.exception()]  # type: ignore[list-item]
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        await _close_quietly(nc)
        servers = ",".join(self.settings.servers)
        if fatal:
            exc = fatal[0]
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise PermissionDenied(
                    f"{self.url}: TLS certificate verification failed for {servers}: {self._scrub(_describe(exc))}"
                )
            if isinstance(exc, _PlaintextRefused):
                raise PermissionDenied(f"{self.url}: {servers} did not negotiate TLS; credentials withheld")
            raise PermissionDenied(f"{self.url}: authorization failed at {servers}")
        reason = self._scrub(_describe(last[0])) if last else "no answer"
        raise Transient(f"{self.url}: cannot connect to {servers} within {self.timeout:g}s: {reason}")

    def _guarded(self, nc: Any, secret: str) -> Callable[[], str]:
        """A credential callback that withholds the secret from a plaintext connection when TLS is required."""

        def credential() -> str:
            if self.settings.tls and not nc._server_info.get("tls_required"):
                raise _PlaintextRefused("server did not negotiate TLS")
            return secret

        return credential

    async def _open_bucket(self) -> None:
        js = self._js
        try:
            info = await js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            if not self.settings.create_bucket:
                raise NotFound(f"{self.url}: object store bucket {self.bucket!r} does not exist") from None
            info = await self._create_bucket()
        config = info.config
        wanted = {f"$O.{self.bucket}.C.>", f"$O.{self.bucket}.M.>"}
        if not wanted <= set(config.subjects or ()) or not config.allow_rollup_hdrs:
            raise StorageError(f"{self.url}: stream {self._stream} exists but is not an object store bucket")
        self._direct = bool(config.allow_direct)

    async def _create_bucket(self) -> Any:
        config = js_api.StreamConfig(
            name=self._stream,
            description="replicator replica",
            subjects=[f"$O.{self.bucket}.C.>", f"$O.{self.bucket}.M.>"],
            max_bytes=self.settings.max_bucket_bytes or -1,
            storage=js_api.StorageType.FILE,
            num_replicas=1,
            discard=js_api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
        )
        started = time.monotonic()
        try:
            info = await self._js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:  # created meanwhile, with other limits
                return await self._js.stream_info(self._stream)
            detail = self._scrub(_describe(exc))
            cls = PermissionDenied if (exc.code in (401, 403) or "permission" in detail.lower()) else StorageError
            raise cls(f"{self.url}: cannot create object store bucket {self.bucket!r}: {detail}") from None
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            denied = self._denied
            if denied is not None and denied[0] >= started:
                raise PermissionDenied(
                    f"{self.url}: cannot create object store bucket {self.bucket!r}: {self._scrub(denied[1])}"
                ) from None
            raise Transient(f"{self.url}: cannot create object store bucket {self.bucket!r}: timed out") from exc
        log.info("%s: created object store bucket %s", self.url, self.bucket)
        return info

    async def _check_absent(self, name: str, key: str) -> None:
        await self._session()
        meta = await self._last_meta(self._meta_subject(name))
        if meta is not None and not meta.info.deleted:
            raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)

    async def _publish_chunks(self, subject: str, piece: bytes | memoryview) -> int:
        js = await self._session()
        view = memoryview(piece).cast("B")
        count = 0
        for start in range(0, len(view), CHUNK_BYTES):
            await js.publish(subject, bytes(view[start : start + CHUNK_BYTES]), timeout=self.timeout, stream=self._stream)
            count += 1
        return count

    async def _commit(self, name: str, key: str, meta: Any, if_absent: bool) -> float:
        """Publish the meta (the moment the object appears), then drop the chunks it replaced."""
        js = await self._session()
        meta_subject = self._meta_subject(name)
        old = await self._last_meta(meta_subject)
        headers = {js_api.Header.ROLLUP: "sub"}
        if if_absent:
            if old is not None and not old.info.deleted:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
            headers[js_api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(old.seq if old else 0)
        payload = json.dumps(meta.as_dict()).encode()
        try:
            await js.publish(meta_subject, payload, timeout=self.timeout, stream=self._stream, headers=headers)
        except nats.js.errors.APIError as exc:
            if if_absent and exc.err_code == _ERR_WRONG_LAST_SEQUENCE:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key) from None
            raise
        modified = time.time()
        # The object is stored; what follows only frees space, and never fails the put.
        if old is not None and not old.info.deleted and old.info.nuid and old.info.nuid != meta.nuid:
            await self._purge_or_remember(self._chunk_subject(old.info.nuid), meta_subject)
        try:
            # A concurrent put that published after us read the old meta, not ours: our
            # chunks are then referenced by nothing, and nobody else would purge them.
            current = await self._last_meta(meta_subject)
        except Exception:  # noqa: BLE001 (checked again by the orphan collection)
            self._remember(self._chunk_subject(meta.nuid), meta_subject)
        else:
            if current is None or current.info.nuid != meta.nuid:
                await self._purge_or_remember(self._chunk_subject(meta.nuid), meta_subject)
        await self._collect_orphans(limit=16)
        return modified

    async def _download(self, name: str, key: str, offset: int, length: int | None, spool: BinaryIO) -> None:
        await self._session()
        for _ in range(10):
            meta = await self._current(name, key)
            info = meta.info
            if info.options is not None and info.options.link is not None:
                raise StorageError(f"{self.url}: {key!r} is an object store link, which this driver does not follow", key=key)
            size = info.size or 0
            end = size if length is None else min(size, offset + length)
            spool.seek(0)
            spool.truncate()
            if offset >= end:
                return
            try:
                if (info.chunks or 0) <= DIRECT_READ_MAX_CHUNKS:
                    await self._read_direct(meta, key, offset, end, spool)
                else:
                    await self._read_consumer(meta, key, offset, end, spool)
                return
            except _Replaced:
                continue  # overwritten while we read: read the new revision
        raise Transient(f"{self.url}: {key!r} kept changing while being read", key=key)

    async def _read_direct(self, meta: _Meta, key: str, offset: int, end: int, spool: BinaryIO) -> None:
        subject = self._chunk_subject(meta.info.nuid)
        reader = _ChunkSink(self, meta, key, offset, end, spool)
        seq = 0
        while not reader.done:
            try:
                msg = await self._js.get_msg(self._stream, seq=seq + 1, subject=subject, next=True, direct=self._direct)
            except nats.js.errors.NotFoundError:
                await self._vanished(meta, key)
                raise IntegrityError(f"{self.url}: {key!r} is damaged: chunks missing after byte {reader.pos}", key=key) from None
            seq = msg.seq
            reader.add(msg.data or b"")
        reader.finish()

    async def _read_consumer(self, meta: _Meta, key: str, offset: int, end: int, spool: BinaryIO) -> None:
        # A pull consumer fetching FETCH_BATCH chunks at a time: the transfer streams, and at
        # most one batch sits in memory whatever the object's size or the reader's pace.
        subject = self._chunk_subject(meta.info.nuid)
        reader = _ChunkSink(self, meta, key, offset, end, spool)
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(30.0, 3 * self.timeout),
        )
        sub = await self._js.pull_subscribe(subject, stream=self._stream, config=config)
        try:
            idle = 0.0
            delivered = 0
            while not reader.done:
                wait = min(self.timeout, STALL_CHECK)
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=wait)
                except TimeoutError:  # nats-py raises its own or asyncio's
                    idle += wait
                    await self._vanished(meta, key)
                    if idle >= self.timeout:
                        raise Transient(f"{self.url}: no data for {key!r} in {self.timeout:g}s", key=key) from None
                    continue
                idle = 0.0
                for msg in msgs:
                    delivered += 1
                    if msg.metadata.sequence.consumer != delivered:
                        raise _Replaced()  # a chunk was lost in transit: read again
                    reader.add(msg.data or b"")
                    if msg.metadata.num_pending == 0 and not reader.done:
                        await self._vanished(meta, key)
                        raise IntegrityError(
                            f"{self.url}: {key!r} is damaged: chunks missing after byte {reader.pos}", key=key
                        )
                    if reader.done:
                        break
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), self.timeout)
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self._stream, sub._consumer)
        reader.finish()

    async def _vanished(self, meta: _Meta, key: str) -> None:
        """Raise _Replaced (or NotFound) if the object being read is no longer meta's revision."""
        current = await self._last_meta(self._meta_subject(meta.info.name))
        if current is None or current.info.deleted:
            raise NotFound(f"{self.url}: {key!r} not found (deleted while being read)", key=key)
        if current.info.nuid != meta.info.nuid:
            raise _Replaced()

    async def _current(self, name: str, key: str) -> _Meta:
        await self._session()
        meta = await self._last_meta(self._meta_subject(name))
        if meta is None or meta.info.deleted:
            raise NotFound(f"{self.url}: {key!r} not found", key=key)
        return meta

    async def _last_meta(self, subject: str) -> _Meta | None:
        # Not a direct get: the stream leader answers, so a read follows every acknowledged write.
        try:
            msg = await self._js.get_msg(self._stream, subject=subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                raise
            return None
        return _Meta(msg.seq or 0, self._parse_meta(msg.data, subject), msg.time.timestamp() if msg.time else None)

    def _parse_meta(self, data: bytes | None, subject: str) -> Any:
        try:
            return js_api.ObjectInfo.from_response(json.loads(data or b""))
        except Exception:  # noqa: BLE001 (whatever is wrong with it, the meta is unreadable)
            raise StorageError(f"{self.url}: unreadable object meta on {subject}") from None

    async def _scan(self, prefix: str) -> list[ObjectInfo]:
        """Every live object whose key starts with prefix (unsorted)."""
        js = await self._session()
        sub = await js.subscribe(
            f"$O.{self.bucket}.M.>",
            stream=self._stream,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        found: list[ObjectInfo] = []
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return found
            idle = 0.0
            while True:
                try:
                    msg = await sub.next_msg(timeout=STALL_CHECK)
                except TimeoutError:  # nats-py raises its own or asyncio's
                    idle += STALL_CHECK
                    # Entries purged (deleted) after the consumer counted them never arrive.
                    if (await sub.consumer_info()).num_pending == 0 and sub.pending_msgs == 0:
                        return found
                    if idle >= self.timeout:
                        raise Transient(f"{self.url}: listing stalled for {self.timeout:g}s") from None
                    continue
                idle = 0.0
                item = self._listed(msg, prefix)
                if item is not None:
                    found.append(item)
                if msg.metadata.num_pending == 0:
                    return found
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), self.timeout)

    def _listed(self, msg: Any, prefix: str) -> ObjectInfo | None:
        try:
            info = self._parse_meta(msg.data, msg.subject)
        except StorageError as exc:
            log.warning("%s", exc)
            return None
        name = info.name or ""
        if info.deleted or not name.startswith(self.prefix) or not name[len(self.prefix) :].startswith(prefix):
            return None
        key = name[len(self.prefix) :]
        try:
            validate_key(key)
        except InvalidKey:
            log.warning("%s: skipping an object whose name is not a legal key: %r", self.url, key[:200])
            return None
        return ObjectInfo(key, info.size or 0, msg.metadata.timestamp.timestamp(), info.digest or None)

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        found = self._call(self._scan(prefix), "list", prefix, bounded=False)
        found.sort(key=lambda item: item.key)
        yield from found

    async def _delete(self, name: str, key: str) -> None:
        js = await self._session()
        meta_subject = self._meta_subject(name)
        meta = await self._last_meta(meta_subject)
        if meta is None:
            return
        # Purge only up to the revision read: a put that lands meanwhile survives.
        await js.purge_stream(self._stream, subject=meta_subject, seq=meta.seq + 1)
        if not meta.info.deleted and meta.info.nuid:
            await self._purge_or_remember(self._chunk_subject(meta.info.nuid), meta_subject)
        await self._collect_orphans(limit=16)

    async def _discard(self, chunks: str, meta_subject: str) -> None:
        """After a failed put: purge its chunks now if the server is there, else remember them."""
        self._remember(chunks, meta_subject)
        if self._nc is not None and self._nc.is_connected:
            await self._collect_orphans(limit=1, only=chunks)

    async def _purge_or_remember(self, chunks: str, meta_subject: str) -> None:
        try:
            await self._js.purge_stream(self._stream, subject=chunks)
        except Exception as exc:  # noqa: BLE001 (best effort: remembered and retried)
            log.debug("%s: purge of %s failed (%s); will retry", self.url, chunks, self._scrub(_describe(exc)))
            self._remember(chunks, meta_subject)

    def _remember(self, chunks: str, meta_subject: str) -> None:
        if len(self._orphans) >= MAX_ORPHANS:
            log.warning("%s: too many unpurged chunk sets; forgetting %s", self.url, chunks)
            return
        self._orphans[chunks] = meta_subject

    async def _collect_orphans(self, *, limit: int, only: str | None = None) -> None:
        """Purge remembered chunk sets that no meta points at (a lost meta ack may have made them live)."""
        candidates = [only] if only else list(self._orphans)[:limit]
        for chunks in candidates:
            meta_subject = self._orphans.get(chunks)
            if meta_subject is None:
                continue
            try:
                meta = await self._last_meta(meta_subject)
                if meta is None or self._chunk_subject(meta.info.nuid or "") != chunks:
                    await self._js.purge_stream(self._stream, subject=chunks)
                self._orphans.pop(chunks, None)
            except Exception as exc:  # noqa: BLE001 (best effort: retried later)
                log.debug("%s: purge of %s deferred: %s", self.url, chunks, self._scrub(_describe(exc)))
                return

    async def _shutdown(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        if nc.is_connected and self._ready and self._orphans:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._collect_orphans(limit=len(self._orphans)), self.timeout)
        if self._orphans:
            log.warning("%s: %d failed upload(s) left chunks in the bucket", self.url, len(self._orphans))
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), self.timeout)
                return
            except Exception as exc:  # noqa: BLE001 (closing anyway)
                log.debug("%s: drain failed: %s", self.url, self._scrub(_describe(exc)))
        await _close_quietly(nc)

    # --- helpers --------------------------------------------------------------------------

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    def _chunk_subject(self, nuid: str) -> str:
        return f"$O.{self.bucket}.C.{nuid}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.tls or s.tls_ca_path or s.skip_verify):
            return None
        try:
            context = ssl.create_default_context(cafile=s.tls_ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise BadURL(f"{self.url}: cannot load tls_ca_path {s.tls_ca_path!r}: {exc}") from None
        if s.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            log.warning("%s: TLS certificate verification is disabled (skip_verify)", self.url)
        return context


class _ChunkSink:
    """Writes the [offset, end) bytes of a chunk sequence to a spool, checking size and digest."""

    def __init__(self, driver: NATSDriver, meta: _Meta, key: str, offset: int, end: int, spool: BinaryIO) -> None:
        self.driver, self.meta, self.key = driver, meta, key
        self.offset, self.end, self.spool = offset, end, spool
        self.size = meta.info.size or 0
        self.whole = offset == 0 and end == self.size
        self.sha = hashlib.sha256()
        self.pos = 0

    @property
    def done(self) -> bool:
        # A range read stops as soon as it has its bytes; a whole read needs every chunk.
        return self.pos >= (self.size if self.whole else self.end)

    def add(self, data: bytes) -> None:
        start, stop = self.pos, self.pos + len(data)
        if stop > self.size:
            raise IntegrityError(f"{self.driver.url}: {self.key!r} has more bytes than its size {self.size}", key=self.key)
        if self.whole:
            self.sha.update(data)
        lo, hi = max(start, self.offset), min(stop, self.end)
        if lo < hi:
            self.spool.write(memoryview(data)[lo - start : hi - start])
        self.pos = stop

    def finish(self) -> None:
        if not self.whole:
            return
        expected = (self.meta.info.digest or "").partition("=")[2]
        actual = base64.urlsafe_b64encode(self.sha.digest()).decode()
        if expected and _b64(expected) != _b64(actual):
            raise IntegrityError(f"{self.driver.url}: {self.key!r} failed its SHA-256 check", key=self.key)


def _b64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


def _modified(meta: _Meta) -> float:
    if meta.time is not None:
        return meta.time
    with contextlib.suppress(Exception):
        return datetime.fromisoformat(str(meta.info.mtime)).timestamp()
    return 0.0


def _describe(exc: BaseException) -> str:
    """A short one-line description of a backend exception."""
    if nats is not None and isinstance(exc, nats.js.errors.APIError):
        text = exc.description or f"code {exc.code}"
        return f"{text} (code {exc.code}, err_code {exc.err_code})" if exc.err_code else text
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == "nats: timeout":
        return name if text == "" else "timeout"
    return text if text.startswith("nats:") else f"{name}: {text}"


async def _close_quietly(nc: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


# --- URL parsing -------------------------------------------------------------------------


def _parse(url: str, options: dict[str, object]) -> _Settings:
    if not isinstance(url, str):
        raise BadURL(f"not a nats URL: {url!r}")
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("nats", "tls") or not sep:
        raise BadURL(f"not a nats URL: {shown}")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise BadURL(f"nats URL must not have a fragment: {shown}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if "@" in path:  # a secret holding a raw '/' would spill into the path: refuse to guess
        raise BadURL(f"nats URL has an '@' after the server; percent-encode '/' and '@' in credentials: {shown}")
    values: dict[str, object] = {}
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
        if colon:
            if not user:
                raise BadURL(f"nats URL has a password but no user name: {shown}")
            values["username"], values["password"] = user, password
        elif user:
            values["token"] = user
        else:
            raise BadURL(f"nats URL has an empty token before '@': {shown}")
    servers = tuple(_server(part, shown) for part in hosts.split(","))
    bucket, _, prefix = path.partition("/")
    bucket = urllib.parse.unquote(bucket)
    if not bucket:
        raise BadURL(f"nats URL needs a bucket: nats://HOST:PORT/BUCKET[/PREFIX] (got {shown})")
    if not _BUCKET.match(bucket):
        raise BadURL(f"invalid object store bucket name {bucket!r} (letters, digits, '-', '_') in {shown}")
    prefix = urllib.parse.unquote(prefix).strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKey as exc:
            raise BadURL(f"invalid prefix in {shown}: {exc}") from None
        prefix += "/"
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        option = name.replace("-", "_")
        if option not in _OPTIONS:
            raise BadURL(f"unknown option {name!r} for nats replica {shown}")
        if option in values:
            raise BadURL(f"option {option!r} given twice in {shown}")
        values[option] = value
    for name, value in options.items():
        option = name.replace("-", "_")
        if option not in _OPTIONS:
            raise BadURL(f"unknown option {name!r} for nats replica {shown}")
        if value is None:
            continue
        if option in values:
            raise BadURL(f"option {option!r} given both in the URL and as an option for {shown}")
        values[option] = value
    settings: dict[str, Any] = {}
    for option in ("username", "password", "token"):
        if option in values:
            settings[option] = _text(values[option], option, shown, secret=option != "username")
    for option in ("nkey_path", "creds_path", "tls_ca_path"):
        if option in values:
            raw = values[option]
            path_value = _text(os.fspath(raw) if isinstance(raw, os.PathLike) else raw, option, shown)
            if not os.path.isfile(path_value):
                raise BadURL(f"{option} {path_value!r} is not a readable file (for {shown})")
            settings[option] = path_value
    for option in ("skip_verify", "create_bucket", "tls"):
        if option in values:
            settings[option] = _flag(values[option], option, shown)
    if "max_bucket_bytes" in values:
        settings["max_bucket_bytes"] = _number(values["max_bucket_bytes"], "max_bucket_bytes", shown, int)
    if "timeout" in values:
        settings["timeout"] = _number(values["timeout"], "timeout", shown, float)
    if "token" in settings and ("username" in settings or "password" in settings):
        raise BadURL(f"nats replica takes a token or a username and password, not both: {shown}")
    if "password" in settings and "username" not in settings:
        raise BadURL(f"nats replica has a password but no username: {shown}")
    if "username" in settings and "password" not in settings:
        raise BadURL(f"nats replica has a username but no password: {shown}")
    tls = settings.pop("tls", False) or scheme.lower() == "tls" or "tls_ca_path" in settings
    return _Settings(servers=servers, bucket=bucket, prefix=prefix, tls=tls, **settings)


def _server(part: str, shown: str) -> str:
    if not part:
        raise BadURL(f"nats URLs need a server: nats://HOST:PORT/BUCKET (got {shown})")
    try:
        parsed = urllib.parse.urlsplit("//" + part)
        host, port = parsed.hostname, parsed.port
    except ValueError:
        raise BadURL(f"invalid server {part!r} in {shown}") from None
    if not host or parsed.username is not None:
        raise BadURL(f"nats URLs need a server: nats://HOST:PORT/BUCKET (got {shown})")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port or DEFAULT_PORT}"


def _text(value: object, option: str, shown: str, *, secret: bool = False) -> str:
    if not isinstance(value, str) or not value:
        what = "a non-empty string" if secret else f"a non-empty string, not {value!r}"
        raise BadURL(f"nats option {option!r} must be {what} (for {shown})")
    return value


def _flag(value: object, option: str, shown: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise BadURL(f"nats option {option!r} must be true or false, not {value!r} (for {shown})")


def _number(value: object, option: str, shown: str, kind: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool):
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})") from None
    if not number > 0:
        raise BadURL(f"nats option {option!r} must be a positive number, not {value!r} (for {shown})")
    return number
