"""Downloads: an object's chunks into a spool, checking size and SHA-256 digest.

Small objects are read by direct gets, large ones through a pull consumer, FETCH_BATCH
chunks at a time (bounded memory). If the object is replaced while being read the read
starts again on the new revision. There is no resume of a half-done download: the object
store offers no way to start a chunk stream at a byte offset except by skipping chunks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
from typing import BinaryIO

import nats.js.errors
from nats.js import api as js_api

from ..activity import note_progress
from ..errors import IntegrityError, NotFound, StorageError, Transient
from .store import STALL_CHECK, ObjectStore, _Meta

DIRECT_READ_MAX_CHUNKS = 16
"""Objects with at most this many chunks are read by direct gets, larger ones by a consumer."""
FETCH_BATCH = 16
"""Chunks a large download asks for at a time (2 MiB in flight at most)."""


class _Replaced(Exception):
    """The object was overwritten or its chunks vanished while it was being read."""


class Downloader:
    """Reads objects of store (on the loop thread)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.conn = store.conn
        self.url = store.url
        self.timeout = store.timeout

    async def run(self, name: str, key: str, offset: int, length: int | None, spool: BinaryIO) -> None:
        """Write bytes [offset, offset + length) of the object named name to spool."""
        await self.conn.session()
        for _ in range(10):
            meta = await self.store.current(name, key)
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
        subject = self.store.chunk_subject(meta.info.nuid)
        reader = _ChunkSink(self.url, meta, key, offset, end, spool)
        seq = 0
        while not reader.done:
            try:
                msg = await self.conn.js.get_msg(self.conn.stream, seq=seq + 1, subject=subject, next=True, direct=self.conn.direct)
            except nats.js.errors.NotFoundError:
                await self._vanished(meta, key)
                raise IntegrityError(f"{self.url}: {key!r} is damaged: chunks missing after byte {reader.pos}", key=key) from None
            seq = msg.seq
            reader.add(msg.data or b"")
        reader.finish()

    async def _read_consumer(self, meta: _Meta, key: str, offset: int, end: int, spool: BinaryIO) -> None:
        # A pull consumer fetching FETCH_BATCH chunks at a time: the transfer streams, and at
        # most one batch sits in memory whatever the object's size or the reader's pace.
        subject = self.store.chunk_subject(meta.info.nuid)
        reader = _ChunkSink(self.url, meta, key, offset, end, spool)
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(30.0, 3 * self.timeout),
        )
        sub = await self.conn.js.pull_subscribe(subject, stream=self.conn.stream, config=config)
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
                await self.conn.js.delete_consumer(self.conn.stream, sub._consumer)
        reader.finish()

    async def _vanished(self, meta: _Meta, key: str) -> None:
        """Raise _Replaced (or NotFound) if the object being read is no longer meta's revision."""
        current = await self.store.last_meta(self.store.meta_subject(meta.info.name))
        if current is None or current.info.deleted:
            raise NotFound(f"{self.url}: {key!r} not found (deleted while being read)", key=key)
        if current.info.nuid != meta.info.nuid:
            raise _Replaced()


class _ChunkSink:
    """Writes the [offset, end) bytes of a chunk sequence to a spool, checking size and digest."""

    def __init__(self, url: str, meta: _Meta, key: str, offset: int, end: int, spool: BinaryIO) -> None:
        self.url, self.meta, self.key = url, meta, key
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
            raise IntegrityError(f"{self.url}: {self.key!r} has more bytes than its size {self.size}", key=self.key)
        if self.whole:
            self.sha.update(data)
        lo, hi = max(start, self.offset), min(stop, self.end)
        if lo < hi:
            self.spool.write(memoryview(data)[lo - start : hi - start])
        self.pos = stop
        note_progress()

    def finish(self) -> None:
        if not self.whole:
            return
        expected = (self.meta.info.digest or "").partition("=")[2]
        actual = base64.urlsafe_b64encode(self.sha.digest()).decode()
        if expected and _b64(expected) != _b64(actual):
            raise IntegrityError(f"{self.url}: {self.key!r} failed its SHA-256 check", key=self.key)


def _b64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""
