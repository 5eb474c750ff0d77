"""NATSDriver: the Driver operations, each run as coroutines on the driver's loop thread."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

from nats.js import api as js_api
from nats.nuid import NUID

from ..base import (
    Capability,
    Driver,
    ObjectInfo,
    check_page_size,
    check_range,
    iter_chunks,
)
from ..errors import BadURL, StorageError, Transient
from ..keys import validate_key, validate_prefix
from .config import Settings, parse
from .connection import Connection
from .download import Downloader
from .errors import translate
from .listing import scan
from .loop import LoopThread
from .store import CHUNK_BYTES, ObjectStore, _Meta

log = logging.getLogger("replicas.nats")
T = TypeVar("T")

SPOOL_MEMORY = 1 << 20
"""Bytes of a download held in memory before the spool moves to a temporary file."""


class NATSDriver(Driver):
    """Objects in one JetStream object store bucket, under an optional name prefix.

    No resume: the object store has no way to add chunks to an upload a failure cut
    short, nor to start a download at a byte offset, so MULTIPART is not declared. A put
    cut by an outage fails (its chunks are purged) and is redone whole by the caller's
    retry; a get downloads the object again from its start.
    """

    scheme = "nats"
    capabilities = Capability.CONDITIONAL_CREATE

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        scheme = "tls" if settings.tls else "nats"
        self.url = f"{scheme}://{','.join(settings.servers)}/{settings.bucket}"
        if settings.prefix:
            self.url += "/" + urllib.parse.quote(settings.prefix.rstrip("/"), safe="/")
        self._conn = Connection(settings, self.url)
        if settings.nkey_path or settings.creds_path:
            try:
                import nkeys  # noqa: F401  (nats-py needs it for nkey and creds auth)
            except ImportError:
                raise BadURL(f"{self.url}: nkey_path/creds_path need the 'nkeys' package (pip install nkeys)")
        self._store = ObjectStore(self._conn, settings.prefix)
        self._downloader = Downloader(self._store)
        # Shared between threads.
        self._nuid = NUID()
        self._nuid_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future[Any]] = set()  # for reset()
        self._inflight_lock = threading.Lock()
        self._loop = LoopThread(f"nats-driver-{self.bucket}")
        self._thread = self._loop.thread

    @classmethod
    def from_url(cls, url: str, **options: object) -> NATSDriver:
        """Parse a nats:// or tls:// URL and keyword options; BadURL names what is wrong."""
        return cls(parse(url, options))

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
        store = self._store
        name = self.prefix + validate_key(key)
        with self._nuid_lock:
            nuid = self._nuid.next().decode()
        chunks = store.chunk_subject(nuid)
        if if_absent:
            self._call(store.check_absent(name, key), "put", key)
        sha = hashlib.sha256()
        total = count = 0
        published = committed = False
        try:
            # Chunks are read (and progress reported) on this thread, so a slow source or a
            # progress callback that uses this driver never blocks the event loop.
            for piece in iter_chunks(data, key=key, size=size, progress=progress):
                published = True
                count += self._call(store.publish_chunks(chunks, piece), "put", key)
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
            modified = self._call(store.commit(name, key, meta, if_absent), "put", key)
            committed = True
        finally:
            if published and not committed:
                self._call_quietly(store.discard(chunks, store.meta_subject(name)))
        return ObjectInfo(key, total, modified, digest)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        name = self.prefix + validate_key(key)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (returned to the caller)
        try:
            self._call(self._downloader.run(name, key, offset, length, spool), "get", key, bounded=False)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        name = self.prefix + validate_key(key)
        meta = self._call(self._store.current(name, key), "head", key)
        return ObjectInfo(key, meta.info.size or 0, _modified(meta), meta.info.digest or None)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        check_page_size(page_size)
        validate_prefix(prefix)
        return self._listing(prefix)

    def delete(self, key: str) -> None:
        name = self.prefix + validate_key(key)
        self._call(self._store.delete(name, key), "delete", key)

    def close(self) -> None:
        """Drain the connection (bounded by the timeout) and stop the loop thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._conn.closing = True
        self._loop.stop(self._shutdown(), self.timeout + 5)

    def reset(self) -> None:
        """Cancel every operation in flight and close the connection; the next operation reconnects.

        Does not wait: closing runs on the loop thread, bounded there.
        """
        if self._closed or not self._loop.running():
            return
        with self._inflight_lock:
            futures = list(self._inflight)
        for future in futures:
            future.cancel()
        self._loop.submit(self._conn.reset())

    # --- calling into the loop ------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], action: str, key: str | None, *, bounded: bool = True) -> T:
        """Run coro on the loop; every failure comes back as a StorageError."""
        if self._closed or not self._loop.running():
            coro.close()
            raise StorageError(f"{self.url}: driver is closed", key=key)
        started = time.monotonic()
        future = self._loop.submit(coro)
        with self._inflight_lock:
            self._inflight.add(future)
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
                if not self._closed:  # reset() cut it short: worth trying again
                    raise Transient(f"{self.url}: {action} {key!r} interrupted: connection reset", key=key) from None
                raise StorageError(f"{self.url}: {action} {key!r} cancelled: driver is closed", key=key) from None
            if not isinstance(exc, Exception):
                raise
            raise translate(self._conn, exc, action, key, started) from exc
        finally:
            with self._inflight_lock:
                self._inflight.discard(future)

    def _call_quietly(self, coro: Coroutine[Any, Any, object]) -> None:
        try:
            self._call(coro, "clean up", None)
        except StorageError as exc:
            log.debug("%s: clean-up failed: %s", self.url, exc)

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        found = self._call(scan(self._store, prefix), "list", prefix, bounded=False)
        found.sort(key=lambda item: item.key)
        yield from found

    async def _shutdown(self) -> None:
        nc = self._conn.nc
        if nc is None or nc.is_closed:
            return
        await self._store.flush_orphans()
        await self._conn.drain()


def _modified(meta: _Meta) -> float:
    if meta.time is not None:
        return meta.time
    try:
        return datetime.fromisoformat(str(meta.info.mtime)).timestamp()
    except Exception:  # noqa: BLE001
        return 0.0


def from_url(url: str, **options: object) -> NATSDriver:
    """Open `nats://[cred@]host:port/bucket/prefix` (or `tls://...`); see the package docstring."""
    return NATSDriver.from_url(url, **options)
