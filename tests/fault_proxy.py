"""A TCP proxy in front of a real test server, for fault tests: it forwards bytes unchanged and
can cut connections (RST) at a chosen moment, slow them down (a rate that can be changed or
lifted while connections are open: throttle()), refuse every connection for a while
(refuse() / admit()), or answer nothing at all.

The servers stay real (rclone serve s3, sshd, nats-server); only the link between driver and
server misbehaves, as a flaky network or a load balancer would.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Self

UP, DOWN = "up", "down"  # client -> server, server -> client


class FaultProxy:
    """Listens on 127.0.0.1:port and forwards each connection to 127.0.0.1:target_port."""

    def __init__(self, target_port: int, *, rate: float | None = None) -> None:
        self.target_port = target_port
        self.rate = rate  # bytes per second per direction of each connection, None: unlimited
        self.refusing = False  # while True, every connection is reset at once (refuse())
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes = {UP: 0, DOWN: 0}
        self.connections = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._armed: dict[str, list[int]] = {}  # direction -> [bytes left before a cut, cuts left, bytes between]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Reset every open connection now (new ones go through)."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()

    def cut_after(self, count: int, direction: str = UP, *, times: int = 1) -> None:
        """Reset the connection that carries the count-th byte from now in direction.

        With times > 1, again after each further count bytes, times cuts in all.
        """
        with self._lock:
            self._armed[direction] = [count, times, count]

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def throttle(self, rate: float | None) -> None:
        """Set the rate (bytes per second per direction of each connection; None lifts it).
        Open connections follow the new rate from their next chunk on."""
        self.rate = rate

    def refuse(self) -> None:
        """Fail every request from now on: reset the open connections and every new one
        (a replica that is down behind a load balancer still accepting TCP)."""
        self.refusing = True
        self.cut()

    def admit(self) -> None:
        """Stop refusing: new connections go through again."""
        self.refusing = False

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                with self._lock:
                    self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            link.start()

    def _forwarded(self, link: _Link, direction: str, data: bytes) -> bytes | None:
        """Count data; the part to send before a cut is due (None: send it all)."""
        with self._lock:
            self.bytes[direction] += len(data)
            armed = self._armed.get(direction)
            if armed is None or armed[0] > len(data):
                if armed is not None:
                    armed[0] -= len(data)
                return None
            keep = data[: armed[0]]
            armed[1] -= 1
            if armed[1] <= 0:
                del self._armed[direction]
            else:
                armed[0] = armed[2]
            self.cuts += 1
        link.cut()
        return keep

    def _gone(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)


class _Link:
    """One proxied connection: two pumps, cut together."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.dead = threading.Event()
        self._closing = threading.Lock()
        self._closed = False

    def start(self) -> None:
        for src, dst, direction in ((self.client, self.upstream, UP), (self.upstream, self.client, DOWN)):
            threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def cut(self) -> None:
        self.dead.set()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            src.settimeout(0.05)
            while not self.dead.is_set():
                rate = self.proxy.rate  # read per chunk: throttle() applies to open connections
                size = 65536 if rate is None else max(1024, min(65536, int(rate / 20)))
                try:
                    data = src.recv(size)
                except TimeoutError:
                    continue
                if not data:
                    break
                keep = self.proxy._forwarded(self, direction, data)
                dst.sendall(data if keep is None else keep)
                if keep is not None:
                    break
                if rate is not None:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        self.dead.set()
        self._close()

    def _close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._gone(self)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the peer sees 'connection reset', as on a broken link."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class SilentServer:
    """Accepts TCP connections and reads what is sent, but never answers: a hung server."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(sock)
            threading.Thread(target=self._swallow, args=(sock,), daemon=True).start()

    def _swallow(self, sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for sock in self._sockets:
            _reset(sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
