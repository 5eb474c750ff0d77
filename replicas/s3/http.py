"""The HTTP connection pool under the minio client, with two additions urllib3 lacks.

- Every socket a driver opens is tracked, so that reset() can shut down the ones a request
  is blocked on (urllib3 keeps no handle on connections in use).
- Request bodies go out in SEND_SLICE pieces with activity.note_progress() in between: a
  16 MiB part over a slow link is progress to a TimeoutDriver, not silence.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import certifi
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..activity import note_progress
from .config import POOL_SIZE

SEND_SLICE = 1 << 20
"""Bytes of a request body sent between two progress notes."""


class ConnectionTracker:
    """The sockets of one driver's HTTP connections (weakly held: closed ones just vanish)."""

    def __init__(self) -> None:
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, sock: socket.socket | None) -> None:
        if sock is not None:
            with self._lock:
                self._sockets.add(sock)

    def shutdown_all(self) -> None:
        """Shut every socket down: a request blocked on one fails at once."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed already, or detached by a TLS wrap
                sock.shutdown(socket.SHUT_RDWR)


class _Tracked:
    """Mixed into urllib3's connection classes; `tracker` is set per driver."""

    tracker: ConnectionTracker

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        self.tracker.add(sock)
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.tracker.add(getattr(self, "sock", None))  # the TLS socket wraps (detaches) the plain one

    def send(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) <= SEND_SLICE:
            super().send(data)  # type: ignore[misc]
            return
        with memoryview(data) as view, view.cast("B") as octets:
            for start in range(0, len(octets), SEND_SLICE):
                super().send(octets[start : start + SEND_SLICE])  # type: ignore[misc]
                note_progress()


def pool_manager(
    *,
    connect_timeout: float,
    read_timeout: float,
    skip_verify: bool,
    env: Mapping[str, str],
    tracker: ConnectionTracker,
) -> urllib3.PoolManager:
    """A pool with bounded timeouts and no hidden retries (RetryingDriver retries Transient errors)."""
    if skip_verify:
        # the driver warns once when it is opened; urllib3 would add a warning per request
        import warnings

        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    manager = urllib3.PoolManager(
        num_pools=4,
        maxsize=POOL_SIZE,
        block=False,
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        retries=False,
        cert_reqs="CERT_NONE" if skip_verify else "CERT_REQUIRED",
        ca_certs=None if skip_verify else (env.get("SSL_CERT_FILE") or certifi.where()),
    )
    attributes = {"tracker": tracker}
    http = type("TrackedHTTPConnection", (_Tracked, HTTPConnection), attributes)
    https = type("TrackedHTTPSConnection", (_Tracked, HTTPSConnection), attributes)
    manager.pool_classes_by_scheme = {
        "http": type("TrackedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("TrackedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }
    return manager
