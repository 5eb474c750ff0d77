"""Establishing one SSH connection: TCP, handshake, host key check, authentication.

Every step is bounded by `timeout`, and a socket whose sends stall is turned into an error,
so that a hung server or a dead link never blocks an operation forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass

import paramiko
from paramiko.sftp import SFTPError

from ..errors import StorageError, Transient
from .auth import authenticate
from .config import DEFAULT_TIMEOUT, describe
from .hostkeys import expected_host_keys, prefer_key_types, verify_host_key
from .protocol import MAX_PACKET_SIZE, WINDOW_SIZE

log = logging.getLogger("replicas.sftp")

KEEPALIVE_SECONDS = 30
# Errors that mean the session (or the whole connection) can no longer be trusted.
CONNECTION_ERRORS = (paramiko.SSHException, SFTPError, EOFError, OSError)


class _GuardedSocket(socket.socket):
    """A socket whose send gives up after `stall_timeout` seconds without progress.

    paramiko's packet writer retries a send that times out for as long as the connection
    is open, so a server that stops reading (hung, or a dead link whose TCP buffers are
    full) would block a put forever; this turns that into an error that ends the
    connection.
    """

    stall_timeout = DEFAULT_TIMEOUT
    gave_up = False  # True once a send stalled for too long (the error paramiko reports is EOFError)
    _stalled_since: float | None = None

    def send(self, data, flags: int = 0) -> int:  # type: ignore[no-untyped-def, override]
        try:
            sent = super().send(data, flags)
        except TimeoutError:
            now = time.monotonic()
            if self._stalled_since is None:
                self._stalled_since = now
            elif now - self._stalled_since > self.stall_timeout:
                # Not ETIMEDOUT: that would be a TimeoutError, which paramiko retries.
                self.gave_up = True
                raise ConnectionAbortedError(errno.ECONNABORTED, "the server stopped reading") from None
            raise
        self._stalled_since = None
        return sent


@dataclass
class Connector:
    """What it takes to open a connection to one server as one user."""

    url: str
    host: str
    port: int
    host_id: str  # the server's name in known_hosts
    user: str
    password: str | None
    key_path: str | None
    known_hosts_path: str | None
    host_key: paramiko.PKey | None
    timeout: float

    def __post_init__(self) -> None:
        self._connecting: set[paramiko.Transport] = set()  # handshakes in progress, for abort()
        self._lock = threading.Lock()

    def abort(self) -> None:
        """Close the connections being established: a handshake waiting on a silent server fails."""
        with self._lock:
            connecting = list(self._connecting)
        for transport in connecting:
            with contextlib.suppress(Exception):
                transport.close()

    def connect(self) -> paramiko.Transport:
        """A new authenticated connection; Transient if the server is unreachable or silent."""
        expected, source = expected_host_keys(self.url, self.host_id, self.host_key, self.known_hosts_path)
        try:
            plain = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise Transient(f"{self.url}: cannot connect to {self.host_id}: {describe(exc)}") from exc
        sock = _GuardedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.stall_timeout = self.timeout
        sock.settimeout(self.timeout)
        try:
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
            )
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._connecting.add(transport)
        try:
            transport.banner_timeout = self.timeout
            transport.handshake_timeout = self.timeout
            transport.auth_timeout = self.timeout
            transport.channel_timeout = self.timeout
            prefer_key_types(transport, expected)
            transport.start_client(timeout=self.timeout)
            verify_host_key(self.url, self.host_id, transport, expected, source)
            authenticate(
                transport,
                url=self.url,
                host_id=self.host_id,
                user=self.user,
                key_path=self.key_path,
                password=self.password,
            )
            transport.set_keepalive(KEEPALIVE_SECONDS)
        except StorageError:
            transport.close()
            raise
        except CONNECTION_ERRORS as exc:
            transport.close()
            raise Transient(f"{self.url}: SSH connection to {self.host_id} failed: {describe(exc)}") from exc
        except BaseException:
            transport.close()
            raise
        finally:
            with self._lock:
                self._connecting.discard(transport)
        log.debug("%s: connected to %s", self.url, self.host_id)
        return transport
