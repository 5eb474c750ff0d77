"""Object store operations on the loop thread: metas, chunk uploads, commits, deletes, orphans.

The wire format is the JetStream object store's (chunks on `$O.<bucket>.C.<nuid>`, a JSON
meta on `$O.<bucket>.M.<base64 name>` with a rollup header). Publishing the meta is the
moment an object appears; chunk sets that no meta points at (after a failed put, or a
replaced object) are purged, at once or, if the server is unreachable, later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js import api as js_api

from ..activity import note_progress
from ..errors import NotFound, PreconditionFailed, StorageError
from .connection import Connection
from .errors import ERR_STREAM_NOT_FOUND, ERR_WRONG_LAST_SEQUENCE, describe

log = logging.getLogger("replicas.nats")

CHUNK_BYTES = 128 * 1024
"""Object store chunk size (nats-py's and the Go client's default); far below max_payload."""
MAX_ORPHANS = 10_000
STALL_CHECK = 0.5
"""Seconds without a message after which a reader checks whether it should go on waiting."""


@dataclass(frozen=True)
class _Meta:
    seq: int
    info: Any  # nats.js.api.ObjectInfo
    time: float | None


class ObjectStore:
    """The objects of one bucket under one name prefix, through conn."""

    def __init__(self, conn: Connection, prefix: str) -> None:
        self.conn = conn
        self.url = conn.url
        self.bucket = conn.bucket
        self.prefix = prefix
        self.timeout = conn.timeout
        self._orphans: dict[str, str] = {}  # chunk subject -> meta subject

    async def flush_orphans(self) -> None:
        """Before closing: purge what failed puts left, if the server is there (bounded)."""
        nc = self.conn.nc
        if nc.is_connected and self.conn.ready and self._orphans:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.collect_orphans(limit=len(self._orphans)), self.timeout)
        if self._orphans:
            log.warning("%s: %d failed upload(s) left chunks in the bucket", self.url, len(self._orphans))

    async def check_absent(self, name: str, key: str) -> None:
        await self.conn.session()
        meta = await self.last_meta(self.meta_subject(name))
        if meta is not None and not meta.info.deleted:
            raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)

    async def publish_chunks(self, subject: str, piece: bytes | memoryview) -> int:
        js = await self.conn.session()
        view = memoryview(piece).cast("B")
        count = 0
        for start in range(0, len(view), CHUNK_BYTES):
            await js.publish(subject, bytes(view[start : start + CHUNK_BYTES]), timeout=self.timeout, stream=self.conn.stream)
            note_progress()
            count += 1
        return count

    async def commit(self, name: str, key: str, meta: Any, if_absent: bool) -> float:
        """Publish the meta (the moment the object appears), then drop the chunks it replaced."""
        js = await self.conn.session()
        meta_subject = self.meta_subject(name)
        old = await self.last_meta(meta_subject)
        headers = {js_api.Header.ROLLUP: "sub"}
        if if_absent:
            if old is not None and not old.info.deleted:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
            headers[js_api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(old.seq if old else 0)
        payload = json.dumps(meta.as_dict()).encode()
        try:
            await js.publish(meta_subject, payload, timeout=self.timeout, stream=self.conn.stream, headers=headers)
        except nats.js.errors.APIError as exc:
            if if_absent and exc.err_code == ERR_WRONG_LAST_SEQUENCE:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key) from None
            raise
        modified = time.time()
        # The object is stored; what follows only frees space, and never fails the put.
        if old is not None and not old.info.deleted and old.info.nuid and old.info.nuid != meta.nuid:
            await self.purge_or_remember(self.chunk_subject(old.info.nuid), meta_subject)
        try:
            # A concurrent put that published after us read the old meta, not ours: our
            # chunks are then referenced by nothing, and nobody else would purge them.
            current = await self.last_meta(meta_subject)
        except Exception:  # noqa: BLE001 (checked again by the orphan collection)
            self.remember(self.chunk_subject(meta.nuid), meta_subject)
        else:
            if current is None or current.info.nuid != meta.nuid:
                await self.purge_or_remember(self.chunk_subject(meta.nuid), meta_subject)
        await self.collect_orphans(limit=16)
        return modified

    async def current(self, name: str, key: str) -> _Meta:
        await self.conn.session()
        meta = await self.last_meta(self.meta_subject(name))
        if meta is None or meta.info.deleted:
            raise NotFound(f"{self.url}: {key!r} not found", key=key)
        return meta

    async def last_meta(self, subject: str) -> _Meta | None:
        # Not a direct get: the stream leader answers, so a read follows every acknowledged write.
        try:
            msg = await self.conn.js.get_msg(self.conn.stream, subject=subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise
            return None
        return _Meta(msg.seq or 0, self.parse_meta(msg.data, subject), msg.time.timestamp() if msg.time else None)

    def parse_meta(self, data: bytes | None, subject: str) -> Any:
        try:
            return js_api.ObjectInfo.from_response(json.loads(data or b""))
        except Exception:  # noqa: BLE001 (whatever is wrong with it, the meta is unreadable)
            raise StorageError(f"{self.url}: unreadable object meta on {subject}") from None

    async def delete(self, name: str, key: str) -> None:
        js = await self.conn.session()
        meta_subject = self.meta_subject(name)
        meta = await self.last_meta(meta_subject)
        if meta is None:
            return
        # Purge only up to the revision read: a put that lands meanwhile survives.
        await js.purge_stream(self.conn.stream, subject=meta_subject, seq=meta.seq + 1)
        if not meta.info.deleted and meta.info.nuid:
            await self.purge_or_remember(self.chunk_subject(meta.info.nuid), meta_subject)
        await self.collect_orphans(limit=16)

    async def discard(self, chunks: str, meta_subject: str) -> None:
        """After a failed put: purge its chunks now if the server is there, else remember them."""
        self.remember(chunks, meta_subject)
        if self.conn.nc is not None and self.conn.nc.is_connected:
            await self.collect_orphans(limit=1, only=chunks)

    async def purge_or_remember(self, chunks: str, meta_subject: str) -> None:
        try:
            await self.conn.js.purge_stream(self.conn.stream, subject=chunks)
        except Exception as exc:  # noqa: BLE001 (best effort: remembered and retried)
            log.debug("%s: purge of %s failed (%s); will retry", self.url, chunks, self.conn.scrub(describe(exc)))
            self.remember(chunks, meta_subject)

    def remember(self, chunks: str, meta_subject: str) -> None:
        if len(self._orphans) >= MAX_ORPHANS:
            log.warning("%s: too many unpurged chunk sets; forgetting %s", self.url, chunks)
            return
        self._orphans[chunks] = meta_subject

    async def collect_orphans(self, *, limit: int, only: str | None = None) -> None:
        """Purge remembered chunk sets that no meta points at (a lost meta ack may have made them live)."""
        candidates = [only] if only else list(self._orphans)[:limit]
        for chunks in candidates:
            meta_subject = self._orphans.get(chunks)
            if meta_subject is None:
                continue
            try:
                meta = await self.last_meta(meta_subject)
                if meta is None or self.chunk_subject(meta.info.nuid or "") != chunks:
                    await self.conn.js.purge_stream(self.conn.stream, subject=chunks)
                self._orphans.pop(chunks, None)
            except Exception as exc:  # noqa: BLE001 (best effort: retried later)
                log.debug("%s: purge of %s deferred: %s", self.url, chunks, self.conn.scrub(describe(exc)))
                return

    def meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    def chunk_subject(self, nuid: str) -> str:
        return f"$O.{self.bucket}.C.{nuid}"
