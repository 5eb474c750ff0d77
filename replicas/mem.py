"""The `mem` driver: process-global named in-memory stores, for tests and demos.

Two drivers opened on the same name (`mem://name`) see the same objects until reset().
"""

from __future__ import annotations

import heapq
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from .base import Capability, Driver, ObjectInfo, check_page_size, check_range, iter_chunks
from .errors import BadURL, NotFound, PreconditionFailed
from .keys import validate_key, validate_prefix


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    objects: dict[str, tuple[bytes, float]] = field(default_factory=dict)


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def reset() -> None:
    """Forget every mem store in the process (for tests)."""
    with _stores_lock:
        _stores.clear()


class MemDriver(Driver):
    """Objects held in a named, process-global, thread-safe dictionary."""

    scheme = "mem"
    capabilities = Capability.RANGE_READ | Capability.CONDITIONAL_CREATE | Capability.LOCAL

    def __init__(self, name: str) -> None:
        if not name:
            raise BadURL("mem replica needs a name: mem://<name>")
        self.name = name
        self.url = f"mem://{name}"

    @classmethod
    def from_url(cls, url: str, **options: object) -> MemDriver:
        """Open `mem://name`; takes no options."""
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "mem" or not sep:
            raise BadURL(f"not a mem URL: {url!r}")
        name, _, query = rest.partition("?")
        if query:
            raise BadURL(f"unknown option {query.split('=')[0]!r} for mem replica {url}")
        if options:
            raise BadURL(f"unknown option {sorted(options)[0]!r} for mem replica {url}")
        return cls(name)

    @property
    def _store(self) -> _Store:
        with _stores_lock:
            return _stores.setdefault(self.name, _Store())

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> ObjectInfo:
        validate_key(key)
        buffer = io.BytesIO()
        for chunk in iter_chunks(data, key=key, size=size, progress=progress):
            buffer.write(chunk)
        value, modified = buffer.getvalue(), time.time()
        store = self._store
        with store.lock:
            if if_absent and key in store.objects:
                raise PreconditionFailed(f"{self.url}: {key!r} already exists", key=key)
            store.objects[key] = (value, modified)
        return ObjectInfo(key, len(value), modified)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> BinaryIO:
        check_range(offset, length)
        value, _ = self._lookup(key)
        if offset == 0 and length is None:
            return io.BytesIO(value)  # shares the immutable bytes, no copy
        end = None if length is None else offset + length
        return io.BytesIO(memoryview(value)[offset:end])

    def head(self, key: str) -> ObjectInfo:
        value, modified = self._lookup(key)
        return ObjectInfo(key, len(value), modified)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        check_page_size(page_size)
        return self._pages(validate_prefix(prefix), page_size)

    def delete(self, key: str) -> None:
        validate_key(key)
        store = self._store
        with store.lock:
            store.objects.pop(key, None)

    def _lookup(self, key: str) -> tuple[bytes, float]:
        validate_key(key)
        store = self._store
        with store.lock:
            found = store.objects.get(key)
        if found is None:
            raise NotFound(f"{self.url}: {key!r} not found", key=key)
        return found

    def _pages(self, prefix: str, page_size: int) -> Iterator[ObjectInfo]:
        # Page by "keys after the last one seen", as object stores do.
        after = None
        while True:
            store = self._store
            with store.lock:
                keys = [k for k in store.objects if k.startswith(prefix) and (after is None or k > after)]
                page = [(k, store.objects[k]) for k in heapq.nsmallest(page_size, keys)]
            for k, (value, modified) in page:
                yield ObjectInfo(k, len(value), modified)
            if len(page) < page_size:
                return
            after = page[-1][0]
