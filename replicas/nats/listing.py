"""Listing: every meta of the bucket read once through an ordered consumer.

Names are base64 in the subjects, so the server cannot filter by prefix: memory grows with
the number of matching objects. The driver sorts what scan() returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.js import api as js_api

from ..activity import note_progress
from ..base import ObjectInfo
from ..errors import InvalidKey, StorageError, Transient
from ..keys import validate_key
from .store import STALL_CHECK, ObjectStore

log = logging.getLogger("replicas.nats")


async def scan(store: ObjectStore, prefix: str) -> list[ObjectInfo]:
    """Every live object whose key starts with prefix (unsorted)."""
    js = await store.conn.session()
    sub = await js.subscribe(
        f"$O.{store.bucket}.M.>",
        stream=store.conn.stream,
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
                if idle >= store.timeout:
                    raise Transient(f"{store.url}: listing stalled for {store.timeout:g}s") from None
                continue
            idle = 0.0
            note_progress()
            item = _listed(store, msg, prefix)
            if item is not None:
                found.append(item)
            if msg.metadata.num_pending == 0:
                return found
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sub.unsubscribe(), store.timeout)


def _listed(store: ObjectStore, msg: Any, prefix: str) -> ObjectInfo | None:
    try:
        info = store.parse_meta(msg.data, msg.subject)
    except StorageError as exc:
        log.warning("%s", exc)
        return None
    name = info.name or ""
    if info.deleted or not name.startswith(store.prefix) or not name[len(store.prefix) :].startswith(prefix):
        return None
    key = name[len(store.prefix) :]
    try:
        validate_key(key)
    except InvalidKey:
        log.warning("%s: skipping an object whose name is not a legal key: %r", store.url, key[:200])
        return None
    return ObjectInfo(key, info.size or 0, msg.metadata.timestamp.timestamp(), info.digest or None)
