"""A real nats-server with JetStream for the nats driver tests, started once per session.

`server()` starts the shared server lazily (127.0.0.1, a free port, its own store dir) and
stops it at exit; `stop()` / `restart()` act on it for fault tests (same port and store
dir, so data persists). `token_server()` is a second shared server requiring TOKEN.
`NatsServer` starts extra servers: with `--auth TOKEN`, or from a configuration file
(users, permissions, TLS). FACTORIES plugs the driver into the conformance
suite: factory(tmp_path) returns a fresh NATSDriver on a bucket of its own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from replicas import open_driver
from replicas.nats import NATSDriver

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """One nats-server process with JetStream, on 127.0.0.1 and a port of its own."""

    def __init__(self, *, token: str | None = None, config: str | None = None) -> None:
        self.token = token
        self.config = config  # nats-server configuration text (store_dir/listen are added)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="replicator-nats-"))
        self.store = self.dir / "store"
        self.log = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"nats://{self.host}/{bucket}" + (f"/{prefix}" if prefix else "")

    def _command(self) -> list[str]:
        if self.config is not None:
            conf = self.dir / "server.conf"
            conf.write_text(
                f'listen: "127.0.0.1:{self.port}"\n'
                f'jetstream {{ store_dir: "{self.store}" }}\n' + self.config
            )
            return [NATS_SERVER, "-c", str(conf)]
        command = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        if self.token:
            command += ["--auth", self.token]
        return command

    def start(self) -> None:
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                return
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT)
            self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        offset = self.log.stat().st_size if self.log.exists() else 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            with open(self.log, "rb") as log:
                log.seek(max(0, offset - 200))
                started = b"Server is ready" in log.read()
            if started and _accepts(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not ready on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        with self._lock:
            process, self.process = self.process, None
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)  # a clean shutdown flushes JetStream
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


_shared: NatsServer | None = None
_shared_lock = threading.Lock()


def server() -> NatsServer:
    """The session's shared nats-server, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = NatsServer()
            atexit.register(_shared.cleanup)
        _shared.start()
        return _shared


TOKEN = "replicator-test-token-8f3a2c"
_token_shared: NatsServer | None = None


def token_server() -> NatsServer:
    """A second shared server that requires TOKEN (`--auth`), for authentication tests."""
    global _token_shared
    with _shared_lock:
        if _token_shared is None:
            _token_shared = NatsServer(token=TOKEN)
            atexit.register(_token_shared.cleanup)
        _token_shared.start()
        return _token_shared


def stop() -> None:
    """Stop the shared server (its port and store dir are kept for restart())."""
    if _shared is not None:
        _shared.stop()


def restart() -> None:
    """Restart the shared server on the same port and store dir: stored objects persist."""
    server().restart()


def unique_bucket(stem: str = "t") -> str:
    return f"{stem}_{uuid.uuid4().hex[:16]}"


def nats_driver(tmp_path: Path | None = None, **options: object) -> NATSDriver:
    """A fresh driver on a bucket of its own on the shared server."""
    driver = open_driver(server().url(unique_bucket()), **options)
    assert isinstance(driver, NATSDriver)
    return driver


FACTORIES = [("nats", nats_driver)]

if os.environ.get("REPLICATOR_SKIP_NATS") or not os.path.exists(NATS_SERVER):
    FACTORIES = []
